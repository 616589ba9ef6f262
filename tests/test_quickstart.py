"""The README's first command, end to end (slow: a few minutes on 2 CPU cores)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_meets_its_promises(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "alignkit",
            "run",
            ROOT / "configs/quickstart.yaml",
            "--run-dir",
            tmp_path,
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = {
        s: json.loads((tmp_path / s / "stage.json").read_text())["metrics"]
        for s in ("sft", "reward_model", "dpo")
    }
    assert m["sft"]["heldout_nll"] < m["sft"]["heldout_nll_base"] - 0.2
    assert m["reward_model"]["heldout_pairwise_accuracy"] >= 0.80
    assert m["dpo"]["eval_rewards/accuracies"] >= 0.75
    assert abs(m["dpo"]["before_eval_loss"] - 0.6931) < 1e-3
