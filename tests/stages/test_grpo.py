"""GRPO and RLOO from an SFT stage: the reference is the SFT policy, only the policy moves."""

import json
import os

import pytest
import torch
from rich.console import Console
from trl.trainer.utils import get_callable_name, use_adapter

from alignkit.config import ModelSpec, validate_pipeline
from alignkit.errors import UserError
from alignkit.models import load_stage_model
from alignkit.pipeline import run_pipeline
from alignkit.rewards.gold import gold_reward
from alignkit.stages import REGISTRY, grpo, stage_kinds
from alignkit.stages.common import check_vllm
from alignkit.stages.grpo import GRPOStageConfig, NamedReward, reward_functions

BATCH = ["Topic: river garden", "Topic: school music the bright calm"]
SPEC = ModelSpec(name="builtin:tiny")


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_pipeline_cfg):
    run_dir = tmp_path_factory.mktemp("rl")
    raw = tiny_pipeline_cfg(run_dir, steps=6)
    run_pipeline(validate_pipeline(raw, stage_kinds()), REGISTRY, run_dir, Console(quiet=True))
    return raw


def rl_stage(kind: str, name: str, heldout: dict, **extra) -> dict:
    return {
        "name": name,
        "kind": kind,
        "data": {"source": "builtin:prompts", "split": "train", "max_rows": 32},
        "rewards": ["gold"],
        "num_generations": 4,
        "max_completion_length": 16,
        "train": {
            "max_steps": 3,
            "per_device_train_batch_size": 8,
            "learning_rate": 1e-3,
            "logging_steps": 1,
        },
        "heldout": heldout,
        **extra,
    }


def logits(model, tok):
    enc = tok(BATCH, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits.float()


def same_bits(a, b):
    return torch.equal(a.detach().view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize(
    ("kind", "name", "beta"), [("grpo", "grpo", None), ("rloo", "rloo", None), ("grpo", "b0", 0.0)]
)
def test_rl_stage_trains_policy_against_the_sft_reference(kind, name, beta, sft_run, monkeypatch):
    run_dir = sft_run["run"]["dir"]
    sft_dir = f"{run_dir}/sft"
    seen = {}
    build = grpo.build_trainer

    def inspect_then_train(cfg, ctx):  # the handoff, checked before TRL trains
        trainer, tok, *rest = build(cfg, ctx)
        model = trainer.model
        seen.update(trainer=trainer, adapters=set(model.peft_config))
        model.eval()
        sft_logits = logits(load_stage_model(sft_dir, SPEC)[0], tok)
        with use_adapter(model, None):
            seen["base_vs_sft"] = (logits(model, tok) - sft_logits).abs().max().item()
        if "ref" in model.peft_config:
            with use_adapter(model, "ref"):
                seen["ref_vs_sft"] = (logits(model, tok) - sft_logits).abs().max().item()
        seen["policy_vs_sft"] = (logits(model, tok) - sft_logits).abs().max().item()
        seen["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        model.train()
        return trainer, tok, *rest

    monkeypatch.setattr(grpo, "build_trainer", inspect_then_train)
    heldout = sft_run["stages"][0]["heldout"]  # the SFT's: its samples are our reference's
    stage_raw = rl_stage(kind, name, heldout, **({} if beta is None else {"beta": beta}))
    raw = {**sft_run, "stages": [*sft_run["stages"], stage_raw]}
    decisions = run_pipeline(
        validate_pipeline(raw, stage_kinds()), REGISTRY, run_dir, Console(quiet=True)
    )
    assert [d.action for d in decisions] == ["skip", "run"]

    # TRL added a frozen "ref" adapter equal to the SFT stage, not the base (none at beta 0)
    assert seen["adapters"] == ({"default"} if beta == 0 else {"default", "ref"})
    assert seen["base_vs_sft"] > 1e-3
    assert seen["policy_vs_sft"] < 1e-5
    assert seen.get("ref_vs_sft", 0.0) < 1e-5
    # RL sampling: no top-k truncation (HF generate's default is top-50)
    assert seen["trainer"].generation_config.top_k == 0

    # after training: base and ref bit-identical, the policy adapter moved, optimizer held only it
    model, before = seen["trainer"].model, seen["params"]
    changed = [
        n for n, p in model.named_parameters() if n in before and not same_bits(p, before[n])
    ]
    assert changed and all(".default." in n for n in changed), changed
    assert any("lora_B" in n for n in changed)
    held = {id(p) for g in seen["trainer"].optimizer.param_groups for p in g["params"]}
    assert {n for n, p in model.named_parameters() if id(p) in held} == {
        n for n in before if ".default." in n and "lora_" in n
    }

    # stage.json: TRL's training metrics and the held-out ones; the held-out reference is the
    # SFT policy (same prompts and seed as the SFT stage's own held-out samples, same gold)
    metrics = json.loads(open(f"{run_dir}/{name}/stage.json").read())["metrics"]
    sft_metrics = json.loads(open(f"{sft_dir}/stage.json").read())["metrics"]
    for key in ("train_reward", "rewards/gold/mean", "completions/mean_length", "kl_ref"):
        assert key in metrics, key
    assert ("kl" in metrics) == (beta != 0)
    assert metrics["global_step"] == 3
    assert metrics["gold_reward_ref"] == pytest.approx(sft_metrics["gold_reward"], abs=1e-9)
    assert metrics["reward_ref"] == metrics["gold_reward_ref"]  # it trained on gold alone
    lines = [json.loads(x) for x in open(f"{run_dir}/{name}/metrics.jsonl")]
    assert len([x for x in lines if "reward" in x]) == 3

    # only the trained adapter is saved, and it reloads to the trained policy
    assert not os.path.exists(f"{run_dir}/{name}/adapter/ref")
    reloaded, tok = load_stage_model(f"{run_dir}/{name}", SPEC)
    model.eval()
    with use_adapter(model, "default"):
        assert (logits(reloaded, tok) - logits(model, tok)).abs().max() < 1e-5


def test_config_refuses_trainer_options_the_stage_owns():
    base = {"name": "grpo", "data": {"source": "builtin:prompts"}, "rewards": ["gold"]}
    with pytest.raises(ValueError, match="'train.beta' is set by this stage's 'beta'"):
        GRPOStageConfig.model_validate({**base, "train": {"beta": 0.1}})
    with pytest.raises(ValueError, match="did you mean 'num_iterations'"):
        GRPOStageConfig.model_validate({**base, "train": {"num_iteration": 2}})
    with pytest.raises(ValueError, match="held-out prompts go in heldout.prompts"):
        GRPOStageConfig.model_validate({**base, "data": {"source": "x", "eval_split": "test"}})
    assert GRPOStageConfig.model_validate(base).beta > 0  # never TRL's "no reference" default


def test_reward_specs_resolve_with_weights_and_stage_names(tmp_path):
    reward = reward_functions(["gold", "length*0.2"], tmp_path, "stages.grpo")
    assert [(n, w) for n, _, w in reward.components] == [("gold", 1.0), ("length", 0.2)]
    sample = {"prompts": ["Topic: river"], "completions": ["the river is bright."]}
    gold = reward.components[0][1]
    assert NamedReward("gold", gold)(**sample) == gold_reward(**sample)
    assert get_callable_name(NamedReward("length", reward.components[1][1])) == "length"
    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "stage.json").write_text('{"kind": "reward_model"}')
    with pytest.raises(UserError, match=r"rewards\[1\]: 'stage:r_m': no finished.*there: rm"):
        reward_functions(["gold", "stage:r_m"], tmp_path, "stages.grpo")
    with pytest.raises(UserError, match=r"rewards\[0\]: 'gld': unknown reward.*'gold'.*: rm"):
        reward_functions(["gld"], tmp_path, "stages.grpo")


def test_vllm_engine_is_refused_up_front_without_vllm(tmp_path, monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="rollout.engine: vllm is not installed"):
        check_vllm("stages.grpo")
