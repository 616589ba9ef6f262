"""Read data rows from a file, a Hub dataset or a builtin task, each with a human location.

Sources: a local ``.jsonl``/``.json``/``.parquet``/``.csv`` file, ``builtin:NAME``, or a Hub
dataset name (``org/name``). Every row carries ``where`` (``file.jsonl:12``, ``file.csv:5``,
``file.parquet[row 3]``, ``hub:org/name[train] row 3``) so a bad row can be named exactly.

This module also holds the format-independent steps every data kind shares: turning rows into
normalized examples while collecting ``(where, reason)`` problems, and the ``on_bad_rows``
policy. The format-specific normalizers live beside it (``sft.py``).
"""

from __future__ import annotations

import csv
import importlib
import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from alignkit.errors import DataError, UserError

logger = logging.getLogger(__name__)

FILE_EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv")
# Names ending like these are meant as files even though we cannot read them.
_OTHER_FILE_EXTENSIONS = (".txt", ".tsv", ".arrow", ".xlsx", ".yaml", ".yml", ".gz", ".zip")
ACCEPTED = "a local .jsonl/.json/.parquet/.csv file, a Hub dataset name (org/name, or org/name:config), or builtin:NAME"
# A Hub id is "name", "org/name" or "org/name:config"; anything else that is not a file is a path.
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?(:[\w.-]+)?$")  # owner/name[:config]
MAX_LISTED_PROBLEMS = 10
MAX_CSV_CELL = 64 * 1024 * 1024  # csv's default 128 KiB refuses long documents
#: A row with more text than this is refused before tokenisation (it would be truncated to a
#: model's context anyway, after tokenising all of it: 15 GB for one 50 MB row).
MAX_ROW_CHARS = 2_000_000

BadRowPolicy = Literal["error", "skip"]


@dataclass
class Row:
    """One raw row: ``data`` is None when the row could not be read (``error`` says why)."""

    data: dict | None
    where: str
    error: str | None = None


class RowError(Exception):
    """A row that cannot be used; the message is the reason shown to the user."""


def load_rows(source: str, split: str | None = None) -> list[Row]:
    """Read every row of ``source``. Raises UserError when the source cannot be read at all."""
    return list(iter_rows(source, split))


def iter_rows(source: str, split: str | None = None) -> Iterator[Row]:
    """Rows of ``source`` one at a time: JSONL, CSV and Parquet files are streamed (bounded
    memory); a ``.json`` array, a Hub dataset and a builtin are read whole first."""
    if source.startswith("builtin:"):
        return iter(_builtin_rows(source.removeprefix("builtin:"), split or "train"))
    path = Path(source).expanduser()
    if path.is_file():
        return _file_rows(path)
    if path.is_dir():
        raise UserError(f"data source {source!r} is a directory; name a file. Accepted: {ACCEPTED}")
    if _looks_like_path(source):
        raise UserError(f"data file not found: {source}. Accepted sources: {ACCEPTED}")
    return _hub_rows(source, split or "train")


def _looks_like_path(source: str) -> bool:
    return (
        source.lower().endswith(FILE_EXTENSIONS + _OTHER_FILE_EXTENSIONS)
        or source.startswith(("/", ".", "~"))
        or "\\" in source
        or not _HUB_ID.match(source)
    )


def _file_rows(path: Path) -> Iterator[Row]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl_rows(path)
    if suffix == ".json":
        return iter(_json_rows(path))
    if suffix == ".csv":
        return _csv_rows(path)
    if suffix == ".parquet":
        return _parquet_rows(path)
    raise UserError(
        f"cannot read {path}: unknown file type {suffix or '(no extension)'!r}; "
        f"use one of {', '.join(FILE_EXTENSIONS)}"
    )


def _jsonl_rows(path: Path) -> Iterator[Row]:
    # Read line by line (not with a library loader) so every row keeps its exact line number.
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield Row(None, where, f"line is not UTF-8 text: {e}")
                continue
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as e:
                yield Row(None, where, f"invalid JSON: {e}")
                continue
            except RecursionError:
                yield Row(None, where, "invalid JSON: nested too deeply")
                continue
            if not isinstance(data, dict):
                yield Row(None, where, f"invalid JSON: expected an object, got {kind_of(data)}")
                continue
            yield Row(data, where)


def _json_rows(path: Path) -> list[Row]:
    text = _read_text(path)
    try:
        data = json.loads(text)
    except RecursionError:
        raise UserError(f"{path} is not usable JSON: nested too deeply") from None
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("["):
            raise UserError(f"{path} is not valid JSON: {e}") from None
        return list(_jsonl_rows(path))  # JSON lines in a .json file: keep line numbers
    if isinstance(data, dict):  # one object, or JSON lines holding a single row
        data = [data]
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a list of objects or JSON lines, got {kind_of(data)}")
    return [
        Row(item, f"{path}[row {i}]")
        if isinstance(item, dict)
        else Row(None, f"{path}[row {i}]", f"expected an object, got {kind_of(item)}")
        for i, item in enumerate(data)
    ]


def _csv_rows(path: Path) -> Iterator[Row]:
    # csv.reader counts physical lines, so a row's line stays exact even when quoted cells
    # span lines; cells stay strings ("" stays "", never NaN as pandas would make it).
    csv.field_size_limit(MAX_CSV_CELL)
    reader = None
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                return
            start = reader.line_num + 1
            for cells in reader:
                where, start = f"{path}:{start}", reader.line_num + 1
                if not cells:  # blank line
                    continue
                if len(cells) > len(header):
                    yield Row(None, where, f"{len(cells)} cells but {len(header)} columns")
                    continue
                yield Row(dict(zip(header, cells, strict=False)), where)
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path}:{_first_bad_utf8_line(path)}: not UTF-8 text ({e.reason})"
        ) from None
    except csv.Error as e:
        line = f":{reader.line_num}" if reader is not None else ""
        raise UserError(f"{path}{line}: not readable as CSV: {e}") from None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path}:{_first_bad_utf8_line(path)}: not UTF-8 text ({e.reason})"
        ) from None


def _first_bad_utf8_line(path: Path) -> int:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return lineno
    return 1


def _parquet_rows(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq  # only for Parquet files

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=4096)
        i = 0
        for batch in batches:  # one record batch at a time: bounded memory on a large file
            for item in batch.to_pylist():
                yield Row(item, f"{path}[row {i}]")
                i += 1
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise UserError(f"cannot read Parquet file {path}: {e}") from None


def _hub_rows(name: str, split: str) -> Iterator[Row]:
    """``owner/name`` or ``owner/name:config`` (a dataset with several configs, e.g. gsm8k:main)."""
    import datasets  # ~1 s: only for Hub sources

    name, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # network, auth, missing split, bad name: all surface here
        raise UserError(
            f"could not load Hub dataset {name!r} (split {split!r}): {type(e).__name__}: {e}. "
            "No network? Use a local file instead. Accepted sources: " + ACCEPTED
        ) from None
    # the dataset is memory-mapped Arrow: rows are materialized one at a time
    for i, item in enumerate(ds):
        yield Row(dict(item), f"hub:{name}[{split}] row {i}")


def _builtin_rows(name: str, split: str) -> list[Row]:
    # Imported lazily: the builtin task builds its data (and may import torch) on first use.
    load_builtin = importlib.import_module("alignkit.builtin").load_builtin
    items = load_builtin(name, split)
    return [Row(dict(item), f"builtin:{name}[{split}] row {i}") for i, item in enumerate(items)]


def kind_of(value: object) -> str:
    """ "a list", "a string", "an object", else the type name: for messages about values."""
    return {list: "a list", str: "a string", dict: "an object"}.get(
        type(value), type(value).__name__
    )


@dataclass
class Normalized:
    """Rows that passed a normalizer, their locations, and the rows that did not."""

    rows: list[dict] = field(default_factory=list)
    wheres: list[str] = field(default_factory=list)
    formats: Counter = field(default_factory=Counter)
    problems: list[tuple[str, str]] = field(default_factory=list)
    total: int = 0
    fields: list[dict] = field(default_factory=list)
    """Per kept row, the raw values of the fields asked for (``keep_fields``), e.g. a category
    to stratify by: normalized rows hold only what training reads."""


def normalize_rows(
    rows: list[Row],
    normalize: Callable[[dict], tuple[str, dict]],
    keep_fields: tuple[str, ...] = (),
) -> Normalized:
    """Apply ``normalize`` (returns ``(format, example)``, raises RowError) to every row."""
    out = Normalized(total=len(rows))
    for row in rows:
        try:
            fmt, example = normalize_row(row, normalize)
        except RowError as e:
            out.problems.append((row.where, str(e)))
            continue
        out.rows.append(example)
        out.wheres.append(row.where)
        out.formats[fmt] += 1
        if keep_fields:
            out.fields.append({name: row.data.get(name) for name in keep_fields})
    return out


def normalize_row(row: Row, normalize: Callable[[dict], tuple[str, dict]]) -> tuple[str, dict]:
    """``(format, example)`` for one row; raises RowError for an unreadable, huge or bad row."""
    if row.data is None:
        raise RowError(row.error or "unreadable row")
    size = _text_size(row.data)
    if size > MAX_ROW_CHARS:
        raise RowError(
            f"{size:,} characters of text, more than the {MAX_ROW_CHARS:,} any model context "
            "holds; split or shorten it"
        )
    return normalize(row.data)


def _text_size(value, depth: int = 0) -> int:
    """Characters of text in a row (strings in nested lists/dicts), to refuse a huge row before
    it is tokenised whole."""
    if isinstance(value, str):
        return len(value)
    if depth > 20:
        return 0
    if isinstance(value, dict):
        return sum(_text_size(v, depth + 1) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(_text_size(v, depth + 1) for v in value)
    return 0


def enforce_bad_row_policy(
    source: str, result: Normalized, on_bad_rows: BadRowPolicy, max_bad_fraction: float
) -> None:
    """Raise DataError when bad rows are not acceptable under ``on_bad_rows``."""
    if on_bad_rows not in ("error", "skip"):
        raise ValueError(f"on_bad_rows must be 'error' or 'skip', got {on_bad_rows!r}")
    if result.total == 0:
        raise DataError(f"{source}: no rows found", [])
    bad = len(result.problems)
    if bad and on_bad_rows == "error":
        raise DataError(
            f"{source}: {bad} of {result.total} rows are bad:\n"
            f"{format_problems(result.problems, MAX_LISTED_PROBLEMS)}\n"
            "Fix the rows or set on_bad_rows: skip",
            result.problems,
        )
    fraction = bad / result.total
    if fraction > max_bad_fraction:
        raise DataError(
            f"{source}: {bad} of {result.total} rows are bad ({fraction:.1%}), more than "
            f"max_bad_fraction {max_bad_fraction:.1%}:\n"
            f"{format_problems(result.problems, MAX_LISTED_PROBLEMS)}",
            result.problems,
        )
    if not result.rows:
        raise DataError(f"{source}: no usable rows", result.problems)
    if bad:
        logger.warning("%s: skipped %d bad rows of %d", source, bad, result.total)


def format_problems(problems: list[tuple[str, str]], limit: int) -> str:
    """``where: reason`` lines for the first ``limit`` problems, then a count of the rest."""
    lines = [f"  {where}: {reason}" for where, reason in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)


def load_checked(
    source: str,
    split: str | None,
    normalize,
    on_bad_rows: BadRowPolicy = "error",
    max_bad_fraction: float = 0.05,
    keep_fields: tuple[str, ...] = (),
) -> Normalized:
    """Read a source, normalize every row and apply the bad-row policy (raises DataError)."""
    result = normalize_rows(load_rows(source, split), normalize, keep_fields)
    enforce_bad_row_policy(source, result, on_bad_rows, max_bad_fraction)
    return result
