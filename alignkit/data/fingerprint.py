"""What data a stage used, as stage.json and the model card record it: source, split, row count
and a SHA-256 over the rows themselves (normalized, in the order used), so two stages that say
they trained on the same data can be checked to have, whatever file or Hub revision it came from.
"""

from __future__ import annotations

import hashlib
import json


def rows_sha256(rows: list) -> str:
    """SHA-256 of ``rows``: each row as canonical JSON (sorted keys), one per line."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def data_record(role: str, source: str, split: str | None, rows: list) -> dict:
    """One entry of a stage's ``data`` list: what the rows were for (``train``, ``eval``,
    ``replay``, ``forgetting``, ...), where they came from, how many, and their hash."""
    return {
        "role": role,
        "source": source,
        "split": split,
        "rows": len(rows),
        "sha256": rows_sha256(rows),
    }
