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

PREFERENCES_FILE = "preferences.jsonl"


@dataclass
class BestOfNResult:
    pairs: int
    ties: int
    """Prompts dropped because their best and worst samples had the same reward."""
    path: Path


def preference_pairs(rows: Iterable[dict]) -> tuple[list[dict], int]:
    """Pairs (best vs worst by ``reward``) per prompt id, in first-seen order, and the ties."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["prompt_id"], []).append(row)
    pairs, ties = [], 0
    for prompt_id, samples in groups.items():
        # an empty answer is no answer a DPO row can hold; ties in max/min go to the lowest index
        samples = sorted((r for r in samples if r["completion"].strip()), key=lambda r: r["sample"])
        if len(samples) < 2:
            continue
        best = max(samples, key=lambda r: r["reward"])
        worst = min(samples, key=lambda r: r["reward"])
        if best["reward"] <= worst["reward"] or best["completion"] == worst["completion"]:
            ties += 1
            continue
        pairs.append(
            {
                "prompt": best["prompt"],
                "chosen": [{"role": "assistant", "content": best["completion"]}],
                "rejected": [{"role": "assistant", "content": worst["completion"]}],
                "margin": best["reward"] - worst["reward"],
                "prompt_id": prompt_id,
                "chosen_reward": best["reward"],
                "rejected_reward": worst["reward"],
            }
        )
    return pairs, ties


def write_preferences(out_dir: Path, rows: Iterable[dict]) -> BestOfNResult:
    """Write ``out_dir/preferences.jsonl`` atomically (a reader never sees half a file)."""
    pairs, ties = preference_pairs(rows)
    path = Path(out_dir) / PREFERENCES_FILE
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for pair in pairs:
            f.write(json.dumps(pair, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return BestOfNResult(len(pairs), ties, path)
