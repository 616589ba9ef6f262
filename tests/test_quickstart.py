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
    records = {
        s: json.loads((tmp_path / s / "stage.json").read_text())
        for s in ("sft", "reward_model", "dpo", "ppo")
    }
    m = {s: r["metrics"] for s, r in records.items()}
    assert m["sft"]["heldout_nll"] < m["sft"]["heldout_nll_base"] - 0.2
    assert m["reward_model"]["heldout_pairwise_accuracy"] >= 0.80
    # RLHF: PPO's only reward is the run's learned RM, trained on the SFT policy's own samples
    ppo_cfg = records["ppo"]["config"]
    assert ppo_cfg["reward_model"] == "reward_model" and ppo_cfg["rewards"] == []
    assert records["reward_model"]["config"]["mix"][0]["stage"] == "onpolicy"
    onpolicy = json.loads((tmp_path / "onpolicy" / "stage.json").read_text())["metrics"]
    assert onpolicy["pairs"] > 1000 and m["reward_model"]["eval_onpolicy_accuracy"] > 0.7
    # the RM sanity probe ran and no degenerate kind of answer beats the held-out chosen mean.
    # Its flag (over 10% of a kind's 32 answers above that mean) is a coin flip on this recipe:
    # pieces of words and a lone "." are inputs no training pair holds, which the RM scores at
    # random; measured, it fired on 2 of 3 seeds here and on the previous settings too
    # (README, "The quickstart"). PPO then records the rm_blind_spots warning at step 0.
    flagged = m["reward_model"]["rm_probe/flagged"]
    for kind in ("empty", "period", "short", "fragments", "repeated"):
        assert (
            m["reward_model"][f"rm_probe/{kind}_mean"] < m["reward_model"]["rm_probe/chosen_mean"]
        )
    assert m["dpo"]["eval_rewards/accuracies"] >= 0.75
    # policy = reference = SFT at step 0: zero implicit rewards (the loss is ln 2 + the NLL term)
    assert m["dpo"]["before_eval_rewards/chosen"] == m["dpo"]["before_eval_rewards/rejected"] == 0
    assert m["dpo"]["before_eval_loss"] > 0.6931
    # PPO: a gain beyond its CI, inside the KL target, at least DPO's
    assert m["ppo"]["gold_reward_gain_ci_low"] > 0
    assert m["ppo"]["kl_ref"] < 3.0  # the configured kl_target
    ppo_gain = m["ppo"]["gold_reward"] - m["ppo"]["gold_reward_ref"]
    assert ppo_gain >= m["dpo"]["gold_reward"] - m["dpo"]["gold_reward_ref"]
    # a healthy run trips no health check (but the probe's warning), DPO and PPO both ran them
    for stage in ("dpo", "ppo"):
        health = records[stage]["health"]
        expected = [("rm_blind_spots", 0)] if stage == "ppo" and flagged else []
        assert health["checks"] >= 4, stage
        assert [(t["check"], t["step"]) for t in health["trips"]] == expected, health["trips"]
        assert (tmp_path / stage / "samples.jsonl").stat().st_size > 0
    # what a blind spot would cost: PPO keeps most answers free of broken words
    results = json.loads((tmp_path / "compare" / "results.json").read_text())
    valid = {m["label"]: m["rewards"]["gold_valid"]["mean"] for m in results["models"]}
    assert valid["ppo"] >= 0.65, valid
    # the report: base < SFT < DPO and base < SFT < PPO in gold, head to head above 0.5
    gold = {m["label"]: m["rewards"]["gold"]["mean"] for m in results["models"]}
    assert gold["base"] < gold["sft"] < gold["dpo"] and gold["sft"] < gold["ppo"], gold
    wins = {(c["model"], c["against"]): c for c in results["comparisons"] if c["reward"] == "gold"}
    for aligned in ("dpo", "ppo"):
        assert wins[(aligned, "sft")]["ci_low"] > 0.5, aligned
    # every stage directory has a model card naming its parent and the hashes of its data
    for entry in json.loads((tmp_path / "manifest.json").read_text())["stages"]:
        record = json.loads((tmp_path / entry["name"] / "stage.json").read_text())
        card = (tmp_path / entry["name"] / "README.md").read_text()
        parent = f"`{record['parent']}`" if record["parent"] else "none"
        assert f"**Parent stage:** {parent}" in card and record["data"], entry["name"]
        assert all(d["sha256"] in card for d in record["data"]), entry["name"]
    # forgetting: each policy stage recorded it, and the report shows it
    for stage in ("sft", "dpo", "ppo"):
        assert m[stage]["forgetting_nll_after"] > 0 and m[stage]["forgetting_texts"] == 256
    assert "## Forgetting" in (tmp_path / "compare" / "report.md").read_text()
    # the run page: curves of sft, reward_model, dpo, ppo; health of dpo, ppo; 3 comparison plots
    check_run_page(tmp_path, pictures=9)


def check_run_page(run_dir: Path, pictures: int) -> None:
    """One file, every stage in its graph and a section each, ``pictures`` PNGs inline."""
    page = (run_dir / "report.html").read_text()
    stages = [s["name"] for s in json.loads((run_dir / "manifest.json").read_text())["stages"]]
    for stage in stages:
        assert f'id="stage-{stage}"' in page and f">{stage}</text>" in page
    assert "<script" not in page and page.count("data:image/png;base64,") == pictures


@pytest.mark.slow
def test_quickstart_grpo_beats_its_reference(tmp_path):
    run_config("quickstart-grpo.yaml", tmp_path)
    record = json.loads((tmp_path / "grpo" / "stage.json").read_text())
    grpo = record["metrics"]
    assert record["health"]["checks"] >= 4 and record["health"]["trips"] == []
    assert "reward" in record["health"]["last"]  # TRL's logged reward reached the monitor
    assert grpo["gold_reward_gain_ci_low"] > 0
    assert 0 < grpo["kl_ref"] < 10
    # the run page: sft and grpo curves, grpo's health checks
    check_run_page(tmp_path, pictures=3)
