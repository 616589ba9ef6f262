"""Health checks inside real stages: a degenerating DPO run trips early and says so; the
probe writes samples; `stop` ends the stage with exit-code-2 semantics (a UserError)."""

import json
import os
import subprocess
import sys

import pytest
from rich.console import Console

from alignkit.config import validate_pipeline
from alignkit.health import HealthStop
from alignkit.pipeline import run_pipeline
from alignkit.stages import REGISTRY, stage_kinds


def dpo_run(tmp_path, tiny_pipeline_cfg, lr, on_trip="warn", steps=30):
    raw = tiny_pipeline_cfg(tmp_path, steps=6)
    raw["stages"].append({
        "name": "dpo", "kind": "dpo",
        "data": {"source": "builtin:preference", "max_rows": 512, "eval_size": 0},
        "max_length": 64,
        "heldout": {"enabled": False},
        "health": {"every": 5, "sample_prompts": 4, "max_new_tokens": 24, "on_trip": on_trip},
        "train": {"max_steps": steps, "per_device_train_batch_size": 16, "learning_rate": lr,
                  "logging_steps": 1, "save_steps": 5},
    })  # fmt: skip
    cfg = validate_pipeline(raw, stage_kinds())
    run_pipeline(cfg, REGISTRY, tmp_path, Console(quiet=True))


def test_dpo_at_a_degenerating_learning_rate_trips_within_its_first_third(
    tmp_path, tiny_pipeline_cfg
):
    dpo_run(tmp_path, tiny_pipeline_cfg, lr=6e-3)
    health = json.loads((tmp_path / "dpo" / "stage.json").read_text())["health"]
    assert health["checks"] == 7  # before training and every 5 of 30 steps
    assert health["trips"] and min(t["step"] for t in health["trips"]) <= 10, health
    samples = [json.loads(x) for x in (tmp_path / "dpo" / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {0, 5, 10, 15, 20, 25, 30}
    assert {"prompt", "completion", "kl", "gold"} <= set(samples[0])
    # `alignkit status` shows the trips: in the table and one line each
    status = subprocess.run([sys.executable, "-m", "alignkit", "status", tmp_path],
                            capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})  # fmt: skip
    first = health["trips"][0]
    assert f"{first['check']}@{first['step']}" in status.stdout
    assert f"health dpo step {first['step']}:" in status.stdout


def test_on_trip_stop_ends_the_stage_and_keeps_earlier_checkpoints(tmp_path, tiny_pipeline_cfg):
    with pytest.raises(HealthStop, match=r"stages\.dpo: stopped at step \d+ by the health check"):
        dpo_run(tmp_path, tiny_pipeline_cfg, lr=6e-3, on_trip="stop")
    partial = tmp_path / ".dpo.partial"
    trips = json.loads((partial / "health.json").read_text())["trips"]
    stopped_at = trips[0]["step"]
    kept = [int(p.name.split("-")[1]) for p in (partial / "checkpoints").glob("checkpoint-*")]
    assert all(step < stopped_at for step in kept)  # nothing saved from the tripped step on
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    entry = next(s for s in manifest["stages"] if s["name"] == "dpo")
    assert entry["status"] == "failed" and entry["health"]["trips"][0]["step"] == stopped_at
