"""One rank of a 2-process PPO run for the tests (``torchrun`` runs it).

``argv``: the run directory holding finished ``sft`` and ``rm`` stages, and an output folder.
Each rank writes ``rank<R>.json`` (its first step's prompts and whitened advantages with their
mask, and how far the update's averaged gradients are from the mean of the ranks' own) and
``rank<R>.pt`` (its policy and value tensors after two steps); rank 0 logs to TensorBoard under
``tracking/``.
"""

import json
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from rich.console import Console

from alignkit.config import AdapterSpec, ModelSpec
from alignkit.handoff import StageOutput
from alignkit.pipeline import StageContext
from alignkit.rundir import RunDir
from alignkit.stages import ppo_update as update
from alignkit.stages.ppo import PPOStageConfig
from alignkit.stages.ppo_loop import PPOTrainer
from alignkit.stages.ppo_model import REWARD
from alignkit.tracking import open_stage_tracker

run_dir, out = RunDir(sys.argv[1]), Path(sys.argv[2])
state = PartialState(cpu=True)
cfg = PPOStageConfig(
    name="ppo", data={"source": "builtin:prompts", "max_rows": 64}, reward_model="rm",
    steps=2, prompts_per_step=8, minibatches=2, ppo_epochs=1, max_new_tokens=12,
    checkpoint_every=10, value_adapter=AdapterSpec(r=4, alpha=8), health={"enabled": False},
    heldout={"enabled": False},
)  # fmt: skip
ctx = StageContext(
    name="ppo", model=ModelSpec(), adapter=AdapterSpec(), seed=0, out_dir=out / "stage",
    parent=StageOutput("sft", "sft", run_dir.stage_dir("sft"), run_dir.stage_json("sft")),
    resume_from=None, console=Console(quiet=True), is_main=state.is_main_process,
)  # fmt: skip
ctx.tracker = open_stage_tracker(["tensorboard"], str(out / "tracking"), run_dir.path, "ppo-ddp",
                                 "ppo", "ppo", {}, state.is_main_process)  # fmt: skip
ctx.out_dir.mkdir(parents=True, exist_ok=True)
trainer = PPOTrainer(cfg, ctx, {REWARD: run_dir.stage_dir("rm")})
rank = state.process_index
exp = trainer._experience(0)
record = {
    "world": trainer.world,
    "prompts": trainer._prompts_for(0),
    "advantages": exp.advantages.tolist(),
    "mask": exp.cmask.tolist(),
}


def update_gradients(through_ddp: bool) -> torch.Tensor:
    """The gradients of one minibatch of two micro-batches, as the update computes them, through
    the DDP wrapper (averaged over ranks) or the bare model (this rank's alone)."""
    wrapped = trainer.wrapped
    trainer.wrapped = wrapped if through_ddp else trainer.model
    trainer.model.train()
    torch.manual_seed(1)  # the same LoRA dropout masks both times
    half = len(exp.ids) // 2
    for k, idx in enumerate((torch.arange(half), torch.arange(half, len(exp.ids)))):
        update.backward(
            trainer.accelerator, trainer.wrapped, cfg, exp, idx, 0.5, k == 1, trainer._check_finite
        )
    trainer.wrapped = wrapped
    params = trainer.model.policy_parameters() + trainer.model.value_parameters()
    grads = torch.cat([p.grad.flatten() for p in params])
    trainer.optimizer.zero_grad(set_to_none=True)
    return grads


local = update_gradients(through_ddp=False)
synced = update_gradients(through_ddp=True)
everyone = [torch.zeros_like(local) for _ in range(trainer.world)]
torch.distributed.all_gather(everyone, local)
mean = torch.stack(everyone).mean(0)
record["update_grad_error"] = ((synced - mean).abs().max() / mean.abs().max()).item()
record["update_grad_rank_spread"] = (everyone[0] - everyone[1]).abs().max().item()
(out / f"rank{rank}.json").write_text(json.dumps(record))
trainer.train()
ctx.tracker.close()
tensors = {
    n: p.detach().clone()
    for n, p in trainer.model.named_parameters()
    if ".default." in n or ".value." in n or n.startswith("value_head")
}
torch.save(tensors, out / f"rank{rank}.pt")
