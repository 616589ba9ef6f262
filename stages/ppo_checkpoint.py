"""PPO's resumable checkpoints: ``<checkpoint_dir>/checkpoint-<step>/state.pt`` holds the
policy and value adapters, the value head, the optimizer, the KL coefficient, the score
statistics and the RNG; written to a temporary dir and renamed into place, the oldest
beyond ``keep`` deleted."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from alignkit.stages.ppo_core import AdaptiveKLController
from alignkit.stages.ppo_model import POLICY, VALUE, PPOModel
from alignkit.stages.ppo_scores import Scoring


def save_checkpoint(
    root: Path,
    step: int,
    model: PPOModel,
    optimizer: torch.optim.Optimizer,
    kl: AdaptiveKLController,
    scoring: Scoring,
    keep: int,
) -> str:
    """Write the checkpoint of ``step``; its directory name."""
    final = root / f"checkpoint-{step}"
    tmp = root / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {
        "policy": get_peft_model_state_dict(model.peft, adapter_name=POLICY),
        "value": get_peft_model_state_dict(model.peft, adapter_name=VALUE),
        "value_head": model.value_head.state_dict(),
        "optimizer": optimizer.state_dict(),
        "kl_coef": kl.value,
        **scoring.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "step": step,
    }
    torch.save(state, tmp / "state.pt")
    (tmp / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    os.replace(tmp, final)
    kept = sorted(root.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    for old in kept[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final.name


def read_checkpoint(path: Path) -> dict:
    """The state :func:`save_checkpoint` wrote in ``path``."""
    # tensors, numbers and dicts only: a crafted checkpoint cannot run code on resume
    return torch.load(path / "state.pt", weights_only=True)


def restore_checkpoint(
    state: dict,
    model: PPOModel,
    optimizer: torch.optim.Optimizer,
    kl: AdaptiveKLController,
    scoring: Scoring,
) -> int:
    """Put a checkpoint's state back (the RNG too); the step it was at."""
    set_peft_model_state_dict(model.peft, state["policy"], adapter_name=POLICY)
    set_peft_model_state_dict(model.peft, state["value"], adapter_name=VALUE)
    model.value_head.load_state_dict(state["value_head"])
    optimizer.load_state_dict(state["optimizer"])
    kl.value = state["kl_coef"]
    scoring.load_state_dict(state)
    torch.set_rng_state(state["torch_rng"])
    return state["step"]
