"""bench/overoptimization.py builds its runs from the quickstart: the pipeline must stay valid,
and PPO must train on a reward model alone (gold only evaluates)."""

import importlib.util
from pathlib import Path

from alignkit.config import validate_pipeline
from alignkit.stages import stage_kinds

ROOT = Path(__file__).resolve().parents[1]


def test_overoptimization_runs_are_a_valid_rlhf_pipeline():
    spec = importlib.util.spec_from_file_location("overopt", ROOT / "bench" / "overoptimization.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = validate_pipeline(bench.pipeline(steps=10, seed=0), stage_kinds())
    ppo = [s for s in cfg.stages if s.kind == "ppo"]
    assert [s.name for s in ppo] == [f"ppo_{label}" for label in bench.RUNS]
    assert all(s.rewards == [] and s.reward_model == bench.RUNS[s.name[4:]] for s in ppo)
    raw = next(s for s in ppo if s.name == "ppo_small_raw")
    assert raw.normalize_scores == "none" and raw.score_clip is None
    assert {s.name for s in cfg.stages} >= {"rm_small", "rm_offline", "reward_model", "onpolicy"}
