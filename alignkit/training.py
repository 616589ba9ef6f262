"""Steps every TRL-backed stage shares: building the TRL config, logging metrics, resuming."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from alignkit.errors import UserError


def trl_args(
    cls: type, user: dict[str, Any], *, output_dir: Path, seed: int, where: str, **ours: Any
):
    """Build a TRL config: our defaults (``ours``), overridden by the user's ``train:`` block.

    Defaults that matter everywhere: no external loggers, checkpoints in the stage's partial dir
    (so an interrupted stage resumes), and no bf16/gradient checkpointing on CPU (TRL turns both on
    by default; neither works there).
    """
    cuda = torch.cuda.is_available()
    defaults: dict[str, Any] = {
        "output_dir": str(output_dir),
        "report_to": "none",
        "seed": seed,
        "data_seed": seed,
        "bf16": cuda and torch.cuda.is_bf16_supported(),
        "gradient_checkpointing": False,
        "save_strategy": "steps",
        "save_steps": 50,
        "save_total_limit": 2,
        "logging_steps": 10,
        "eval_strategy": "no",
        "use_cpu": not cuda,
    }
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in {**defaults, **ours}.items() if k in names}
    kwargs.update(user)
    kwargs["output_dir"] = str(output_dir)  # checkpoints must live where resume looks for them
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}.train: {cls.__name__} rejected the options: {e}") from None


def adapter_params_to(model, dtype: torch.dtype) -> None:
    """Keep trainable adapter weights in the base's compute dtype.

    TRL casts them to bfloat16 on any quantized base; on CPU (float32 compute) that makes the
    trained model compute differently from the saved adapter reloaded by peft (3e-4 in logits).
    """
    for p in model.parameters():
        if p.requires_grad and p.dtype != dtype and p.is_floating_point():
            p.data = p.data.to(dtype)


class MetricsCallback(TrainerCallback):
    """Append every trainer log (loss, lr, eval metrics) to ``metrics.jsonl`` on the main process."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, **logs}
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=float) + "\n")


def final_train_metrics(trainer) -> dict[str, float]:
    """The last logged value of each training metric (the trainer's own names)."""
    out: dict[str, float] = {}
    for entry in trainer.state.log_history:
        for k, v in entry.items():
            if isinstance(v, int | float) and k not in ("step", "epoch"):
                out[k] = float(v)
    out["global_step"] = float(trainer.state.global_step)
    return out
