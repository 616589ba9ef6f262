"""``alignkit status`` at 80 columns: every stage's name, status and headline metric uncut;
``--wide`` for every column; a run whose process died shows its stage stopped; ``--watch`` ends
when the run's process is gone."""

import json
import os
import subprocess
import sys

import pytest

STAGES = [  # name, kind, metrics
    ("supervised_finetune", "sft", {"heldout_nll": 4.5321, "heldout_nll_base": 5.09,
                                    "gold_reward": 0.08, "gold_reward_ref": -0.004}),
    ("onpolicy_pairs", "rollout", {"samples": 8192.0, "pairs": 1990.0}),
    ("reward_model", "reward_model", {"heldout_pairwise_accuracy": 0.998, "train_loss": 0.11}),
    ("dpo", "dpo", {"eval_rewards/accuracies": 0.95, "gold_reward": 0.3,
                    "gold_reward_ref": 0.02, "kl_ref": 1.35}),
    ("ppo_on_the_learned_rm", "ppo", {"gold_reward": 0.43, "gold_reward_ref": 0.03,
                                      "kl_ref": 2.75, "global_step": 80.0}),
]  # fmt: skip


def alignkit(*args, columns=80):
    env = {**os.environ, "COLUMNS": str(columns), "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-m", "alignkit", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=120)  # fmt: skip


@pytest.fixture
def run_dir(tmp_path):
    entries = []
    for i, (name, kind, metrics) in enumerate(STAGES):
        entries.append({"name": name, "kind": kind, "parent": None, "config_hash": f"h{i}",
                        "status": "complete"})  # fmt: skip
        (tmp_path / name).mkdir()
        record = {"config_hash": f"h{i}", "metrics": metrics,
                  "health": {"checks": 9, "trips": []}}  # fmt: skip
        (tmp_path / name / "stage.json").write_text(json.dumps(record))
    entries.append({"name": "compare", "kind": "eval", "parent": None, "config_hash": "hc",
                    "status": "running"})  # fmt: skip
    (tmp_path / "manifest.json").write_text(json.dumps({"run": "quickstart", "stages": entries}))
    return tmp_path


def test_eighty_columns_show_every_stage_status_and_headline_uncut(run_dir):
    out = alignkit("status", run_dir).stdout
    assert max(len(line) for line in out.splitlines()) <= 80, out
    for name, _, _ in STAGES:
        assert name in out, out
    assert out.count("complete") == len(STAGES)
    for headline in ("gold gain 0.084", "samples 8192", "pair acc 0.998", "gold gain 0.28",
                     "gold gain 0.4", "nll 4.532", "kl 2.75"):  # fmt: skip
        assert headline in out, (headline, out)


def test_wide_shows_every_column(run_dir):
    out = alignkit("status", run_dir, "--wide", columns=200).stdout
    assert "output" in out and "from" in out and "steps 80" in out and "9 checks" in out


def test_a_running_stage_without_its_process_shows_stopped_and_watch_ends(run_dir):
    (run_dir / ".lock").write_text(f"pid 999999999 on {os.uname().nodename}")
    out = alignkit("status", run_dir).stdout
    assert " stopped " in out and " running " not in out
    watched = alignkit("status", run_dir, "--watch")  # the process is gone: one frame, then out
    assert watched.returncode == 0 and "stopped" in watched.stdout
