"""One rank of a multi-process pipeline run, for the 2-process tests (``torchrun`` runs it).

Runs the pipeline in ``argv[1]`` (a JSON config) in run directory ``argv[2]`` and writes, for
every rank, the trainable tensors its model ended with to ``argv[3]/rank<R>.pt``: the test then
checks that the ranks trained one model, not one each.
"""

import json
import os
import sys
from pathlib import Path

import torch
from rich.console import Console

from alignkit import training
from alignkit.config import validate_pipeline
from alignkit.pipeline import run_pipeline
from alignkit.stages import REGISTRY, stage_kinds

raw, run_dir, out = json.loads(Path(sys.argv[1]).read_text()), sys.argv[2], Path(sys.argv[3])
real = training.train_and_evaluate


def recording(trainer, ctx, evaluate):
    metrics = real(trainer, ctx, evaluate)
    model = trainer.accelerator.unwrap_model(trainer.model)
    state = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    torch.save(state, out / f"{ctx.name}-rank{os.environ.get('RANK', '0')}.pt")
    return metrics


for module in (sys.modules[k] for k in list(sys.modules) if k.startswith("alignkit.stages.")):
    if getattr(module, "train_and_evaluate", None) is real:
        module.train_and_evaluate = recording
run_pipeline(validate_pipeline(raw, stage_kinds()), REGISTRY, run_dir, Console(quiet=True))
