"""Rule rewards: each value on texts where the answer is known, strings and message lists alike."""

from __future__ import annotations

import pytest

from alignkit.rewards import rules


def as_messages(texts):
    return [[{"role": "assistant", "content": t}] for t in texts]


@pytest.mark.parametrize("wrap", [list, as_messages])
def test_length_band(wrap):
    texts = wrap(["one two three", "w " * 10, "w " * 25, ""])
    values = rules.length(None, texts, min_words=5, max_words=20, per_word=0.1)
    assert values == pytest.approx([-0.2, 0.0, -0.5, -0.5])
    assert rules.length(None, wrap(["w " * 500]), max_words=10, per_word=0.01) == [-1.0]


def test_ends_with_eos_reads_the_finish_reason():
    values = rules.ends_with_eos(None, ["a", "b"], finish_reason=["stop", "length"])
    assert values == [1.0, 0.0]
    with pytest.raises(ValueError, match="finish_reason"):
        rules.ends_with_eos(None, ["a", "b"])


def test_punctuation():
    texts = ["It works.", 'He said "yes!"', "Really?)", "no end", "trailing .  ", ""]
    assert rules.punctuation(None, texts) == [1.0, 1.0, 1.0, 0.0, 1.0, 0.0]


def test_no_repetition():
    values = rules.no_repetition(None, ["a b c d e", "good " * 12, "a b", "a b c a b c"])
    assert values[0] == 1.0 and values[2] == 1.0
    assert values[1] == pytest.approx(0.1)  # 10 trigrams, all "good good good"
    assert values[3] == pytest.approx(3 / 4)


def test_format_and_think_format():
    assert rules.matches_format(None, ["Answer: 42", "42"], pattern=r"Answer: \d+") == [1.0, 0.0]
    texts = ["<think>hmm</think> 42", "<think>hmm</think>", "42", "<think>a<think>b</think> c"]
    assert rules.think_format(None, texts) == [1.0, 0.0, 0.0, 0.0]


def test_exact_match_ignores_case_and_spacing():
    values = rules.exact_match(
        None,
        ["Paris", " the  answer IS 4", "x", "y"],
        reference=["paris", "The answer is 4", "z", None],
    )
    assert values == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="reference"):
        rules.exact_match(None, ["a"])
