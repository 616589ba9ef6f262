"""The embedded default: the builtin synthetic task (``builtin:NAME`` data) and ``builtin:tiny``.

``load_builtin("sft" | "preference" | "prompts" | "pretraining", split)`` gives the task's rows
(``pretraining``: plain text like the texts ``builtin:tiny`` was pretrained on, the general text
forgetting is measured on and replayed from);
``ensure_tiny_model()`` gives the directory of the small pretrained Qwen2 base.
"""

from __future__ import annotations

from alignkit.builtin import task
from alignkit.builtin.task import gold_reward
from alignkit.builtin.tiny import ensure_tiny_model, pretraining
from alignkit.errors import UserError

_DATASETS = {
    "sft": task.sft,
    "preference": task.preference,
    "prompts": task.prompts,
    "pretraining": pretraining,
}

__all__ = ["ensure_tiny_model", "gold_reward", "load_builtin"]


def load_builtin(name: str, split: str = "train") -> list[dict]:
    """Rows of the builtin dataset ``name`` ("sft", "preference", "prompts", "pretraining") for
    ``split``."""
    if name not in _DATASETS:
        raise UserError(
            f"unknown builtin dataset 'builtin:{name}'; valid names: "
            f"{', '.join('builtin:' + n for n in _DATASETS)} (splits: {', '.join(task.SPLITS)})"
        )
    return _DATASETS[name](split)
