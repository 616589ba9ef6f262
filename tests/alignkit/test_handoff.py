"""The stage hand-off: a finished stage read once, found by name and kind, its parent checked."""

import json

import pytest
from rich.console import Console

from alignkit.config import AdapterSpec, ModelSpec
from alignkit.errors import UserError
from alignkit.handoff import ADAPTER_DIR, StageOutput, find_stage, run_stages
from alignkit.pipeline import StageContext
from alignkit.rundir import STAGE_FILE


def finished(run_dir, name, kind, **record):
    stage = run_dir / name
    (stage / ADAPTER_DIR).mkdir(parents=True)
    base = {"name": "builtin:tiny", "dtype": "float32"}
    full = {"kind": kind, "adapter_type": "lora", "base_model": base, **record}
    (stage / STAGE_FILE).write_text(json.dumps(full))
    return stage


def test_a_finished_stage_is_read_once_with_what_the_next_stage_needs(tmp_path):
    stage = StageOutput.read(finished(tmp_path, "sft", "sft", quantization="4bit"))
    assert (stage.name, stage.kind, stage.adapter_type) == ("sft", "sft", "lora")
    assert stage.weights_dir == stage.adapter_dir == tmp_path / "sft" / ADAPTER_DIR
    assert stage.base == ModelSpec(name="builtin:tiny", dtype="float32", quantization="4bit")
    assert stage.is_policy and stage.tokenizer_dir == tmp_path / "sft"
    assert not StageOutput.read(finished(tmp_path, "rm", "reward_model")).is_policy
    assert not StageOutput.read(finished(tmp_path, "e", "eval", is_policy=False)).is_policy
    (tmp_path / ".x.partial").mkdir()
    assert StageOutput.read(tmp_path / ".x.partial") is None  # not finished
    assert [s.name for s in run_stages(tmp_path, ("reward_model",))] == ["rm"]


def test_a_stage_is_found_by_name_and_kind_with_a_did_you_mean(tmp_path):
    finished(tmp_path, "rm", "reward_model")
    finished(tmp_path, "sft", "sft")
    assert find_stage(tmp_path, "rm", ("reward_model",), "stages.ppo.reward_model").kind == (
        "reward_model"
    )
    with pytest.raises(UserError, match=r"stages.ppo.reward_model: no finished reward_model "
                       r"stage 'r_m' .*did you mean 'rm'.*stages there: rm$"):  # fmt: skip
        find_stage(tmp_path, "r_m", ("reward_model",), "stages.ppo.reward_model")
    with pytest.raises(UserError, match="'sft' is a sft stage; it must be reward_model"):
        find_stage(tmp_path, "sft", ("reward_model",), "x")
    for outside in ("../sft", ".hidden", ""):
        with pytest.raises(UserError, match="is not a stage name of this run"):
            find_stage(tmp_path, outside, ("sft",), "x")


@pytest.mark.parametrize(
    ("parent", "required", "error"),
    [
        ("sft", False, None),
        (None, False, None),
        (None, True, r"stages.s.from: orpo starts from a policy stage; set `from:`"),
        ("rm", False, r"stages.s.from: orpo starts from a policy stage, not 'rm' \(a reward_model"),
    ],
)
def test_every_policy_stage_checks_its_parent_the_same_way(tmp_path, parent, required, error):
    finished(tmp_path, "rm", "reward_model")
    finished(tmp_path, "sft", "sft")
    ctx = StageContext(
        name="s",
        model=ModelSpec(),
        adapter=AdapterSpec(),
        seed=0,
        out_dir=tmp_path / ".s.partial",
        parent=StageOutput.read(tmp_path / parent) if parent else None,
        resume_from=None,
        console=Console(quiet=True),
    )
    if error is None:
        found = ctx.require_policy_parent("orpo", required)
        assert (found.name if found else None) == parent
    else:
        with pytest.raises(UserError, match=error):
            ctx.require_policy_parent("orpo", required)
