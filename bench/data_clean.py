"""Time and peak memory of ``alignkit data clean`` on a generated SFT file.

    python bench/data_clean.py --rows 1000000        # the README's numbers (~1 GB file)
    python bench/data_clean.py --rows 100000         # a quicker check
    python bench/data_clean.py --rows 100000 --set near_dup_threshold=null   # exact dedup only

Rows: a user turn of 8-20 words and an assistant turn of 20-60 words drawn from 20,000 made-up
words (seeded), so nearly every row is distinct; every 20th row repeats an earlier row exactly,
every 20th (offset by 10) repeats one with one word changed, every 100th carries an email and a
phone number (copies of it too). Each run cleans the file in a fresh process (``alignkit data clean``)
and reads back the report: ``peak_mib`` is that process's peak RSS (imports included), so it is
the memory a user's run needs.

Columns: ``rows``, ``kept``, ``exact``/``near`` (rows removed), ``pii`` (masks), ``seconds``,
``rows_s``, ``peak_mib``, ``mib_per_100k`` (peak above the 100k-row baseline is what grows).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

VOCAB = 20_000


def generate(path: Path, rows: int, seed: int = 0) -> dict[str, int]:
    """Write ``rows`` SFT rows to ``path`` (JSONL); returns the planted counts."""
    rng = random.Random(seed)
    vocab = [f"w{i}x{rng.randrange(10**6)}" for i in range(VOCAB)]
    kept: list[tuple[str, str]] = []  # a sample of earlier rows to repeat
    planted = {"exact": 0, "near": 0, "pii": 0}
    with path.open("w", encoding="utf-8") as f:
        for i in range(rows):
            if i % 20 == 19 and kept:
                user, answer = rng.choice(kept)
                planted["exact"] += 1
            elif i % 20 == 9 and kept:
                user, answer = rng.choice(kept)
                words = answer.split()
                j = rng.randrange(len(words))
                words[j] = rng.choice([w for w in rng.sample(vocab, 2) if w != words[j]])
                answer = " ".join(words)
                planted["near"] += 1
            else:
                user = " ".join(rng.choices(vocab, k=rng.randint(8, 20)))
                answer = " ".join(rng.choices(vocab, k=rng.randint(20, 60)))
                if i % 100 == 42:
                    user += f" mail me at user{i}@example.com or +44 20 7946 {i % 10000:04d}"
                if len(kept) < 1000:
                    kept.append((user, answer))
                elif rng.random() < 0.01:
                    kept[rng.randrange(1000)] = (user, answer)
            planted["pii"] += "@example.com" in user
            row = {
                "messages": [
                    {"role": "user", "content": user},
                    {"role": "assistant", "content": answer},
                ]
            }
            f.write(json.dumps(row) + "\n")
    return planted


def clean(path: Path, out: Path, settings: list[str]) -> dict:
    """Run ``alignkit data clean`` in a fresh process; the report it wrote."""
    cmd = [sys.executable, "-m", "alignkit", "data", "clean", str(path), str(out)]
    for item in settings:
        cmd += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads(out.with_name(out.stem + ".report.json").read_text())


HEADER = "| rows | kept | exact | near | pii | seconds | rows_s | peak_mib |\n|---|---|---|---|---|---|---|---|"


def table_row(rows: int, r: dict) -> str:
    """One line of the table from a report."""
    removed = r["removed"]
    pii = sum(c["count"] for c in r["scrubbed"].values())
    return (
        f"| {rows} | {r['rows_out']} | {removed['exact_duplicate']['count']} | "
        f"{removed['near_duplicate']['count']} | {pii} | {r['seconds']:.0f} | "
        f"{rows / r['seconds']:.0f} | {r['peak_rss_mb']:.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000])
    parser.add_argument("--set", dest="settings", action="append", default=[])
    args = parser.parse_args()
    print(HEADER)
    with tempfile.TemporaryDirectory() as tmp:
        for rows in args.rows:
            path, out = Path(tmp) / f"in{rows}.jsonl", Path(tmp) / f"out{rows}.jsonl"
            generate(path, rows)
            print(table_row(rows, clean(path, out, args.settings)), flush=True)
            path.unlink()


if __name__ == "__main__":
    main()
