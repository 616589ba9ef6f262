"""bench/frontier.py builds its sweep from the quickstart configs: the sweep must stay valid."""

import importlib.util
from pathlib import Path

from alignkit.config import validate_pipeline
from alignkit.stages import stage_kinds

ROOT = Path(__file__).resolve().parents[1]


def test_frontier_sweep_is_a_valid_pipeline_with_one_stage_per_value():
    spec = importlib.util.spec_from_file_location("frontier", ROOT / "bench" / "frontier.py")
    frontier = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(frontier)
    for quick in (False, True):
        raw = frontier.pipeline(list(frontier.SWEEPS), quick, seed=0)
        cfg = validate_pipeline(raw, stage_kinds())
        swept = [s for s in cfg.stages if s.name.startswith(tuple(frontier.SWEEPS))]
        assert cfg.stages[0].kind == "sft" and all(s.from_ == "sft" for s in swept)
        assert [s.kind for s in cfg.stages[1:3]] == ["rollout", "reward_model"]  # PPO's RM
        for method, (field, values, _) in frontier.SWEEPS.items():
            got = [getattr(s, field) for s in swept if s.name.startswith(f"{method}_{field}_")]
            assert got == (frontier.QUICK[method] if quick else values)
        assert all(s.loss_type == ["sigmoid"] for s in swept if s.name.startswith("dpo_sigmoid"))
