"""A non-finite loss or weight never completes a stage.

Training that diverges (a learning rate far too high, an fp16 overflow) leaves NaN or inf in the
weights while the trainer happily finishes; the stage would then be recorded as complete, and a
re-run would replace a good stage with it. Three guards:

- :class:`alignkit.training.FiniteGuard` (TRL stages): after every optimizer step the trainable tensors are checked,
  and every log's ``loss``/``grad_norm``; the first non-finite value stops training before that
  step is checkpointed, naming the stage and step.
- PPO checks its own losses and, before each checkpoint, its trainable tensors
  (:func:`nonfinite_names`).
- The pipeline checks every saved ``*.safetensors`` of a stage before marking it complete
  (:func:`check_saved_weights`), so no stage kind can complete with broken weights.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from alignkit.errors import UserError


class NonFiniteError(UserError):
    """Training produced NaN/inf: the stage stops and is not marked complete."""


def nonfinite_names(named: Iterable[tuple[str, torch.Tensor]], limit: int = 3) -> list[str]:
    """Names of (up to ``limit``) tensors holding a NaN or an inf."""
    bad = []
    for name, tensor in named:
        if tensor.is_floating_point() and not torch.isfinite(tensor.detach()).all():
            bad.append(name)
            if len(bad) >= limit:
                break
    return bad


def stop_message(where: str, what: str, step: int, checkpoint: str | None) -> str:
    kept = f"the last good checkpoint ({checkpoint}) is kept" if checkpoint else "nothing was kept"
    return (
        f"{where}: {what} at step {step}; stopped before saving it, {kept}, and any earlier "
        "complete output of this stage is left as it was. Lower the learning rate (or check "
        "fp16 overflow) and re-run."
    )


def _pruned_rank(name: str, tensor: torch.Tensor) -> bool:
    """An AdaLoRA factor whose module its budget pruned to rank 0: 2-d with one side 0 (an
    unsharded ZeRO-3/FSDP save is flat instead)."""
    return ".lora_" in name and tensor.ndim == 2 and max(tensor.shape) > 0


def check_saved_weights(stage_dir: Path, where: str) -> None:
    """Raise :class:`NonFiniteError` when any saved ``*.safetensors`` under ``stage_dir``
    (checkpoints excluded) holds a NaN or an inf, or an empty tensor (a shard of a ZeRO-3 or
    FSDP model saved without gathering it: the weights would load as nothing)."""
    for path in sorted(stage_dir.rglob("*.safetensors")):
        if "checkpoints" in path.relative_to(stage_dir).parts:
            continue
        with safe_open(str(path), framework="pt") as f:
            tensors = [(k, f.get_tensor(k)) for k in f.keys()]
        empty = [k for k, t in tensors if t.numel() == 0 and not _pruned_rank(k, t)]
        if empty:
            raise NonFiniteError(
                f"{where}: the saved weights hold empty tensors ({path.relative_to(stage_dir)}: "
                f"{', '.join(empty[:3])}{' …' if len(empty) > 3 else ''}): sharded weights "
                "were saved without being gathered; the stage is not marked complete."
            )
        bad = nonfinite_names(tensors)
        if bad:
            raise NonFiniteError(
                f"{where}: the trained weights hold NaN/inf ({path.relative_to(stage_dir)}: "
                f"{', '.join(bad)}); the stage is not marked complete and any earlier complete "
                "output is left as it was. Lower the learning rate and re-run."
            )
