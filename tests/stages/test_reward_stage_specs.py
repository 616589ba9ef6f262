"""One reading of reward specs that name a reward_model stage of the run, shared by GRPO/RLOO's
``rewards``, a rollout stage's ``labeller`` and an eval stage's ``rewards``."""

import json

import pytest

from alignkit.errors import UserError
from alignkit.stages import stage_kinds
from alignkit.stages.common import reward_stage_names, stage_reward_spec


@pytest.fixture
def run_dir(tmp_path):
    for name, kind in (("rm", "reward_model"), ("sft", "sft"), ("gold", "reward_model")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "stage.json").write_text(json.dumps({"kind": kind}))
    return tmp_path


def test_stage_names_with_or_without_prefix_and_weight_become_the_stage_directory(run_dir):
    where = "stages.x.rewards"
    assert stage_reward_spec("rm", run_dir, where) == str(run_dir / "rm")
    assert stage_reward_spec("stage:rm", run_dir, where) == str(run_dir / "rm")
    assert stage_reward_spec("rm*0.25", run_dir, where) == f"{run_dir / 'rm'}*0.25"
    assert stage_reward_spec("stage:rm * 2", run_dir, where) == f"{run_dir / 'rm'}*2"
    # a builtin reward wins over a stage of the same name; stage: reaches the stage
    assert stage_reward_spec("gold*0.5", run_dir, where) == "gold*0.5"
    assert stage_reward_spec("stage:gold", run_dir, where) == str(run_dir / "gold")
    for other in ("length(max=20)", "pkg.mod:fn", "/abs/rm", "nothing_here"):
        assert stage_reward_spec(other, run_dir, where) == other  # the registry judges these


def test_a_stage_of_another_kind_or_a_missing_prefixed_stage_is_refused(run_dir):
    with pytest.raises(UserError, match=r"stages.x.labeller: 'sft' is a sft stage; it must be"):
        stage_reward_spec("sft", run_dir, "stages.x.labeller")
    with pytest.raises(UserError, match=r"no finished reward_model stage 'r_m'.*did you mean 'rm'"):
        stage_reward_spec("stage:r_m", run_dir, "stages.x.rewards")


def test_every_stage_that_reads_rewards_declares_the_same_stages():
    specs = ["gold", "rm*0.5", "stage:rm2", "length(max=20)", "pkg.mod:fn"]
    assert reward_stage_names(specs) == ["rm", "rm2"]
    kinds = stage_kinds()
    configs = {
        "grpo": kinds["grpo"].model_validate(
            {"name": "g", "data": {"source": "x"}, "rewards": specs}
        ),
        "rollout": kinds["rollout"].model_validate(
            {"name": "r", "data": {"source": "x"}, "labeller": specs}
        ),
        "eval": kinds["eval"].model_validate({"name": "e", "rewards": specs}),
    }
    for kind, cfg in configs.items():
        assert [n for n in cfg.uses_stages() if n.startswith("rm")] == ["rm", "rm2"], kind
