"""bench/forgetting_replay.py builds its runs from the quickstart: the pipelines must stay valid,
and only the SFT stage replays (at the fraction asked)."""

import importlib.util
from pathlib import Path

from alignkit.config import validate_pipeline
from alignkit.stages import stage_kinds

ROOT = Path(__file__).resolve().parents[1]


def test_forgetting_runs_are_the_quickstarts_sft_and_dpo():
    spec = importlib.util.spec_from_file_location(
        "forgetting", ROOT / "bench" / "forgetting_replay.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    plain = validate_pipeline(bench.pipeline(0.0, seed=0), stage_kinds())
    replayed = validate_pipeline(bench.pipeline(0.3, seed=0), stage_kinds())
    assert [s.name for s in plain.stages] == ["sft", "dpo"] == [s.name for s in replayed.stages]
    assert plain.stages[0].replay is None and replayed.stages[1].replay is None
    assert replayed.stages[0].replay.fraction == 0.3
    assert replayed.stages[0].replay.source == "builtin:pretraining"
