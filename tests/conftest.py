"""Shared fixtures: a small pipeline on the builtin tiny model and task; a tracked run of every
training stage kind."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

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


# --- a tracked run: sft -> reward model -> dpo and ppo -> compare -----------------------------

PREF = {"source": "builtin:preference", "split": "train", "eval_split": "test", "max_rows": 32,
        "max_eval_rows": 8}  # fmt: skip
HELDOUT = {"num_prompts": 2, "samples_per_prompt": 1, "max_new_tokens": 8}
# max_kl this low trips at the first check after step 0: a trip for the trackers and the page
HEALTH = {"every": 1, "sample_prompts": 2, "samples_per_prompt": 1, "max_new_tokens": 8,
          "max_kl": 1e-6}  # fmt: skip


def tracked_train(steps: int = 2) -> dict:
    return {"max_steps": steps, "per_device_train_batch_size": 8, "logging_steps": 1,
            "save_steps": 50}  # fmt: skip


def tracked_pipeline(run_dir, report_to: list[str]) -> dict:
    return {
        "run": {"name": "tracked", "dir": str(run_dir), "seed": 0, "report_to": report_to},
        "model": {"name": "builtin:tiny"},
        "adapter": {"type": "lora", "r": 4, "alpha": 8},
        "stages": [
            {"name": "sft", "kind": "sft", "max_length": 48, "heldout": HELDOUT,
             "train": tracked_train(), "data": {"source": "builtin:sft", "split": "train", "eval_split": "test",
                      "max_rows": 32, "max_eval_rows": 8}},
            {"name": "rm", "kind": "reward_model", "data": PREF, "max_length": 48,
             "train": tracked_train()},
            {"name": "dpo", "kind": "dpo", "from": "sft", "data": PREF, "max_length": 48,
             "heldout": HELDOUT, "health": HEALTH, "train": tracked_train()},
            {"name": "ppo", "kind": "ppo", "from": "sft", "reward_model": "rm", "steps": 2,
             "data": {"source": "builtin:prompts", "split": "train", "max_rows": 16},
             "prompts_per_step": 4, "minibatches": 2, "ppo_epochs": 1, "max_new_tokens": 8,
             "heldout": HELDOUT, "health": HEALTH},
            {"name": "compare", "kind": "eval", "rewards": ["gold", "rm"], "n": 1,
             "max_prompts": 4, "max_new_tokens": 8},
        ],
    }  # fmt: skip


@pytest.fixture(scope="session")
def tracked_run(tmp_path_factory):
    """``alignkit run`` on :func:`tracked_pipeline`, logging to TensorBoard, and to W&B
    (offline) and MLflow (a file store) when their packages are installed; the run directory.
    Its tracker files are read in tests/alignkit/test_tracking.py, its page in
    tests/eval/test_run_page.py."""
    root = tmp_path_factory.mktemp("tracked")
    report_to = ["tensorboard"] + [n for n in ("wandb", "mlflow") if importlib.util.find_spec(n)]
    config = root / "pipeline.yaml"
    config.write_text(json.dumps(tracked_pipeline(root / "run", report_to)))  # JSON is YAML
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, "-m", "alignkit", "run", str(config)],
                          capture_output=True, text=True, env=env, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root / "run"
