"""Shared fixtures: a small pipeline on the builtin tiny model and task."""

from __future__ import annotations

import pytest


def tiny_pipeline(run_dir, *, adapter="lora", quantization="none", steps=4, **stage_extra):
    """Raw config for a few SFT steps on the builtin task (64 rows, 32 held out)."""
    stage = {
        "name": "sft",
        "kind": "sft",
        "data": {
            "source": "builtin:sft",
            "split": "train",
            "eval_split": "test",
            "max_rows": 64,
            "max_eval_rows": 32,
        },
        "max_length": 64,
        "heldout": {"num_prompts": 8, "samples_per_prompt": 1, "max_new_tokens": 16},
        "train": {
            "max_steps": steps,
            "per_device_train_batch_size": 8,
            "learning_rate": 3e-3,
            "logging_steps": 1,
            "save_steps": 2,
        },
    }
    stage.update(stage_extra)
    return {
        "run": {"name": "test", "dir": str(run_dir), "seed": 0},
        "model": {"name": "builtin:tiny", "quantization": quantization},
        "adapter": {"type": adapter, "r": 8, "alpha": 16},
        "stages": [stage],
    }


@pytest.fixture(scope="session")
def tiny_pipeline_cfg():
    return tiny_pipeline
