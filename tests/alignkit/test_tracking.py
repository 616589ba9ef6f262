"""``run.report_to``: a tiny pipeline (sft -> reward_model -> dpo and ppo -> compare, the
``tracked_run`` fixture) logs every stage to the run's trackers under its name; read back with
each tracker's own reader."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from alignkit.config import validate_pipeline
from alignkit.errors import UserError
from alignkit.stages import stage_kinds

HAS = {name: importlib.util.find_spec(name) is not None for name in ("wandb", "mlflow")}
STAGES = ("sft", "rm", "dpo", "ppo", "compare")


def test_tensorboard_has_every_stage_under_its_name(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = tracked_run / "tracking" / "tensorboard"
    assert sorted(p.name for p in root.iterdir()) == sorted(STAGES)
    tags = {}
    for stage in STAGES:
        events = EventAccumulator(str(root / stage), size_guidance={"tensors": 0})
        events.Reload()
        tags[stage] = set(events.Tags()["scalars"]), set(events.Tags()["tensors"]), events
    # the TRL stages through transformers' TensorBoard callback: training and eval logs
    assert {"train/loss", "eval/loss"} <= tags["sft"][0]
    assert {"train/loss", "train/rewards/margins"} <= tags["dpo"][0]
    assert "train/loss" in tags["rm"][0]
    # our PPO: the same metrics as its metrics.jsonl, every step
    ppo_scalars, ppo_text, ppo_events = tags["ppo"]
    rows = [json.loads(x) for x in (tracked_run / "ppo" / "metrics.jsonl").read_text().splitlines()]
    for key in ("score_mean", "kl", "policy_loss", "value_loss", "kl_coef"):
        logged = ppo_events.Scalars(f"train/{key}")
        assert [e.step for e in logged] == [r["step"] for r in rows]
        assert [e.value for e in logged] == pytest.approx([r[key] for r in rows], rel=1e-5)
    # health checks as scalars and trips as text; the probe's samples as text; final metrics
    for stage in ("dpo", "ppo"):
        scalars, text, _ = tags[stage]
        assert {"health/kl", "health/length", "health/trip/kl_limit"} <= scalars
        assert {"health/trips/text_summary", "samples/text_summary"} <= text
        assert {"final/gold_reward", "final/kl_ref", "final/gold_reward_gain_ci_low"} <= scalars
    assert "final/heldout_nll" in tags["sft"][0]
    assert {"final/ppo/gold/win_rate", "final/ppo/kl"} <= tags["compare"][0]  # the comparison
    assert "final/heldout_pairwise_accuracy" in tags["rm"][0]
    stage_json = json.loads((tracked_run / "ppo" / "stage.json").read_text())
    final = ppo_events.Scalars("final/gold_reward")[-1].value
    assert final == pytest.approx(stage_json["metrics"]["gold_reward"], rel=1e-6)


def wandb_records(path):
    """The protobuf records of an offline ``run-*.wandb`` file (wandb >= 0.2x has no Python
    reader: LevelDB's log format, 32 KiB blocks, 7-byte record headers after a 7-byte header)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, pos, parts = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        parts = chunk if kind in (1, 2) else parts + chunk  # full/first start a record
        if kind in (1, 4):  # full/last end one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record


@pytest.mark.skipif(not HAS["wandb"], reason="wandb is not installed (pip install wandb)")
def test_wandb_offline_runs_are_grouped_by_run_and_named_by_stage(tracked_run):
    runs = {}
    for path in (tracked_run / "tracking" / "wandb").glob("offline-run-*/run-*.wandb"):
        info, logged = None, set()
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                info = record.run
            elif kind == "history":
                logged |= {i.key or "/".join(i.nested_key) for i in record.history.item}
        runs[info.display_name] = (info.run_group, info.job_type, logged)
    assert sorted(runs) == sorted(STAGES)
    assert {group for group, _, _ in runs.values()} == {"tracked"}
    assert runs["rm"][1] == "reward_model"
    assert {"train/score_mean", "train/kl", "health/kl", "final/gold_reward"} <= runs["ppo"][2]
    assert {"train/loss", "health/kl"} <= runs["dpo"][2]
    assert {"samples/nrows", "health/trips/nrows"} <= runs["dpo"][2]  # tables


@pytest.mark.skipif(not HAS["mlflow"], reason="mlflow is not installed (pip install mlflow-skinny)")
def test_mlflow_file_store_has_one_parent_run_and_a_nested_run_per_stage(tracked_run):
    from mlflow import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient((tracked_run / "tracking" / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("tracked")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    stages = {r.info.run_name: r for r in runs if r not in parents}
    assert sorted(stages) == sorted(STAGES)
    assert {r.data.tags["mlflow.parentRunId"] for r in stages.values()} == {parents[0].info.run_id}
    ppo = stages["ppo"]
    history = client.get_metric_history(ppo.info.run_id, "train/score_mean")
    assert [m.step for m in history] == [1, 2]
    assert {"health/kl", "health/trip.kl_limit", "final/gold_reward"} <= set(ppo.data.metrics)
    assert {"final/ppo.gold.win_rate", "final/ppo.gold.win_rate.ci_low"} <= set(
        stages["compare"].data.metrics
    )
    assert {"loss", "eval_loss", "final/heldout_nll"} <= set(stages["sft"].data.metrics)


def test_report_to_accepts_one_name_or_none_and_refuses_others(tmp_path, tiny_pipeline_cfg):
    raw = tiny_pipeline_cfg(tmp_path)
    for given, expected in (("tensorboard", ["tensorboard"]), ("none", []), ([], [])):
        raw["run"]["report_to"] = given
        assert validate_pipeline(raw, stage_kinds()).run.report_to == expected
    raw["run"]["report_to"] = ["tensorbord"]
    with pytest.raises(UserError, match="report_to"):
        validate_pipeline(raw, stage_kinds())


def test_a_stage_cannot_be_named_like_the_tracking_dir(tmp_path, tiny_pipeline_cfg):
    raw = tiny_pipeline_cfg(tmp_path)
    raw["stages"][0]["name"] = "tracking"
    with pytest.raises(UserError, match="taken by the run directory"):
        validate_pipeline(raw, stage_kinds())


def test_a_resumed_stage_replaces_what_tensorboard_got_after_its_checkpoint(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from alignkit.tracking import open_stage_tracker

    def attempt(first_step: int, value: float, resume_step: int | None) -> None:
        tracker = open_stage_tracker(["tensorboard"], None, tmp_path, "r", "ppo", "ppo", {},
                                     True, resume_step)  # fmt: skip
        for step in range(first_step, 5):
            tracker.log({"kl": value}, step)
        tracker.close()

    attempt(1, 0.0, None)  # killed after step 4; its last checkpoint was step 2
    attempt(3, 1.0, 2)  # resumed from checkpoint-2: steps 3 and 4 run again
    events = EventAccumulator(str(tmp_path / "tracking" / "tensorboard" / "ppo"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/kl")] == [
        (1, 0.0), (2, 0.0), (3, 1.0), (4, 1.0)
    ]  # fmt: skip
