"""The builtin synthetic task: short texts about topics, judged by a hidden gold reward.

A prompt names 2-4 topic nouns (``"Topic: river garden"``). A demonstration is a short word
sequence of function, topic and sentiment words; each demonstration has its own positivity
``p ~ U(0.1, 0.9)`` (the chance that a sentiment word is positive), so demonstrations only
partly satisfy the gold reward and SFT -> DPO/PPO have room to improve. The gold reward weighs
content (positive vs negative words) more than format (topic, final ".", length band).

Everything is pure python, seeded per (kind, split) and cached in memory; train and test
prompts are disjoint by construction (each topic set belongs to exactly one split).
"""

from __future__ import annotations

import random
import re
import zlib
from functools import lru_cache

from alignkit.errors import UserError

FUNCTION_WORDS = (
    "the", "a", "is", "and", "very", "was", "it", "we", "with", "of",
    "to", "in", "this", "that", "so", "but", "our", "my", "all", "feels",
)  # fmt: skip
TOPICS = (
    "river", "garden", "school", "forest", "city", "music", "ocean", "mountain", "village",
    "market", "library", "kitchen", "winter", "summer", "train", "bridge", "castle", "island",
    "desert", "harbor", "meadow", "museum", "festival", "journey", "lake", "valley", "bakery",
    "theater", "station", "orchard",
)  # fmt: skip
POSITIVE = (
    "good", "great", "happy", "bright", "lovely", "warm", "kind", "calm", "joyful", "pleasant",
    "wonderful", "beautiful", "gentle", "fresh", "cheerful", "friendly", "peaceful", "delightful",
    "sunny", "proud", "brave", "clever", "graceful", "hopeful", "lively", "charming", "gorgeous",
    "superb", "splendid", "excellent", "fantastic", "marvelous", "radiant", "serene", "sweet",
    "vivid", "glad", "elegant", "generous", "fine",
)  # fmt: skip
NEGATIVE = (
    "bad", "sad", "dark", "cold", "awful", "terrible", "gloomy", "angry", "dull", "bitter",
    "cruel", "dirty", "grim", "harsh", "lonely", "noisy", "ugly", "weak", "boring", "broken",
    "dreadful", "horrible", "miserable", "nasty", "painful", "rotten", "rude", "scary", "tense",
    "tired", "gray", "messy", "sour", "stale", "bleak", "drab", "foul", "hostile", "lousy", "poor",
)  # fmt: skip

SPLITS = ("train", "test")
SIZES = {  # rows per split when ``n`` is not given
    "prompts": {"train": 4096, "test": 256},
    "sft": {"train": 20000, "test": 1000},
    "preference": {"train": 10000, "test": 1000},
}
LENGTH_BAND = (8, 20)  # words; outside it the gold reward deducts a little per word
MIN_PAIR_GAP = 0.3  # preference pairs closer than this in gold are dropped (too noisy to learn)
_TEST_SHARE = 8  # one topic set in 8 belongs to the test split
_VERSION = "v1"  # part of every seed: bump when the generator changes

_POSITIVE = frozenset(POSITIVE)
_NEGATIVE = frozenset(NEGATIVE)
_TOPICS = frozenset(TOPICS)
_VOCABULARY = frozenset(FUNCTION_WORDS + TOPICS + POSITIVE + NEGATIVE)


def all_words() -> list[str]:
    """Every word the task uses (function, topic, positive, negative), in a fixed order."""
    return list(FUNCTION_WORDS + TOPICS + POSITIVE + NEGATIVE)


# --- gold reward -------------------------------------------------------------------------


def _text(value: str | list[dict]) -> str:
    """A plain string, or the last message's content of a conversational (TRL) value."""
    return value if isinstance(value, str) else str(value[-1]["content"])


def _words(completion: str) -> list[str]:
    text = completion.strip()
    return (text[:-1] if text.endswith(".") else text).split()


def content_score(completion: str) -> float:
    """The content part of the gold reward alone: (positive - negative words) / words."""
    words = _words(completion)
    positive = sum(w in _POSITIVE for w in words)
    return (2 * positive - sum(w in _POSITIVE or w in _NEGATIVE for w in words)) / max(
        len(words), 1
    )


def gold_content(prompts, completions, **meta) -> list[float]:
    """The builtin task's content measure, in [-1, 1]: ``(positive - negative words) / words``.

    No format terms (topic, ".", length, unknown words): a model can only raise it by saying
    more positive things, so it shows whether a gain in gold is content or only format."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    return [content_score(_text(c)) for c in completions]


def is_valid(completion: str) -> bool:
    """Every word (a "." after a word allowed) is in the task's vocabulary."""
    return all(w in _VOCABULARY for w in completion.replace(".", " ").split())


def gold_valid(prompts, completions, **meta) -> list[float]:
    """1.0 for an answer with no word outside the task vocabulary (fragments, stray bytes),
    else 0.0: its mean is the share of clean samples."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    return [float(is_valid(_text(c))) for c in completions]


def gold_score(prompt: str, completion: str) -> float:
    """The gold reward of one completion; see :func:`gold_reward`."""
    topics = _TOPICS.intersection(re.findall(r"[a-z]+", prompt.lower()))
    ends_with_period = completion.strip().endswith(".")
    words = _words(completion)
    n = max(len(words), 1)
    positive = sum(w in _POSITIVE for w in words)
    negative = sum(w in _NEGATIVE for w in words)
    unknown = sum(w not in _VOCABULARY for w in words)
    low, high = LENGTH_BAND
    outside = max(low - len(words), len(words) - high, 0)
    score = (
        0.7 * (positive - negative) / n
        - unknown / n
        + 0.2 * any(w in topics for w in words)
        + 0.1 * ends_with_period
        - min(0.5, 0.05 * outside)
    )
    return max(-1.0, min(1.0, score))


def gold_reward(
    prompts: list[str] | list[list[dict]], completions: list[str] | list[list[dict]], **meta
) -> list[float]:
    """Hidden gold reward of the builtin task, in [-1, 1] (TRL's reward-function signature).

    Content dominates: ``0.7 * (positive - negative words) / words`` (so +-0.7 at most). A
    prompt topic word mentioned anywhere adds 0.2, ending with "." adds 0.1. Penalties: the
    share of words outside the task vocabulary (``"school."`` mid-text counts as one) and
    0.05 per word outside the 8-20 word band (at most 0.5). The sum is clipped to [-1, 1].
    Prompts are the user message text; conversational values (message lists) are read by
    their last message's content.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    return [gold_score(_text(p), _text(c)) for p, c in zip(prompts, completions, strict=True)]


# --- generators --------------------------------------------------------------------------


def _rng(kind: str, split: str) -> random.Random:
    return random.Random(f"alignkit-builtin:{_VERSION}:{kind}:{split}")


def _split_of(topics: list[str]) -> str:
    key = " ".join(sorted(topics)).encode()
    return "test" if zlib.crc32(key) % _TEST_SHARE == 0 else "train"


def _sample_prompt(rng: random.Random, split: str) -> tuple[str, tuple[str, ...]]:
    while True:  # rejection sampling: about 1 in 8 (test) or 7 in 8 (train) draws fit
        topics = rng.sample(TOPICS, rng.randint(2, 4))
        if _split_of(topics) == split:
            return "Topic: " + " ".join(topics), tuple(topics)


def _sample_demonstration(rng: random.Random, topics: tuple[str, ...]) -> str:
    """5-24 words: function 25%, topic 10% (mostly the prompt's), sentiment 65%."""
    p = rng.uniform(0.1, 0.9)
    words = []
    for _ in range(rng.randint(5, 24)):
        u = rng.random()
        if u < 0.25:
            words.append(rng.choice(FUNCTION_WORDS))
        elif u < 0.35:
            words.append(rng.choice(topics if rng.random() < 0.8 else TOPICS))
        else:
            words.append(rng.choice(POSITIVE if rng.random() < p else NEGATIVE))
    return " ".join(words) + ("." if rng.random() < 0.6 else "")


@lru_cache(maxsize=16)
def _prompt_rows(split: str, n: int) -> tuple[str, ...]:
    rng = _rng("prompts", split)
    return tuple(_sample_prompt(rng, split)[0] for _ in range(n))


@lru_cache(maxsize=16)
def _sft_rows(split: str, n: int) -> tuple[tuple[str, str], ...]:
    rng = _rng("sft", split)
    rows = []
    for _ in range(n):
        prompt, topics = _sample_prompt(rng, split)
        rows.append((prompt, _sample_demonstration(rng, topics)))
    return tuple(rows)


@lru_cache(maxsize=16)
def _preference_rows(split: str, n: int) -> tuple[tuple[str, str, str], ...]:
    rng = _rng("preference", split)
    rows = []
    while len(rows) < n:
        prompt, topics = _sample_prompt(rng, split)
        a, b = _sample_demonstration(rng, topics), _sample_demonstration(rng, topics)
        gold_a, gold_b = gold_score(prompt, a), gold_score(prompt, b)
        if abs(gold_a - gold_b) >= MIN_PAIR_GAP:
            rows.append((prompt, a, b) if gold_a > gold_b else (prompt, b, a))
    return tuple(rows)


def _size(kind: str, split: str, n: int | None) -> int:
    if split not in SPLITS:
        raise UserError(f"unknown builtin split {split!r}; valid splits: {', '.join(SPLITS)}")
    return SIZES[kind][split] if n is None else n


def prompts(split: str, n: int | None = None) -> list[dict]:
    """Prompt-only rows ``{"prompt": str}`` for rollouts and evaluation."""
    return [{"prompt": p} for p in _prompt_rows(split, _size("prompts", split, n))]


def sft(split: str, n: int | None = None) -> list[dict]:
    """Demonstrations as chat rows ``{"messages": [user, assistant]}``."""
    return [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c}]}
        for p, c in _sft_rows(split, _size("sft", split, n))
    ]


def preference(split: str, n: int | None = None) -> list[dict]:
    """Pairs ``{"prompt", "chosen", "rejected"}``: two demonstrations for one prompt, the
    chosen one higher in gold by at least :data:`MIN_PAIR_GAP`."""
    return [
        {"prompt": p, "chosen": c, "rejected": r}
        for p, c, r in _preference_rows(split, _size("preference", split, n))
    ]


def pretraining_texts(n: int, seed: int = 0) -> list[str]:
    """Plain word sequences for pretraining ``builtin:tiny``: no template, no preference.

    3-48 words; 30% function, 15% topic, 55% sentiment words with a per-text positive share
    ``p ~ U(0, 1)``; a "." inside a text is rare (1 in 100 words), half the texts end with ".".
    """
    rng = random.Random(f"alignkit-builtin:{_VERSION}:pretraining:{seed}")
    texts = []
    for _ in range(n):
        p = rng.random()
        words = []
        for _ in range(rng.randint(3, 48)):
            u = rng.random()
            if u < 0.30:
                word = rng.choice(FUNCTION_WORDS)
            elif u < 0.45:
                word = rng.choice(TOPICS)
            else:
                word = rng.choice(POSITIVE if rng.random() < p else NEGATIVE)
            words.append(word + ("." if rng.random() < 0.01 else ""))
        text = " ".join(words).rstrip(".")
        texts.append(text + ("." if rng.random() < 0.5 else ""))
    return texts
