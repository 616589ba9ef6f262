"""Rule rewards: cheap checks on the completion text, with the reward-function signature.

Each rule is ``fn(prompts, completions, *, <params>, **meta) -> list[float]``. Completions may be
strings or TRL-style message lists (the last message's content is read). Name one with
``--reward NAME`` or, with parameters, ``--reward "NAME(key=value, ...)"``; values are Python
literals (``length(max_words=50)``, ``format(pattern='^Answer: ')``). Typical use is as a
shaping term next to a learned or gold reward: ``--reward gold --reward "length*0.2"``.

| name | value | meta it needs |
|---|---|---|
| ``length`` | 0 inside ``[min_words, max_words]``, ``-per_word`` per word outside, at least -1 | |
| ``ends_with_eos`` | 1 if generation stopped on its own (EOS/stop), 0 if cut at the length limit | ``finish_reason`` |
| ``punctuation`` | 1 if the text ends with sentence-final punctuation | |
| ``no_repetition`` | share of distinct word n-grams, 1 = nothing repeated | |
| ``format`` | 1 if the whole text matches the regex ``pattern`` | |
| ``think_format`` | 1 for ``<think>...</think>`` followed by an answer | |
| ``exact_match`` | 1 if the text equals the row's reference (case and spacing ignored) | ``reference`` |
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_FINAL_PUNCTUATION = re.compile(r"[.!?…。！？][\"'”’)\]]*$")
_THINK = re.compile(r"^\s*<think>(?!.*<think>).*?</think>\s*\S.*$", re.DOTALL)


def _text(value: str | list[dict]) -> str:
    return value if isinstance(value, str) else str(value[-1]["content"])


def _meta(meta: dict, key: str, rule: str, n: int) -> Sequence:
    values = meta.get(key)
    if values is None or len(values) != n:
        raise ValueError(
            f"reward {rule!r} needs the {key!r} of every completion (rollout jobs pass it); "
            f"got {'none' if values is None else len(values)} for {n} completions"
        )
    return values


def length(
    prompts,
    completions,
    *,
    min_words: int = 0,
    max_words: int = 100,
    per_word: float = 0.01,
    **meta,
) -> list[float]:
    """Penalty for leaving a word-count band: 0 inside, ``-per_word`` per word outside, >= -1."""
    out = []
    for c in completions:
        words = len(_text(c).split())
        outside = max(min_words - words, words - max_words, 0)
        out.append(-min(1.0, per_word * outside) if outside else 0.0)
    return out


def ends_with_eos(prompts, completions, **meta) -> list[float]:
    """1 when the model ended the completion itself, 0 when it was cut at ``max_new_tokens``."""
    reasons = _meta(meta, "finish_reason", "ends_with_eos", len(completions))
    return [1.0 if r == "stop" else 0.0 for r in reasons]


def punctuation(prompts, completions, **meta) -> list[float]:
    """1 when the text ends with ``. ! ? …`` (closing quotes or brackets allowed after it)."""
    return [1.0 if _FINAL_PUNCTUATION.search(_text(c).rstrip()) else 0.0 for c in completions]


def no_repetition(prompts, completions, *, n: int = 3, **meta) -> list[float]:
    """Distinct word ``n``-grams / all word ``n``-grams (1 for texts shorter than ``n`` words).
    Degenerate loops ("good good good ...") score near 0."""
    out = []
    for c in completions:
        words = _text(c).split()
        grams = list(zip(*(words[i:] for i in range(n)), strict=False))
        out.append(len(set(grams)) / len(grams) if grams else 1.0)
    return out


def matches_format(prompts, completions, *, pattern: str, **meta) -> list[float]:
    """1 when the whole (stripped) text matches the regular expression ``pattern``."""
    regex = re.compile(pattern, re.DOTALL)
    return [1.0 if regex.fullmatch(_text(c).strip()) else 0.0 for c in completions]


def think_format(prompts, completions, **meta) -> list[float]:
    """1 for one ``<think>...</think>`` block first, then a non-empty answer."""
    return [1.0 if _THINK.match(_text(c)) else 0.0 for c in completions]


def exact_match(prompts, completions, **meta) -> list[float]:
    """1 when the text equals the row's ``reference``, ignoring case and runs of whitespace."""
    refs = _meta(meta, "reference", "exact_match", len(completions))

    def norm(s: str) -> str:
        return " ".join(s.lower().split())

    return [
        float(ref is not None and norm(_text(c)) == norm(ref))
        for c, ref in zip(completions, refs, strict=True)
    ]


RULES = {
    "length": length,
    "ends_with_eos": ends_with_eos,
    "punctuation": punctuation,
    "no_repetition": no_repetition,
    "format": matches_format,
    "think_format": think_format,
    "exact_match": exact_match,
}
ALIASES = {
    "length_penalty": "length",
    "eos": "ends_with_eos",
    "ends_with_punctuation": "punctuation",
    "repetition": "no_repetition",
}
