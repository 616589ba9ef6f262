"""The README's first command, end to end (slow: a few minutes on 2 CPU cores)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_config(name: str, run_dir: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "alignkit", "run", ROOT / "configs" / name, "--run-dir", run_dir],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_quickstart_meets_its_promises(tmp_path):
    run_config("quickstart.yaml", tmp_path)
    m = {
        s: json.loads((tmp_path / s / "stage.json").read_text())["metrics"]
        for s in ("sft", "reward_model", "dpo")
    }
    assert m["sft"]["heldout_nll"] < m["sft"]["heldout_nll_base"] - 0.2
    assert m["reward_model"]["heldout_pairwise_accuracy"] >= 0.80
    assert m["dpo"]["eval_rewards/accuracies"] >= 0.75
    assert abs(m["dpo"]["before_eval_loss"] - 0.6931) < 1e-3


@pytest.mark.slow
def test_quickstart_ppo_beats_its_reference_within_the_kl_target(tmp_path):
    run_config("quickstart-ppo.yaml", tmp_path)
    ppo = json.loads((tmp_path / "ppo" / "stage.json").read_text())["metrics"]
    dpo = json.loads((tmp_path / "dpo" / "stage.json").read_text())["metrics"]
    assert ppo["gold_reward_gain_ci_low"] > 0  # the gain exceeds its CI half-width
    assert ppo["kl_ref"] < 3.0  # the configured kl_target
    ppo_gain = ppo["gold_reward"] - ppo["gold_reward_ref"]
    assert ppo_gain >= dpo["gold_reward"] - dpo["gold_reward_ref"]


@pytest.mark.slow
def test_quickstart_grpo_beats_its_reference(tmp_path):
    run_config("quickstart-grpo.yaml", tmp_path)
    grpo = json.loads((tmp_path / "grpo" / "stage.json").read_text())["metrics"]
    assert grpo["gold_reward_gain_ci_low"] > 0
    assert 0 < grpo["kl_ref"] < 10
