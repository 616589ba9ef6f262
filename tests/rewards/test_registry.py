"""Naming rewards: gold, rules with parameters, module:function, reward-model dirs, weights."""

from __future__ import annotations

import json
import pickle

import pytest

from alignkit.errors import UserError
from alignkit.rewards import resolve_reward, resolve_rewards
from alignkit.rewards.gold import gold_reward

PROMPTS = ["Topic: river garden", "Topic: city"]
COMPLETIONS = ["the river is calm and bright and happy today in the garden.", "bad bad bad"]


def brevity(prompts, completions, **meta):
    return [-len(c) / 100 for c in completions]


def test_gold_and_rules_resolve():
    assert resolve_reward("gold") == ("gold", gold_reward)
    name, fn = resolve_reward("length(max_words=3, per_word=0.5)")
    assert name == "length(max_words=3, per_word=0.5)"
    assert fn(PROMPTS, COMPLETIONS) == [-1.0, 0.0]
    assert resolve_reward("eos")[1](PROMPTS, COMPLETIONS, finish_reason=["stop", "length"]) == [
        1,
        0,
    ]
    assert pickle.loads(pickle.dumps(fn))(PROMPTS, COMPLETIONS) == [-1.0, 0.0]


def test_module_function(monkeypatch):
    import sys

    module = type(sys)("my_rewards")
    module.brevity, module.PROMPTS = brevity, PROMPTS
    monkeypatch.setitem(sys.modules, "my_rewards", module)
    name, fn = resolve_reward("my_rewards:brevity")
    assert name == "my_rewards:brevity" and fn(PROMPTS, ["abc"] * 2) == [-0.03, -0.03]
    with pytest.raises(UserError, match="has no 'brevty' \\(did you mean 'brevity'\\?\\)"):
        resolve_reward("my_rewards:brevty")
    with pytest.raises(UserError, match="cannot import module 'no_such_module_xyz'"):
        resolve_reward("no_such_module_xyz:f")
    with pytest.raises(UserError, match="not a function"):
        resolve_reward("my_rewards:PROMPTS")


@pytest.mark.parametrize(
    "spec,message",
    [
        ("gld", "did you mean 'gold'"),
        ("lenght", "did you mean 'length'"),
        ("no_such_reward", "unknown reward"),
        ("length(foo=1)", "no parameter 'foo'; its parameters: min_words, max_words, per_word"),
        ("length(max_words=)", "cannot read the parameters"),
        ("length(__import__('os'))", "cannot read the parameters"),
        ("format", "missing a required argument: 'pattern'"),
        ("./no/such/rm", "no such directory"),
    ],
)
def test_bad_specs_are_user_errors(spec, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_reward(spec)


def test_directories_that_are_not_reward_models_are_refused(tmp_path):
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"]}))
    with pytest.raises(UserError, match="not a reward model"):
        resolve_reward(str(policy))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"task_type": "CAUSAL_LM"}))
    with pytest.raises(UserError, match="task_type 'CAUSAL_LM'"):
        resolve_reward(str(adapter))


def test_a_reward_model_dir_goes_to_the_scorer(tmp_path, monkeypatch):
    import alignkit.rewards.reward_model as rm

    calls = []
    monkeypatch.setattr(
        rm.RewardModelScorer, "from_path", classmethod(lambda cls, p: calls.append(p) or brevity)
    )
    stage = tmp_path / "rm"
    stage.mkdir()
    (stage / "stage.json").write_text(json.dumps({"kind": "reward_model"}))
    name, fn = resolve_reward(str(stage))
    assert name == str(stage) and fn is brevity and calls == [stage]


def test_weighted_sum_keeps_components():
    combined = resolve_rewards(["gold", "length(max_words=3)*0.5", ("punctuation", 2.0)])
    assert combined.names == ["gold", "length(max_words=3)", "punctuation"]
    scores = combined.score(PROMPTS, COMPLETIONS)
    gold = gold_reward(PROMPTS, COMPLETIONS)
    assert scores["gold"] == gold
    expected = [
        g + 0.5 * ln + 2.0 * p
        for g, ln, p in zip(gold, scores["length(max_words=3)"], scores["punctuation"], strict=True)
    ]
    assert combined(PROMPTS, COMPLETIONS) == pytest.approx(expected)
    assert combined.__name__ == "gold+0.5*length(max_words=3)+2*punctuation"
    # a '*' inside parameters is not a weight
    assert resolve_rewards(["format(pattern='a*b')"]).components[0][2] == 1.0
    with pytest.raises(UserError, match="the same reward named twice"):
        resolve_rewards(["gold", "gold*2"])


def test_a_reward_returning_the_wrong_number_of_values_is_caught(monkeypatch):
    import sys

    module = type(sys)("short_rewards")
    module.short = lambda prompts, completions, **meta: [1.0]
    monkeypatch.setitem(sys.modules, "short_rewards", module)
    with pytest.raises(ValueError, match="returned 1 values for 2 completions"):
        resolve_rewards(["short_rewards:short"])(PROMPTS, COMPLETIONS)
