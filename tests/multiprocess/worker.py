"""One rank of a multi-process pipeline run, for the 2-process tests (``torchrun`` runs it).

Runs the pipeline in ``argv[1]`` (a JSON config) in run directory ``argv[2]`` and writes, for
every rank, the trainable tensors its model ended with to ``argv[3]/<stage>-rank<R>.pt`` (and
its optimizer's groups to ``<stage>-groups-rank<R>.json``): the test then checks that the ranks trained one model, not one each.
"""

import json
import os
import sys
from pathlib import Path

import torch
import transformers
from rich.console import Console

from alignkit.config import validate_pipeline
from alignkit.pipeline import run_pipeline
from alignkit.stages import REGISTRY, stage_kinds

raw, run_dir, out = json.loads(Path(sys.argv[1]).read_text()), sys.argv[2], Path(sys.argv[3])
real = transformers.Trainer.train


def recording(self, *args, **kwargs):
    """Every TRL trainer's train(), then this rank's trainable tensors and optimizer groups to
    files."""
    result = real(self, *args, **kwargs)
    stage = Path(self.args.output_dir).parent.name.removeprefix(".").removesuffix(".partial")
    model = self.accelerator.unwrap_model(self.model)
    state = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    rank = os.environ.get("RANK", "0")
    torch.save(state, out / f"{stage}-rank{rank}.pt")
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {  # parameter -> [optimizer group name, initial learning rate]; DeepSpeed's ZeRO
        # optimizer holds flattened partitions instead of the parameters: none recorded then
        names[id(p)]: [g.get("name"), g["initial_lr"]]
        for g in self.optimizer.param_groups
        for p in g["params"]
        if id(p) in names
    }
    (out / f"{stage}-groups-rank{rank}.json").write_text(json.dumps(groups))
    return result


transformers.Trainer.train = recording

if os.environ.get("ALIGNKIT_TEST_SKEW_PLAN") and os.environ.get("RANK") == "1":
    import alignkit.pipeline as pipeline

    real_plan = pipeline.plan

    def skewed(cfg, rd):
        """Rank 1 sees every stage complete (as it would if rank 0 had changed the files
        first): the run must still follow rank 0's plan."""
        decisions = real_plan(cfg, rd)
        for d in decisions:
            d.action, d.reason, d.resume_from = "skip", "rank 1 saw it complete", None
        return decisions

    pipeline.plan = skewed
run_pipeline(validate_pipeline(raw, stage_kinds()), REGISTRY, run_dir, Console(quiet=True))
