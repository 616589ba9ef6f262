"""evaluate_policy: the held-out metrics every policy stage records, in its three layouts."""

import copy

import pytest
from peft import LoraConfig, get_peft_model

from alignkit.config import HeldoutSpec, ModelSpec
from alignkit.eval import AdapterView, evaluate_policy
from alignkit.models import load_stage_model

SPEC = HeldoutSpec(num_prompts=16, samples_per_prompt=2, max_new_tokens=24)
KEYS = {"gold_reward", "gold_reward_ref", "reward", "reward_ref", "kl_ref", "kl_ref_per_token"}


def lora_with_ref_copy(base):
    """As TRL leaves DPO/GRPO: 'default' and a 'ref' adapter holding a copy of it."""
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    model = get_peft_model(copy.deepcopy(base), config)
    model.add_adapter("ref", config)
    params = dict(model.named_parameters())
    for name, p in params.items():
        if ".default." in name:
            if "lora_B" in name:
                p.data.normal_(0, 0.05)
            params[name.replace(".default.", ".ref.")].data.copy_(p.data)
    return model


@pytest.mark.parametrize("layout", ["default_and_ref", "same_view", "two_models"])
def test_policy_equal_to_reference_has_zero_kl_and_equal_gold(tiny, layout):
    base, tokenizer = tiny
    if layout == "two_models":
        policy, reference = AdapterView(base), AdapterView(copy.deepcopy(base))
    else:
        model = lora_with_ref_copy(base)
        policy = AdapterView(model, "default")
        reference = AdapterView(model, "ref" if layout == "default_and_ref" else "default")
    m = evaluate_policy(policy, reference, tokenizer, SPEC, "builtin:prompts", has_gold=True)
    assert KEYS <= set(m)
    assert abs(m["kl_ref"]) < 1e-5 and abs(m["kl_ref_per_token"]) < 1e-5
    assert m["gold_reward"] == m["gold_reward_ref"]
    assert m["reward"] == m["gold_reward"]  # no rewards configured: the gold reward
    assert m["heldout_prompts"] == 16 and 0 < m["response_length"] <= 24


def test_trained_sft_adapter_drifts_from_base_and_gains_on_its_reward(trained_run):
    model, tokenizer = load_stage_model(trained_run / "sft", ModelSpec())
    spec = SPEC.model_copy(update={"rewards": ["length(max_words=12)"]})
    m = evaluate_policy(
        AdapterView(model, "default"),
        AdapterView.base_of(model),
        tokenizer,
        spec,
        "builtin:prompts",
        True,
    )
    assert m["kl_ref"] > 1.0 and m["kl_ref_per_token"] > 0.05
    gain = m["reward"] - m["reward_ref"]  # the configured rule: SFT's answers are shorter
    assert gain > 0 and m["reward_gain_ci_low"] < gain < m["reward_gain_ci_high"]
    gold = m["gold_reward"] - m["gold_reward_ref"]  # recorded too, with its CI
    assert m["gold_reward_gain_ci_low"] <= gold <= m["gold_reward_gain_ci_high"]
    assert m["reward"] != m["gold_reward"]  # the configured rule, not gold
    assert m["eos_rate"] >= m["eos_rate_ref"]


def test_nothing_to_evaluate_gives_no_metrics(tiny):
    base, tokenizer = tiny
    view = AdapterView(base)
    assert evaluate_policy(view, view, tokenizer, SPEC, None, has_gold=True) == {}
    off = SPEC.model_copy(update={"enabled": False})
    assert evaluate_policy(view, view, tokenizer, off, "builtin:prompts", has_gold=True) == {}
