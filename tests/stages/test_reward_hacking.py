"""A reward model PPO can hack, and the checks that see it without the gold reward (slow)."""

import json
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from alignkit.config import validate_pipeline
from alignkit.pipeline import run_pipeline
from alignkit.stages import REGISTRY, stage_kinds

ROOT = Path(__file__).resolve().parents[2]
GOLD_FREE = {"rm_blind_spots", "reward_vs_heldout_rm", "length", "invalid_tokens", "kl_limit",
             "kl_growth", "repetition"}  # fmt: skip


def hackable_pipeline(run_dir: Path) -> dict:
    """The quickstart's SFT; an RM on 1,000 offline pairs only (no on-policy pairs); PPO on it
    with raw scores, no missing-EOS penalty, no clipping and no KL penalty. Measured: held-out
    gold peaks at +0.44 (step 4), falls to +0.20 by step 12 and to -0.04 by step 30, while the
    RM's score keeps rising and a quarter of the words become fragments."""
    quick = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    stages = {s["name"]: s for s in quick["stages"]}
    rm = {k: v for k, v in stages["reward_model"].items() if k != "mix"}
    rm["data"] = {**rm["data"], "max_rows": 1000}
    rm["train"] = {**rm["train"], "max_steps": 150}
    ppo = {**stages["ppo"], "steps": 16, "normalize_scores": "none", "missing_eos_penalty": 0.0,
           "score_clip": None, "kl_coef": 0.0, "adaptive_kl": False,
           "health": {"every": 2, "sample_prompts": 32}}  # fmt: skip
    return {**quick, "run": {"name": "hack", "seed": 0, "dir": str(run_dir)},
            "stages": [stages["sft"], rm, ppo]}  # fmt: skip


def health_every(cfg) -> int:
    return next(s for s in cfg.stages if s.name == "ppo").health.every


@pytest.mark.slow
def test_gold_free_checks_trip_before_gold_falls_on_a_hackable_reward_model(tmp_path):
    cfg = validate_pipeline(hackable_pipeline(tmp_path), stage_kinds())
    run_pipeline(cfg, REGISTRY, tmp_path, Console(quiet=True))
    rm = json.loads((tmp_path / "reward_model" / "stage.json").read_text())["metrics"]
    assert rm["rm_probe/flagged"] >= 1  # the sanity probe sees the blind spots
    health = json.loads((tmp_path / "ppo" / "health.json").read_text())
    # the setup really is hacked: held-out gold falls more than 0.1 below its best
    best, fell_at = -1.0, None
    for check in health["history"]:
        best = max(best, check["gold"])
        if check["gold"] < best - 0.1:
            fell_at = check["step"]
            break
    assert fell_at is not None, [round(h["gold"], 3) for h in health["history"]]
    gold_free = [t for t in health["trips"] if t["check"] in GOLD_FREE]
    assert gold_free and min(t["step"] for t in gold_free) < fell_at, health["trips"]
    assert gold_free[0]["check"] == "rm_blind_spots" and gold_free[0]["step"] == 0
    # during training the broken words show (invalid_tokens) by the check where gold has
    # fallen or the next: the rate crosses its limit right there (measured on the 400-step SFT:
    # 0.098 at the check before, tripping at the fall; on the 150-step SFT: 0.087 at the fall,
    # tripping at the next check)
    invalid = [t["step"] for t in health["trips"] if t["check"] == "invalid_tokens"]
    every = health_every(cfg)
    assert invalid and invalid[0] <= fell_at + every, health["trips"]
