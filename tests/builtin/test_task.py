"""The builtin synthetic task: deterministic rows, disjoint splits, a gold reward that ranks."""

from __future__ import annotations

import statistics

import pytest

from alignkit.builtin import load_builtin, task
from alignkit.errors import UserError
from alignkit.rewards.gold import gold_reward


def _gold(prompt: str, completion: str) -> float:
    return gold_reward([prompt], [completion])[0]


def test_rows_are_deterministic_and_shaped():
    task._sft_rows.cache_clear()
    first = task.sft("train", 50)
    task._sft_rows.cache_clear()
    assert task.sft("train", 50) == first
    assert task.sft("train", 20) == first[:20]  # a smaller n is a prefix
    user, assistant = first[0]["messages"]
    assert user["role"] == "user" and user["content"].startswith("Topic: ")
    assert assistant["role"] == "assistant" and assistant["content"]
    assert task.pretraining_texts(5, seed=3) == task.pretraining_texts(5, seed=3)
    assert task.pretraining_texts(5, seed=3) != task.pretraining_texts(5, seed=4)


def test_default_sizes():
    assert len(load_builtin("sft", "test")) == 1000
    assert len(load_builtin("preference", "test")) == 1000
    assert len(load_builtin("prompts")) == 4096
    assert len(load_builtin("prompts", "test")) == 256
    assert set(load_builtin("prompts", "test")[0]) == {"prompt"}


def test_train_and_test_prompts_are_disjoint():
    train = {row["prompt"] for row in task.prompts("train")}
    train |= {row["messages"][0]["content"] for row in task.sft("train", 5000)}
    test = {row["prompt"] for row in task.prompts("test")}
    test |= {row["messages"][0]["content"] for row in task.sft("test")}
    assert len(test) > 500
    assert not train & test


def test_gold_reward_ranks_content_then_format():
    prompt = "Topic: river garden"
    positive = "the river is lovely and warm and bright with a calm garden."
    negative = "the river is awful and cold and dark with a grim garden."
    assert len(positive[:-1].split()) == 12
    assert _gold(prompt, positive) > 0.4
    assert _gold(prompt, positive) - _gold(prompt, negative) > 0.3
    # format terms are small: dropping the "." or the topic costs less than the sentiment flip
    assert _gold(prompt, positive) > _gold(prompt, positive[:-1]) > _gold(prompt, negative)
    off_topic = positive.replace("river", "lake").replace("garden", "forest")
    assert 0 < _gold(prompt, positive) - _gold(prompt, off_topic) < 0.3
    # length band, invalid words (a "." mid-text included), garbage, empty
    assert _gold(prompt, "lovely river.") < _gold(prompt, positive)
    assert _gold(prompt, positive.replace("lovely", "lovely.")) < _gold(prompt, positive)
    assert _gold(prompt, "xq zzv blorp qqq wub wub wub wub wub wub") == -1.0
    assert _gold(prompt, "") < 0
    assert all(-1.0 <= _gold(prompt, c) <= 1.0 for c in (positive, negative, "good " * 60))


def test_gold_reward_reads_conversational_values():
    prompt = [{"role": "user", "content": "Topic: river garden"}]
    completion = [{"role": "assistant", "content": "the river is lovely."}]
    assert gold_reward([prompt], [completion]) == gold_reward(
        ["Topic: river garden"], ["the river is lovely."]
    )
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        gold_reward(["a", "b"], ["c"])


def test_demonstrations_only_partly_satisfy_the_gold_reward():
    rows = task.sft("train", 5000)
    scores = gold_reward(
        [r["messages"][0]["content"] for r in rows], [r["messages"][1]["content"] for r in rows]
    )
    assert 0.1 < statistics.mean(scores) < 0.3
    assert statistics.pstdev(scores) > 0.2  # room to prefer some over others
    assert max(scores) > 0.7 and min(scores) < -0.3


def test_preference_pairs_are_clean():
    rows = task.preference("train", 3000) + task.preference("test")
    prompts = [r["prompt"] for r in rows]
    chosen = gold_reward(prompts, [r["chosen"] for r in rows])
    rejected = gold_reward(prompts, [r["rejected"] for r in rows])
    gaps = [c - r for c, r in zip(chosen, rejected, strict=True)]
    assert min(gaps) >= task.MIN_PAIR_GAP - 1e-9
    assert statistics.mean(chosen) > 0.3 > 0 > statistics.mean(rejected)


def test_unknown_name_or_split_is_a_user_error():
    with pytest.raises(UserError, match="builtin:sft, builtin:preference, builtin:prompts"):
        load_builtin("sfft")
    with pytest.raises(UserError, match="valid splits: train, test"):
        load_builtin("sft", "validation")


def test_vocabulary_lists():
    words = task.all_words()
    assert len(words) == len(set(words)) == 130
    assert not set(task.POSITIVE) & set(task.NEGATIVE)
