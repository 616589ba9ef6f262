"""``alignkit sweep`` end to end on the tiny model: a 3-trial DPO sweep of 2 steps per trial,
killed (SIGKILL to its process group) right after its first trial completes, then run again:
the study resumes, the finished trial is not trained again, a killed trial is retried with
its values, and the report (table, best config, plots) is written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from alignkit.config import load_pipeline
from alignkit.stages import stage_kinds

optuna = pytest.importorskip("optuna")


def sweep_config(tmp_path, tiny_pipeline_cfg) -> dict:
    raw = tiny_pipeline_cfg(tmp_path / "run", steps=2)
    raw["stages"].append(
        {
            "name": "dpo",
            "kind": "dpo",
            "from": "sft",
            "data": {
                "source": "builtin:preference",
                "eval_split": "test",
                "max_rows": 32,
                "max_eval_rows": 0,
            },
            "loss_type": ["sigmoid", "sft"],
            "max_length": 64,
            "heldout": {"num_prompts": 4, "samples_per_prompt": 1, "max_new_tokens": 8},
            "health": {"enabled": False},
            "train": {
                "max_steps": 2,
                "per_device_train_batch_size": 8,
                "logging_steps": 1,
                "save_steps": 1,
                "learning_rate": 1e-3,
            },
        }  # fmt: skip
    )
    raw["sweep"] = {
        "stage": "dpo",
        "params": {
            "stages.dpo.beta": "loguniform(0.05, 0.5)",
            "stages.dpo.train.learning_rate": "loguniform(1e-4, 3e-3)",
        },
        "objective": "gold_reward_gain",
        "direction": "maximize",
        "trials": 3,
        "report_every": 1,
        "pruner": {"type": "median", "startup_trials": 1},
    }
    return raw


def sweep(cfg, log, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "alignkit", "sweep", str(cfg)],
        stdout=log, stderr=subprocess.STDOUT, env=env, **kw,
    )  # fmt: skip


def test_a_killed_sweep_resumes_without_repeating_finished_trials(tmp_path, tiny_pipeline_cfg):
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(yaml.safe_dump(sweep_config(tmp_path, tiny_pipeline_cfg)))
    run = tmp_path / "run"
    first_trial = run / "sweep" / "trial-0000" / "dpo" / "stage.json"
    with open(tmp_path / "first.log", "w") as log:
        proc = sweep(cfg, log, start_new_session=True)
        deadline = time.time() + 600
        while not first_trial.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert first_trial.exists(), (tmp_path / "first.log").read_text()[-3000:]
    trained_once = first_trial.read_text()

    with open(tmp_path / "second.log", "w") as log:
        second = sweep(cfg, log)
        assert second.wait(timeout=900) == 0, (tmp_path / "second.log").read_text()[-3000:]

    assert first_trial.read_text() == trained_once  # trial 0 was not trained again
    storage = f"sqlite:///{run / 'sweep' / 'study.db'}"
    study = optuna.load_study(study_name="test-dpo", storage=storage)
    trials = study.get_trials()
    ended = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(ended) == 3 and not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    assert [t.user_attrs["dir"] for t in ended].count("trial-0000") == 1
    for t in trials:  # a killed attempt was retried with the same values under the same dir
        if t.state.name == "FAIL":
            assert t.user_attrs.get("interrupted")
            assert (
                f"{t.number},{t.user_attrs['dir']},killed"
                in (run / "sweep" / "report" / "trials.csv").read_text()
            )
            retry = next(r for r in trials if r.user_attrs.get("retry_of") == t.number)
            assert retry.user_attrs["dir"] == t.user_attrs["dir"]
            if t.params:  # (killed before it drew its values: the retry draws them)
                assert retry.params == t.params
    for t in ended:  # every trial is the swept stage of its own run directory
        assert (run / "sweep" / t.user_attrs["dir"] / "sft").resolve() == (run / "sft").resolve()

    report = run / "sweep" / "report"
    rows = (report / "trials.csv").read_text().splitlines()
    assert rows[0].startswith("trial,dir,state,stages.dpo.beta,stages.dpo.train.learning_rate")
    assert len(rows) == 1 + len(trials)
    assert {p.name for p in report.glob("*.png")} >= {
        "optimization_history.png", "param_importances.png", "parallel_coordinate.png"
    }  # fmt: skip
    best = load_pipeline(report / "best.yaml", stage_kinds())
    assert best.sweep is None and best.run.dir == str(run)
    assert best.stage("dpo").beta == study.best_params["stages.dpo.beta"]
    assert "sweep: value = gold_reward_gain (maximize)" in (tmp_path / "second.log").read_text()
