"""The sweep block: distributions, parameter paths, checks before any trial runs, and the study
bookkeeping (pruning, retrying a killed trial) on a real Optuna study without training."""

from __future__ import annotations

import copy
import os
import re
import socket
import subprocess
import sys

import pytest
from rich.console import Console

from alignkit.config import validate_pipeline
from alignkit.errors import UserError
from alignkit.stages import stage_kinds
from alignkit.sweep.space import Distribution, load_sweep, parse_distribution, with_params

optuna = pytest.importorskip("optuna")


def pipeline(**sweep) -> dict:
    block = {
        "stage": "dpo",
        "params": {
            "stages.dpo.beta": "loguniform(0.01, 1)",
            "stages.dpo.train.learning_rate": "loguniform(1e-5, 1e-3)",
        },
        "objective": "gold_reward_gain",
        "direction": "maximize",
        "trials": 4,
        "report_every": 10,
    }
    block.update(sweep)
    return {
        "run": {"name": "s", "seed": 0},
        "stages": [
            {"name": "sft", "kind": "sft", "data": {"source": "builtin:sft"}},
            {"name": "dpo", "kind": "dpo", "data": {"source": "builtin:preference"}},
            {"name": "cmp", "kind": "eval", "stages": ["sft", "dpo"]},
        ],
        "sweep": block,
    }


@pytest.mark.parametrize(
    "text, expected",
    [
        ("loguniform(1e-5, 1e-3)", Distribution("loguniform", 1e-5, 1e-3)),
        ("uniform(0, 1)", Distribution("uniform", 0.0, 1.0)),
        ("int(8, 32, step=8)", Distribution("int", 8, 32, step=8)),
        ("logint(1, 64)", Distribution("logint", 1, 64)),
        ("categorical(linear, cosine, 3, true)", Distribution("categorical", choices=("linear", "cosine", 3, True))),
    ],
)  # fmt: skip
def test_distributions_parse(text, expected):
    assert parse_distribution(text, "p") == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("logunifrom(1e-5, 1e-3)", "did you mean 'loguniform'"),
        ("loguniform(0, 1)", "LOW > 0"),
        ("uniform(1, 0.5)", "LOW < HIGH"),
        ("int(1.5, 4)", "must be integers"),
        ("int(1, 4, step=0)", "positive integer"),
        ("uniform(1, 2, 3)", "takes LOW, HIGH"),
        ("uniform(low, 2)", "finite number"),
        ("categorical()", "one or more values"),
        ("categorical([a, b], c)", "numbers, strings"),
        ("categorical(a, a)", "twice"),
        ("0.1", "not a distribution"),
    ],
)
def test_bad_distributions_say_what_is_wrong(text, message):
    with pytest.raises(UserError, match=r"sweep\.params\.x: .*" + re.escape(message)):
        parse_distribution(text, "sweep.params.x")


def test_suggest_draws_inside_each_distribution():
    study = optuna.create_study()
    trial = study.ask()
    beta = parse_distribution("loguniform(0.01, 1)", "p").suggest(trial, "b")
    steps = parse_distribution("int(8, 32, step=8)", "p").suggest(trial, "s")
    kind = parse_distribution("categorical(linear, cosine)", "p").suggest(trial, "k")
    assert 0.01 <= beta <= 1 and steps in (8, 16, 24, 32) and kind in ("linear", "cosine")


def test_a_valid_sweep_loads_and_run_ignores_the_block():
    spec = load_sweep(pipeline(), stage_kinds(), "cfg")
    assert spec.stage == "dpo" and spec.params["stages.dpo.beta"].kind == "loguniform"
    assert spec.n_startup == 3  # a third of the budget, at least 3
    assert validate_pipeline(pipeline(), stage_kinds()).sweep["stage"] == "dpo"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"params": {"stages.dpo.bta": "uniform(0.1, 1)"}}, "has no field 'bta' (did you mean 'beta'?)"),
        ({"params": {"stages.dpo.train.learnig_rate": "loguniform(1e-5, 1e-3)"}},
         "has no option 'learnig_rate' (did you mean 'learning_rate'?)"),
        ({"params": {"stages.dpo.heldout.num_promts": "int(8, 64)"}}, "did you mean 'num_prompts'"),
        ({"params": {"stages.sft.train.learning_rate": "loguniform(1e-5, 1e-3)"}},
         "a path inside the swept stage"),
        ({"params": {"adapter.r": "int(4, 16)"}}, "a path inside the swept stage"),
        ({"params": {"stages.dpo.beta": "uniform(0.1 1)"}}, "takes LOW, HIGH"),
        ({"params": {"stages.dpo.beta": "categorical(high, low)"}}, "beta: Input should be a valid number"),
        ({"params": {"stages.dpo.beta.x": "uniform(0.1, 1)"}}, "stages.dpo.beta has no fields"),
        ({"stage": "dop"}, "no stage named 'dop' (did you mean 'dpo'?)"),
        ({"direction": "max"}, "sweep: direction"),
        ({"trails": 3}, "unknown key 'trails' (did you mean 'trials'?)"),
        ({"report_every": 0}, "report_every: the median pruner needs intermediate values"),
        ({"pruner": {"type": "halving"}}, "pruner.type"),
    ],
)  # fmt: skip
def test_sweep_mistakes_are_named_before_anything_runs(change, message):
    raw = pipeline()
    raw["sweep"].update(change)
    with pytest.raises(UserError, match=re.escape(message)):
        load_sweep(raw, stage_kinds(), "cfg")


def test_a_trial_config_sets_the_values_and_drops_the_sweep_block():
    raw = pipeline()
    out = with_params(raw, {"stages.dpo.beta": 0.3, "stages.dpo.train.learning_rate": 1e-4})
    assert "sweep" not in out and "sweep" in raw  # the original is untouched
    dpo = validate_pipeline(out, stage_kinds()).stage("dpo")
    assert dpo.beta == 0.3 and dpo.train["learning_rate"] == 1e-4


def test_upstream_is_what_the_stage_starts_from_and_not_what_follows_it():
    from alignkit.sweep.study import upstream_stages

    cfg = validate_pipeline(pipeline(), stage_kinds())
    assert upstream_stages(cfg, "dpo") == ["sft"]
    assert upstream_stages(cfg, "sft") == []


def test_a_poor_intermediate_value_prunes_the_trial():
    from alignkit.sweep.study import TrialReport

    study = optuna.create_study(
        direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=1)
    )
    first = study.ask()
    for step in (10, 20):
        first.report(0.5, step)
    study.tell(first, 0.5)
    good = TrialReport(study.ask(), "dpo", "gold_reward_gain", 10, Console(quiet=True))
    assert not good.due(5) and good.due(10) and good.due(20)
    good.report(10, {"gold_reward_gain": 0.6})  # better than the median: goes on
    good.report(20, {"loss": 1.0})  # no objective in these metrics: nothing reported
    assert good.trial.user_attrs["last_step"] == 10
    poor = TrialReport(study.ask(), "dpo", "gold_reward_gain", 10, Console(quiet=True))
    with pytest.raises(optuna.TrialPruned, match="at step 10"):
        poor.report(10, {"gold_reward_gain": 0.1})


def test_a_killed_processes_trial_is_retried_with_its_values(tmp_path):
    """A RUNNING trial whose process on this host is gone is marked failed and enqueued again
    with the same values and its first attempt's number (its directory, its checkpoint)."""
    from alignkit.sweep.study import finished, latest_attempts, open_study, retry_killed

    spec = load_sweep(pipeline(), stage_kinds(), "cfg")
    cfg = validate_pipeline(pipeline(), stage_kinds())
    study = open_study(optuna, spec, cfg, tmp_path)
    done = study.ask({"stages.dpo.beta": optuna.distributions.FloatDistribution(0.01, 1)})
    study.tell(done, 0.2)
    killed = study.ask({"stages.dpo.beta": optuna.distributions.FloatDistribution(0.01, 1)})
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    killed.set_user_attr("worker", f"{socket.gethostname()}:{dead}")
    alive = study.ask()  # a trial of a live process (this one) is left alone
    alive.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")

    retry_killed(optuna, study, spec, Console(quiet=True))
    states = {t.number: t.state.name for t in study.trials}
    assert states == {0: "COMPLETE", 1: "FAIL", 2: "RUNNING", 3: "WAITING"}
    assert study.trials[3].user_attrs["retry_of"] == 1
    assert finished(study) == 1 and latest_attempts(study)[1].number == 3
    retry_killed(optuna, study, spec, Console(quiet=True))  # not enqueued twice
    assert len(study.trials) == 4
    again = open_study(optuna, spec, cfg, tmp_path)  # the study is in SQLite: a new process sees it
    assert [t.state.name for t in again.trials] == ["COMPLETE", "FAIL", "RUNNING", "WAITING"]
    retry = again.ask({"stages.dpo.beta": optuna.distributions.FloatDistribution(0.01, 1)})
    assert retry.number == 3 and retry.params == killed.params  # the next trial, same values


def test_a_study_stored_with_the_other_direction_is_refused(tmp_path):
    from alignkit.sweep.study import open_study

    cfg = validate_pipeline(pipeline(), stage_kinds())
    open_study(optuna, load_sweep(pipeline(), stage_kinds(), "cfg"), cfg, tmp_path)
    flipped = load_sweep(pipeline(direction="minimize"), stage_kinds(), "cfg")
    with pytest.raises(UserError, match="study 's-dpo'"):
        open_study(optuna, flipped, cfg, tmp_path)


def test_missing_optuna_is_one_clear_error(monkeypatch):
    from alignkit.sweep import study

    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(UserError, match=r"pip install 'alignkit\[sweep\]'"):
        study.require_optuna()


def test_sweep_block_is_deep_copied_not_shared():
    raw = pipeline()
    before = copy.deepcopy(raw)
    load_sweep(raw, stage_kinds(), "cfg")
    assert raw == before


def test_the_shipped_sweep_config_is_valid():
    from pathlib import Path

    from alignkit.config import read_pipeline

    path = Path(__file__).resolve().parents[2] / "configs" / "sweep-dpo.yaml"
    spec = load_sweep(read_pipeline(path), stage_kinds(), str(path))
    assert spec.stage == "dpo" and spec.trials >= 12 and spec.pruner.type != "none"
