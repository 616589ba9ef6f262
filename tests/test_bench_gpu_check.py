"""The GPU check's CPU side: without a GPU it says so and skips; its dry run drives every step's
plumbing (model building, the pipelines, result parsing and the JSON) on CPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


def gpu_check(*args, timeout=1200):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_every_step_is_skipped_with_the_reason(tmp_path):
    proc = gpu_check("--out", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr
    steps = json.loads((tmp_path / "r.json").read_text())["steps"]
    assert set(steps) == {"tests", "rollouts", "ppo_memory", "qlora_sft", "ppo_vllm"}
    assert all(s["status"] == "skipped" and "no CUDA" in s["why"] for s in steps.values())


def test_dry_run_of_the_training_steps_writes_their_numbers(tmp_path):
    out = tmp_path / "dry.json"
    proc = gpu_check("--dry-run", "--minutes", "20", "--only", "qlora_sft", "ppo_vllm",
                     "--out", out)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    assert results["dry_run"] is True and results["device"] == "cpu"
    sft, ppo = results["steps"]["qlora_sft"], results["steps"]["ppo_vllm"]
    assert sft["status"] == "ok" and sft["tokens_per_s"] > 0 and sft["parameters"] > 0
    assert ppo["status"] == "ok" and ppo["steps"] == 2 and ppo["step_seconds"] > 0
    assert ppo["engine"] == "hf" and "vLLM" in ppo["why"]  # said, not hidden
    assert "| qlora_sft | ok |" in proc.stdout


@pytest.mark.slow
def test_dry_run_of_every_step(tmp_path):
    out = tmp_path / "dry.json"
    proc = gpu_check("--dry-run", "--minutes", "30", "--out", out, timeout=2400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = json.loads(out.read_text())["steps"]
    assert all(s["status"] == "ok" for s in steps.values()), steps
    assert steps["tests"]["counts"]["collected"] > 0 and steps["rollouts"]["rows"]
    assert steps["ppo_memory"]["rows"]
