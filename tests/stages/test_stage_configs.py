"""Stage configs: a ``train:`` key never silently overrides a typed field, DPO's loss types are
TRL's, and every field says what it does."""

import ast
import dataclasses
import inspect
import re
import textwrap
import typing

import pytest
from pydantic import BaseModel
from trl import DPOConfig

from alignkit.config import validate_pipeline
from alignkit.errors import UserError
from alignkit.rollouts.vllm import VLLMConfig
from alignkit.stages import stage_kinds
from alignkit.stages.dpo import LOSS_TYPES


def test_dpo_loss_types_are_the_ones_trl_documents():
    (field,) = [f for f in dataclasses.fields(DPOConfig) if f.name == "loss_type"]
    documented = field.metadata["help"].split("Possible values are:")[1].split(". ")[0]
    assert tuple(re.findall(r"`'(\w+)'`", documented)) == LOSS_TYPES


@pytest.mark.parametrize(
    ("kind", "extra", "key", "value"),
    [
        ("dpo", {"data": {"source": "builtin:preference"}}, "beta", 0.3),
        ("sft", {"data": {"source": "builtin:sft"}}, "max_length", 64),
        ("orpo", {"data": {"source": "builtin:preference"}}, "beta", 0.2),
        ("grpo", {"data": {"source": "builtin:prompts"}, "rewards": ["gold"]}, "temperature", 0.7),
    ],
)
def test_a_train_key_duplicating_a_stage_field_is_refused_naming_the_field(kind, extra, key, value):
    stage = {"name": kind, "kind": kind, **extra, "train": {key: value, "max_steps": 1}}
    raw = {"stages": [{"name": "sft", "kind": "sft", "data": {"source": "builtin:sft"}}, stage]}
    if kind == "sft":
        raw["stages"] = [stage]
    with pytest.raises(UserError) as e:
        validate_pipeline(raw, stage_kinds())
    assert f"({kind}): 'train.{key}' is set by this stage's '{key}'" in str(e.value)
    assert f"set {key}: {value!r} on the stage instead" in str(e.value)


def config_models(cls, seen=None) -> set[type]:
    """``cls``, its bases and every config block its fields hold, from our own modules."""
    seen = set() if seen is None else seen
    for klass in cls.__mro__:
        if issubclass(klass, BaseModel) and klass.__module__.startswith("alignkit"):
            if klass in seen:
                continue
            seen.add(klass)
            for field in klass.model_fields.values():
                for inner in (field.annotation, *typing.get_args(field.annotation)):
                    if isinstance(inner, type) and issubclass(inner, BaseModel):
                        config_models(inner, seen)
    return seen


def test_every_field_of_every_stage_config_is_documented():
    undocumented = []
    for stage_cls in stage_kinds().values():
        for klass in config_models(stage_cls):
            body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
            for node, after in zip(body, [*body[1:], None], strict=True):
                if not isinstance(node, ast.AnnAssign) or "ClassVar" in ast.unparse(node):
                    continue
                documented = isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                if not documented and node.target.id != "kind":
                    undocumented.append(f"{klass.__name__}.{node.target.id}")
    assert not sorted(set(undocumented)), sorted(set(undocumented))


@pytest.mark.parametrize(
    ("stage", "hints"),
    [
        (
            {"kind": "ppo", "data": {"source": "builtin:prompts"}, "rewards": ["gold"],
             "train": {"max_steps": 5, "learning_rate": 1e-4, "warmup_ratio": 0.1}},
            ["train.max_steps -> steps", "train.learning_rate -> learning_rate",
             "train.warmup_ratio: no such setting"],
        ),
        (
            {"kind": "rollout", "data": {"source": "builtin:prompts"}, "labeller": ["gold"],
             "train": {"max_new_tokens": 8}},
            ["train.max_new_tokens -> sampling.max_new_tokens"],
        ),
        ({"kind": "eval", "train": {"n": 2}}, ["train.n -> n"]),
    ],
)  # fmt: skip
def test_a_train_block_on_a_stage_without_a_trainer_is_refused_naming_the_fields(stage, hints):
    """PPO, rollout and eval stages have no TRL trainer: a ``train:`` block would be read by
    nothing, so it is refused with the stage's own field for each key."""
    sft = {"name": "sft", "kind": "sft", "data": {"source": "builtin:sft"}}
    raw = {"stages": [sft, {"name": stage["kind"], **stage}]}
    with pytest.raises(UserError) as e:
        validate_pipeline(raw, stage_kinds())
    message = str(e.value)
    assert f"a {stage['kind']} stage has no 'train:' block" in message
    for hint in hints:
        assert hint in message


def test_an_adapter_block_a_stage_would_ignore_is_refused():
    """A policy stage with a parent continues the parent's adapter; an RM with ``from_sft``
    continues the SFT adapter: an ``adapter`` block there would be read by nothing."""
    sft = {"name": "sft", "kind": "sft", "data": {"source": "builtin:sft"}}
    lora = {"type": "lora", "r": 4}
    dpo = {"name": "dpo", "kind": "dpo", "data": {"source": "builtin:preference"}, "adapter": lora}
    with pytest.raises(UserError, match="'dpo' continues the adapter of 'sft'"):
        validate_pipeline({"stages": [sft, dpo]}, stage_kinds())
    validate_pipeline({"stages": [dpo]}, stage_kinds())  # no parent: the adapter is the new one
    rm = {"name": "rm", "kind": "reward_model", "data": {"source": "builtin:preference"},
          "from": "sft", "from_sft": True, "adapter": lora}  # fmt: skip
    with pytest.raises(UserError, match="from_sft: true continues"):
        validate_pipeline({"stages": [sft, rm]}, stage_kinds())


def test_vllm_settings_are_one_block_in_every_stage():
    """PPO's and GRPO's ``rollout.vllm`` is the rollout job's ``vllm`` block; the flat keys of
    earlier releases name their new place, and GRPO refuses what TRL's engine does not take."""
    sft = {"name": "sft", "kind": "sft", "data": {"source": "builtin:sft"}}
    ppo = {"name": "ppo", "kind": "ppo", "data": {"source": "builtin:prompts"}, "rewards": ["gold"]}
    rollout = {"engine": "vllm", "vllm": {"enable_sleep_mode": True, "max_lora_rank": 32}}
    cfg = validate_pipeline({"stages": [sft, {**ppo, "rollout": rollout}]}, stage_kinds())
    settings = cfg.stage("ppo").rollout.vllm_config(seed=7)
    assert isinstance(settings, VLLMConfig)
    assert (settings.gpu_memory_utilization, settings.enable_sleep_mode) == (0.3, True)
    assert (settings.max_lora_rank, settings.seed) == (32, 7)
    with pytest.raises(UserError, match=r"rollout.vllm.enable_sleep_mode instead of rollout.sleep"):
        validate_pipeline({"stages": [sft, {**ppo, "rollout": {"sleep": True}}]}, stage_kinds())
    grpo = {"name": "grpo", "kind": "grpo", "data": {"source": "builtin:prompts"},
            "rewards": ["gold"], "rollout": {"vllm": {"enforce_eager": True}}}  # fmt: skip
    with pytest.raises(UserError, match="TRL's colocated vLLM engine takes only .*enforce_eager"):
        validate_pipeline({"stages": [sft, grpo]}, stage_kinds())


@pytest.mark.parametrize(
    ("stage", "refused"),
    [
        (
            {"kind": "grpo", "rewards": ["gold"], "data": {"max_eval_rows": 64}},
            "data.max_eval_rows",
        ),
        (
            {"kind": "ppo", "rewards": ["gold"], "data": {"eval_source": "x.jsonl"}},
            "data.eval_source",
        ),
        ({"kind": "rollout", "data": {"eval_split": "test"}}, "data.eval_split"),
        ({"kind": "grpo", "rewards": ["gold"], "data": {"group_by": "prompt"}}, "data.group_by"),
    ],
)
def test_held_out_data_keys_a_prompt_stage_never_reads_are_refused(stage, refused):
    """Stages that sample prompts read data.source/split; their held-out prompts are
    heldout.prompts, so data.eval_* would be ignored."""
    sft = {"name": "sft", "kind": "sft", "data": {"source": "builtin:sft"}}
    data = {"source": "builtin:prompts", **stage["data"]}
    raw = {"stages": [sft, {**stage, "name": stage["kind"], "data": data}]}
    with pytest.raises(UserError, match=f"{refused}: not read by a {stage['kind']} stage"):
        validate_pipeline(raw, stage_kinds())


@pytest.mark.parametrize(
    ("kind", "data", "message"),
    [
        ("rollout", {"clean": {}}, "clean them first (alignkit data clean"),
        ("dpo", {"eval_split": "test", "stratify_by": "category"}, "with eval_source/eval_split"),
        ("dpo", {"clean": {"min_length": 9, "max_length": 3}}, "min_length 9 > max_length 3"),
        ("dpo", {"clean": {"near_dup_treshold": 0.9}}, "did you mean 'near_dup_threshold'"),
    ],
)
def test_data_clean_and_split_keys_are_checked_at_load(kind, data, message):
    source = {"rollout": "builtin:prompts", "dpo": "builtin:preference"}[kind]
    stages = [{"name": "sft", "kind": "sft", "data": {"source": "builtin:sft"}}]
    stages.append({"name": kind, "kind": kind, "data": {"source": source, **data}})
    with pytest.raises(UserError, match=re.escape(message)):
        validate_pipeline({"stages": stages}, stage_kinds())
