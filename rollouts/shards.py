"""Sharded JSONL that survives being killed: whole lines, flushed and fsynced per batch.

A run writes ``rollouts-00000.jsonl``, ``rollouts-00001.jsonl``, ... and never appends to a
shard an earlier run wrote. A kill can only tear the last line of the shard being written;
readers skip such a torn tail and the next run repairs it (see :func:`repair_torn_tail`)
before it starts writing, so every complete line stays as it was.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from alignkit.errors import UserError

log = logging.getLogger(__name__)

PREFIX, SUFFIX = "rollouts-", ".jsonl"


def shard_paths(out_dir: Path) -> list[Path]:
    return sorted(Path(out_dir).glob(f"{PREFIX}[0-9]*{SUFFIX}"))


def read_rollouts(out_dir: str | Path) -> list[dict]:
    """Every complete row of every shard, in write order (a torn last line is skipped)."""
    return [row for path in shard_paths(Path(out_dir)) for row in _rows(path)]


def _rows(path: Path) -> Iterator[dict]:
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]  # tail: b"" when the file ends with a newline
    for lineno, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(
                f"{path}:{lineno}: not a JSON row ({e}); alignkit writes whole lines, so this "
                "shard was changed by something else"
            ) from None
    if tail.strip():
        log.warning(
            "%s: skipping a torn last line (%d bytes) left by a killed run", path, len(tail)
        )


def repair_torn_tail(path: Path) -> str | None:
    """Make ``path`` end with a complete line. A fragment that is a whole JSON row just lacks
    its newline (added); anything else is the start of a row never finished (cut off).
    Returns what was done, or None when the file was fine."""
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return None
    cut = data.rfind(b"\n") + 1
    fragment = data[cut:]
    try:
        json.loads(fragment)
    except (json.JSONDecodeError, UnicodeDecodeError):
        with path.open("r+b") as f:
            f.truncate(cut)
            f.flush()
            os.fsync(f.fileno())
        return f"{path}: removed a torn last line ({len(fragment)} bytes) left by a killed run"
    with path.open("ab") as f:
        f.write(b"\n")
        f.flush()
        os.fsync(f.fileno())
    return f"{path}: completed a last line that lacked its newline"


class ShardWriter:
    """Appends batches of rows to new shards of at most ``rows_per_shard`` rows (a batch is
    never split, so a shard may hold a little more)."""

    def __init__(self, out_dir: Path, rows_per_shard: int = 10_000):
        self.out_dir = Path(out_dir)
        self.rows_per_shard = rows_per_shard
        existing = shard_paths(self.out_dir)
        self.index = int(existing[-1].name[len(PREFIX) : -len(SUFFIX)]) + 1 if existing else 0
        self._file = None
        self._rows_in_shard = 0

    def write(self, rows: list[dict]) -> None:
        if not rows:
            return
        if self._file is None or self._rows_in_shard >= self.rows_per_shard:
            self._open_next()
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
        self._file.write(data)  # one write per batch, then make it durable
        self._file.flush()
        os.fsync(self._file.fileno())
        self._rows_in_shard += len(rows)

    def _open_next(self) -> None:
        self.close()
        path = self.out_dir / f"{PREFIX}{self.index:05d}{SUFFIX}"
        self.index += 1
        self._file = path.open("xb")  # never reopen (and so never truncate) an existing shard
        self._rows_in_shard = 0
        dir_fd = os.open(self.out_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the new file's directory entry survives a crash too
        finally:
            os.close(dir_fd)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
