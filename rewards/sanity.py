"""A reward model's sanity probe: do degenerate answers outscore real ones?

A reward model learns only what its pairs show it. One trained on whole, well-formed answers
has never seen an empty answer, a lone ".", two words, fragments of words or one word repeated,
and may score those far above real answers; an RL policy then finds them within a few dozen
steps (measured on the builtin task: "." scored 9.1 against 2.1 for held-out answers). This
probe needs no gold reward: it scores such answers, built from the held-out prompts and the
words of the held-out chosen answers, against those chosen answers themselves.

A category is *flagged* when more than :data:`FLAG_SHARE` of its answers score above the
chosen answers' mean: an RL policy looks for the best-scoring answer, not the average one, so a
degenerate answer that beats a typical real answer on one prompt in ten is a hole it will find
(measured on the builtin task: the RM trained on offline pairs alone had 38% of "." answers
above the chosen mean, and PPO on it drifted to one-word answers). Train the RM on comparisons of the policy's own samples (a ``rollout`` stage mixed into
``reward_model.mix``) to cover them.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

CATEGORIES = ("empty", "period", "short", "fragments", "repeated")
_WORD = re.compile(r"[^\W\d_]+")
FLAG_SHARE = 0.1


@dataclass
class ProbeResult:
    chosen_mean: float
    means: dict[str, float]
    """Mean score per category."""
    above_chosen: dict[str, float]
    """Share of each category's answers scoring above the chosen mean (flagged above 0.1)."""
    examples: dict[str, list[tuple[str, float]]]

    @property
    def flagged(self) -> list[str]:
        return [c for c, share in self.above_chosen.items() if share > FLAG_SHARE]

    def metrics(self) -> dict[str, float]:
        out = {"rm_probe/chosen_mean": self.chosen_mean}
        for c in self.means:
            out[f"rm_probe/{c}_mean"] = self.means[c]
            out[f"rm_probe/{c}_above_chosen"] = self.above_chosen[c]
        out["rm_probe/flagged"] = float(len(self.flagged))
        return out


def degenerate_answers(
    words: Sequence[str], neutral: Sequence[str], rng: random.Random, k: int
) -> dict[str, list[str]]:
    """``k`` answers per category from real ``words``; repeats use one of ``neutral``, words as
    common in rejected answers as in chosen ones (in any language: function words, "the the the
    ..."), so a repeat says nothing that makes an answer better."""
    words = list(words) or ["the"]
    neutral = list(neutral) or words

    def fragment() -> str:
        word = rng.choice([w for w in words if len(w) > 3] or words)
        start = rng.randint(0, max(len(word) - 2, 0))
        return word[start : start + rng.randint(2, 4)]

    return {
        "empty": [""] * k,
        "period": ["."] * k,
        "short": [" ".join(rng.choices(words, k=rng.randint(1, 3))) for _ in range(k)],
        "fragments": [" ".join(fragment() for _ in range(rng.randint(1, 4))) for _ in range(k)],
        "repeated": [" ".join([rng.choice(neutral)] * rng.randint(8, 20)) for _ in range(k)],
    }


def probe_reward_model(
    score: Callable[[list, list], list[float]],
    rows: Sequence[dict],
    per_category: int = 32,
    seed: int = 0,
) -> ProbeResult:
    """Score held-out ``rows`` (``prompt``, ``chosen``, optionally ``rejected``: strings or
    message lists) and degenerate answers to their prompts with ``score(prompts, completions)``."""
    rng = random.Random(seed)
    rows = list(rows)
    if not rows:
        raise ValueError("the RM probe needs held-out pairs")
    prompts = [r["prompt"] for r in rows]
    chosen = [_text(r["chosen"]) for r in rows]
    chosen_scores = score(prompts, chosen)
    chosen_mean = sum(chosen_scores) / len(chosen_scores)
    chosen_words = Counter(w for text in chosen for w in _WORD.findall(text))
    words = sorted(chosen_words)
    rejected_words = Counter(
        w for r in rows if "rejected" in r for w in _WORD.findall(_text(r["rejected"]))
    )
    both = {w: min(n, rejected_words[w]) for w, n in chosen_words.items() if rejected_words[w]}
    neutral = [w for w, _ in sorted(both.items(), key=lambda wn: (-wn[1], wn[0]))][:10]
    answers = degenerate_answers(words, neutral, rng, per_category)
    probe_prompts = [rng.choice(prompts) for _ in range(per_category)]
    means, above, examples = {}, {}, {}
    for category, texts in answers.items():
        scores = score(probe_prompts, texts)
        means[category] = sum(scores) / len(scores)
        above[category] = sum(s > chosen_mean for s in scores) / len(scores)
        ranked = sorted(zip(texts, scores, strict=True), key=lambda t: -t[1])
        examples[category] = [(t, round(s, 4)) for t, s in ranked[:3]]
    return ProbeResult(chosen_mean, means, above, examples)


def _text(value) -> str:
    return value if isinstance(value, str) else str(value[-1]["content"])
