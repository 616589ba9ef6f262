"""The runner's skip / run / re-run / resume decisions, with a fake stage kind (no training)."""

import json
from typing import ClassVar, Literal

import pytest
from rich.console import Console

from alignkit.config import StageBase, validate_pipeline
from alignkit.errors import UserError
from alignkit.pipeline import StageKind, plan, run_pipeline
from alignkit.rundir import RunDir

CALLS: list[str] = []


class FakeConfig(StageBase):
    kind: Literal["fake"] = "fake"
    is_policy: ClassVar[bool] = True
    default_parent: ClassVar[bool] = True
    value: int = 0
    fail: bool = False


def fake_run(cfg, ctx):
    from alignkit.pipeline import StageResult

    CALLS.append(cfg.name)
    (ctx.out_dir / "weights.txt").write_text(str(cfg.value))
    if cfg.fail:
        raise RuntimeError("boom")
    return StageResult(metrics={"value": float(cfg.value)}, adapter_type="lora")


REGISTRY = {"fake": StageKind(FakeConfig, fake_run)}


def cfg(a=1, b=2, c=3, fail_b=False):
    raw = {
        "stages": [
            {"name": "a", "kind": "fake", "value": a},
            {"name": "b", "kind": "fake", "value": b, "fail": fail_b},
            {"name": "c", "kind": "fake", "value": c, "from": "a"},
        ]
    }
    return validate_pipeline(raw, {"fake": FakeConfig})


@pytest.fixture(autouse=True)
def _clear():
    CALLS.clear()


def test_run_writes_stage_json_and_manifest(tmp_path):
    console = Console(record=True, width=100)
    run_pipeline(cfg(), REGISTRY, tmp_path, console)
    assert CALLS == ["a", "b", "c"]
    rd = RunDir(tmp_path)
    rec = rd.stage_json("b")
    assert rec["parent"] == "a" and rec["metrics"] == {"value": 2.0} and rec["kind"] == "fake"
    assert {"torch", "trl", "peft", "transformers"} <= set(rec["versions"])
    assert rd.stage_json("c")["parent"] == "a"  # explicit from
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [s["status"] for s in manifest["stages"]] == ["complete"] * 3
    assert not list(tmp_path.glob(".*partial"))
    seconds = [s["seconds"] for s in manifest["stages"]]  # each stage's time, also at the end
    assert all(s >= 0 for s in seconds) and rec["seconds"] == seconds[1]
    times = console.export_text().split("stage times")[1]
    assert all(name in times for name in "abc") and "total" in times


def test_rerun_skips_everything(tmp_path):
    run_pipeline(cfg(), REGISTRY, tmp_path)
    CALLS.clear()
    decisions = run_pipeline(cfg(), REGISTRY, tmp_path)
    assert CALLS == []
    assert [d.action for d in decisions] == ["skip"] * 3


def test_changed_stage_reruns_it_and_its_descendants_only(tmp_path):
    run_pipeline(cfg(), REGISTRY, tmp_path)
    CALLS.clear()
    decisions = run_pipeline(cfg(b=20), REGISTRY, tmp_path)
    assert CALLS == ["b"]
    assert decisions[1].action == "rerun" and "config changed" in decisions[1].reason
    assert (tmp_path / "b" / "weights.txt").read_text() == "20"
    CALLS.clear()
    decisions = run_pipeline(cfg(a=10, b=20), REGISTRY, tmp_path)
    assert CALLS == ["a", "b", "c"]
    assert [d.action for d in decisions] == ["rerun"] * 3
    assert (
        "upstream stage 'a'" in decisions[1].reason and "upstream stage 'a'" in decisions[2].reason
    )


def test_failed_stage_leaves_no_output_and_previous_output_intact(tmp_path):
    run_pipeline(cfg(), REGISTRY, tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        run_pipeline(cfg(b=5, fail_b=True), REGISTRY, tmp_path)
    # the old complete output of b is untouched; the failed attempt stays partial
    assert (tmp_path / "b" / "weights.txt").read_text() == "2"
    assert RunDir(tmp_path).stage_json("b")["metrics"] == {"value": 2.0}
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["stages"][1]["status"] == "failed"


def test_interrupted_stage_with_checkpoint_resumes(tmp_path):
    c = cfg()
    rd = RunDir(tmp_path)
    h = plan(c, rd)[0].hash
    partial = rd.begin_stage("a", h, resume=False)
    ck = partial / "checkpoints" / "checkpoint-20"
    ck.mkdir(parents=True)
    (ck / "trainer_state.json").write_text("{}")
    (partial / "checkpoints" / "checkpoint-10").mkdir()
    decisions = plan(c, rd)
    assert decisions[0].action == "resume" and "checkpoint-20" in decisions[0].reason
    # a checkpoint from another config is not resumed
    c2 = cfg(a=99)
    assert plan(c2, rd)[0].action == "run"


class ReaderConfig(FakeConfig):
    kind: Literal["reader"] = "reader"
    reads: str | None = None

    def uses_stages(self):
        return [self.reads] if self.reads else []


def test_a_stage_that_reads_another_reruns_with_it(tmp_path):
    registry = {**REGISTRY, "reader": StageKind(ReaderConfig, fake_run)}
    kinds = {"fake": FakeConfig, "reader": ReaderConfig}

    def c(rm_value):
        raw = {"stages": [
            {"name": "sft", "kind": "fake", "value": 1},
            {"name": "rm", "kind": "fake", "value": rm_value, "from": None},
            {"name": "ppo", "kind": "reader", "from": "sft", "reads": "rm"},
        ]}  # fmt: skip
        return validate_pipeline(raw, kinds)

    run_pipeline(c(1), registry, tmp_path)
    CALLS.clear()
    decisions = run_pipeline(c(2), registry, tmp_path)
    assert CALLS == ["rm", "ppo"]
    assert "upstream stage 'rm' re-runs" in decisions[2].reason
    bad = {
        "stages": [{"name": "ppo", "kind": "reader", "reads": "rm"}, {"name": "rm", "kind": "fake"}]
    }
    with pytest.raises(UserError, match="uses stage 'rm', which must come before it"):
        validate_pipeline(bad, kinds)
