"""Best-of-n: from n scored samples per prompt, the best and the worst make a preference pair.

The pairs are written in the conversational preference format the DPO stage reads
(:func:`alignkit.data.preference.load_preference`): ``prompt`` (messages), ``chosen`` and
``rejected`` (one assistant message each), ``margin`` (best reward - worst reward), plus the
prompt id and both rewards. A prompt whose best and worst samples score the same (or read the
same) gives no pair: a tie says nothing about which answer is better. Empty completions are
left out. Rejection sampling and iterative DPO are then:
roll out with ``--best-of-n``, train DPO on ``DIR/preferences.jsonl``, roll out again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

PREFERENCES_FILE = "preferences.jsonl"


@dataclass
class BestOfNResult:
    pairs: int
    ties: int
    """Prompts dropped because their best and worst samples had the same reward."""
    path: Path


PairMode = Literal["best_worst", "all"]


def preference_pairs(
    rows: Iterable[dict], mode: PairMode = "best_worst", min_margin: float = 0.0
) -> tuple[list[dict], int]:
    """Pairs per prompt id, in first-seen order, and the prompts that gave none (ties).

    ``best_worst``: the best against the worst sample by ``reward``. ``all``: every two samples
    whose rewards differ by more than ``min_margin`` (n samples give up to n(n-1)/2 pairs; the
    RM sees more of what the policy writes). Either way a pair needs a margin above
    ``min_margin`` and two different texts."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["prompt_id"], []).append(row)
    pairs, ties = [], 0
    for prompt_id, samples in groups.items():
        # an empty answer is no answer a DPO row can hold; ties in max/min go to the lowest index
        samples = sorted((r for r in samples if r["completion"].strip()), key=lambda r: r["sample"])
        if len(samples) < 2:
            continue
        if mode == "best_worst":
            best = max(samples, key=lambda r: r["reward"])
            worst = min(samples, key=lambda r: r["reward"])
            candidates = [(best, worst)]
        else:
            ranked = sorted(samples, key=lambda r: -r["reward"])
            candidates = [(a, b) for i, a in enumerate(ranked) for b in ranked[i + 1 :]]
        found = [
            _pair(prompt_id, a, b)
            for a, b in candidates
            if a["reward"] - b["reward"] > min_margin and a["completion"] != b["completion"]
        ]
        ties += not found
        pairs.extend(found)
    return pairs, ties


def _pair(prompt_id: str, chosen: dict, rejected: dict) -> dict:
    return {
        "prompt": chosen["prompt"],
        "chosen": [{"role": "assistant", "content": chosen["completion"]}],
        "rejected": [{"role": "assistant", "content": rejected["completion"]}],
        "margin": chosen["reward"] - rejected["reward"],
        "prompt_id": prompt_id,
        "chosen_reward": chosen["reward"],
        "rejected_reward": rejected["reward"],
    }


def write_preferences(
    out_dir: Path, rows: Iterable[dict], mode: PairMode = "best_worst", min_margin: float = 0.0
) -> BestOfNResult:
    """Write ``out_dir/preferences.jsonl`` atomically (a reader never sees half a file)."""
    pairs, ties = preference_pairs(rows, mode, min_margin)
    path = Path(out_dir) / PREFERENCES_FILE
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for pair in pairs:
            f.write(json.dumps(pair, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return BestOfNResult(len(pairs), ties, path)
