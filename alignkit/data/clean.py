"""Data cleaning: ``alignkit data clean IN OUT`` and a stage's ``data.clean`` block.

One pass, in input order, keeping the first of any duplicates: every row is PII-scrubbed, then
judged by the rules in ``clean_report.RULES`` order and counted under the first rule that removes it.
The file command streams (JSONL, CSV and Parquet inputs are read a row at a time, the output is
written as rows are kept); what stays in memory is a digest per kept row, the near-duplicate
index (MinHash LSH and one signature per kept row) and the eval texts' n-grams. The report, with
counts and examples per rule, is written next to the output (``OUT.report.json``, ``.md``).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from alignkit.config import CleanSpec
from alignkit.data.clean_report import CleanReport, RuleCount, report_path
from alignkit.data.dedup import Decontaminator, ExactIndex, NearDupIndex
from alignkit.data.preference import IdenticalPairError, normalize_preference_row
from alignkit.data.prompts import normalize_prompt_row
from alignkit.data.quality import (
    canonical,
    empty_turn,
    identical_pair,
    length,
    non_text,
    preview,
    repeated_ngrams,
    scrub,
    texts_in,
    turns,
)
from alignkit.data.sft import normalize_sft_row
from alignkit.data.sources import Row, RowError, iter_rows, normalize_row
from alignkit.errors import DataError, UserError

NORMALIZERS = {
    "sft": normalize_sft_row,
    "preference": normalize_preference_row,
    "prompts": normalize_prompt_row,
}
OUTPUT_SUFFIXES = (".jsonl", ".parquet")
PARQUET_BATCH = 8192
EARLY_BAD_ROWS = 1000  # this many rows in and none usable: the kind is wrong, stop reading


class Cleaner:
    """Judges rows one at a time against the rules, remembering what it kept."""

    def __init__(
        self,
        spec: CleanSpec,
        report: CleanReport,
        count: Callable[[str], int],
        decontaminator: Decontaminator | None = None,
    ) -> None:
        self.spec, self.report, self.count = spec, report, count
        self.decontaminator = decontaminator
        self.pii = frozenset(spec.pii)
        self.exact = ExactIndex() if spec.exact_dedup else None
        self.near = (
            NearDupIndex(spec.near_dup_threshold, spec.num_perm, spec.shingle_words)
            if spec.near_dup_threshold is not None
            else None
        )
        report.lsh_bands = list(self.near.bands) if self.near else None

    def scrub(self, value: Any, where: str) -> Any:
        if not self.pii:
            return value
        found: Counter = Counter()
        value = scrub(value, self.pii, found)
        for kind, n in found.items():
            full = len(self.report.scrubbed.get(kind, RuleCount()).examples) >= self.spec.examples
            row = "" if full else _raw_preview(value)
            example = {"where": where, "why": f"{n} {kind} mask(s)", "row": row}
            self.report.add(self.report.scrubbed, kind, example, self.spec.examples, n)
        return value

    def reject(self, rule: str, where: str, why: str, row: str) -> None:
        example = {"where": where, "why": why, "row": row}
        self.report.add(self.report.removed, rule, example, self.spec.examples)

    def keep(self, example: dict, where: str, row_number: int) -> bool:
        """Whether a normalized (already scrubbed) row stays; records why when it does not."""
        rule, why = self._verdict(example, row_number)
        if rule is not None:
            self.reject(rule, where, why, preview(example))
            return False
        return True

    def _verdict(self, example: dict, row_number: int) -> tuple[str | None, str]:
        parts = turns(example)
        for rule, why in self._filters(example, parts):
            if why is not None:
                return rule, why
        text = canonical(parts)
        if self.exact is not None and self.exact.seen_or_add(text):
            return "exact_duplicate", "same text as an earlier row"
        if self.near is not None:
            signature = self.near.signature(" ".join(t for _, t in parts))
            match = self.near.find(signature)
            if match is not None:
                return "near_duplicate", f"Jaccard ~{match[1]:.2f} with row {match[0] + 1} read"
            self.near.add(signature, row_number)
        return None, ""

    def _filters(self, example: dict, parts: list) -> Iterator[tuple[str, str | None]]:
        """``(rule, why or None)`` of each filter in report order, computed only when reached."""
        spec = self.spec
        if spec.identical_pairs:
            yield "identical_pair", identical_pair(example)
        if spec.empty_turns:
            yield "empty_turn", empty_turn(parts)
        if spec.non_text:
            yield "non_text", non_text(parts)
        low, high = spec.min_length, spec.max_length
        yield "length", length(example, self.count, low, high, spec.length_unit)
        share = spec.max_repeated_ngram_share
        yield "repeated_ngrams", repeated_ngrams(parts, spec.repeated_ngram, share)
        yield "contaminated", contamination(self.decontaminator, parts)


def contamination(index: Decontaminator | None, parts: list) -> str | None:
    """Why a row's turns leak an eval text in ``index``, or None."""
    if index is None:
        return None
    for place, text in parts:
        hit = index.hit(text)
        if hit is not None:
            return f"{place} shares {hit!r} with an eval text"
    return None


def eval_source(name: str) -> tuple[str, str | None]:
    """``SOURCE`` or ``SOURCE@SPLIT`` from ``decontaminate``: a Hub or builtin eval set is read
    from its ``test`` split unless another is named (a local file has no splits)."""
    source, at, split = name.rpartition("@")
    if at and split.isidentifier() and not Path(name).exists():
        return source, split
    return name, "test"


def decontaminator(spec: CleanSpec, sources: Iterable[tuple[str, str | None]], extra=()):
    """The n-gram index of every text in ``sources`` ((source, split) pairs, any format) and
    ``extra`` texts; None when there is nothing to check against."""
    index = Decontaminator(spec.ngram)
    for source, split in sources:
        for row in iter_rows(source, split):
            for text in texts_in(row.data or {}):
                index.add(text)
    for text in extra:
        index.add(text)
    return index if index else None


def token_counter(tokenizer) -> Callable[[str], int]:
    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return count


def word_count(text: str) -> int:
    return len(text.split())


# --- the file command ------------------------------------------------------------------------------


def clean_file(
    source: str,
    out: Path,
    kind: str,
    spec: CleanSpec,
    *,
    split: str | None = None,
    tokenizer=None,
    max_bad_fraction: float = 0.05,
) -> CleanReport:
    """Stream ``source`` into a cleaned ``out`` (.jsonl or .parquet, rows in their own format,
    PII masked) and write the report beside it. The input is only read; ``out`` appears whole
    or not at all."""
    start = time.perf_counter()
    normalize = NORMALIZERS.get(kind)
    if normalize is None:
        raise UserError(f"--kind {kind!r}: supported kinds: {', '.join(NORMALIZERS)}")
    out = _check_output(source, out)
    if spec.length_unit == "tokens" and tokenizer is None and (spec.min_length or spec.max_length):
        raise UserError("length_unit: tokens needs --tokenizer MODEL (or use words)")
    report = CleanReport(source, kind, spec.model_dump(mode="json"), output=str(out))
    decon = decontaminator(spec, [eval_source(s) for s in spec.decontaminate])
    report.decontamination_texts = decon.texts if decon else 0
    count = token_counter(tokenizer) if spec.length_unit == "tokens" and tokenizer else word_count
    cleaner = Cleaner(spec, report, count, decon)
    partial = out.with_name(f".{out.name}.partial")
    try:
        with _writer(partial) as write:
            for raw in _judged(iter_rows(source, split), normalize, cleaner):
                write(raw)
                report.rows_out += 1
        _check_bad_rows(source, report, max_bad_fraction)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    report.seconds = time.perf_counter() - start
    report.peak_rss_mb = peak_rss_mb()
    report.write(report_path(out))
    return report


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB: Linux's VmHWM (the peak of this program
    alone; ``ru_maxrss`` would include the memory of a parent that forked it), else
    ``ru_maxrss``; 0 where neither exists."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import resource  # Unix only
    except ImportError:
        return 0.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _judged(rows: Iterator[Row], normalize, cleaner: Cleaner) -> Iterator[dict]:
    """The raw rows that stay, scrubbed; counts every row in the report."""
    report = cleaner.report
    for number, row in enumerate(rows):
        report.rows_in += 1
        raw = cleaner.scrub(row.data, row.where) if row.data is not None else None
        try:
            _, example = normalize_row(Row(raw, row.where, row.error), normalize)
        except IdenticalPairError as e:
            cleaner.reject("identical_pair", row.where, str(e), _raw_preview(raw))
            continue
        except RowError as e:
            cleaner.reject("bad_row", row.where, str(e), _raw_preview(raw))
            if number + 1 >= EARLY_BAD_ROWS and report.removed["bad_row"].count == number + 1:
                break  # no row usable so far: wrong --kind or not a dataset; report below
            continue
        if cleaner.keep(example, row.where, number):
            yield raw


def _raw_preview(raw: dict | None, limit: int = 200) -> str:
    text = json.dumps(raw, ensure_ascii=False) if raw is not None else ""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_bad_rows(source: str, report: CleanReport, max_bad_fraction: float) -> None:
    bad = report.removed["bad_row"]
    if report.rows_in == 0:
        raise DataError(f"{source}: no rows found")
    if bad.count / report.rows_in > max_bad_fraction:
        listed = "\n".join(f"  {e['where']}: {e['why']}" for e in bad.examples)
        raise DataError(
            f"{source}: {bad.count} of {report.rows_in} rows read are bad, more than "
            f"max_bad_fraction {max_bad_fraction:.0%} (is --kind {report.kind} right?); "
            f"first ones:\n{listed}\nNothing was written."
        )


def _check_output(source: str, out: Path) -> Path:
    out = Path(out).expanduser()
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise UserError(f"output {out}: write a .jsonl or .parquet file")
    src = Path(source).expanduser()
    if src.exists() and (out.resolve() == src.resolve() or (out.exists() and out.samefile(src))):
        raise UserError(f"output {out} is the input; the input is never overwritten: name another")
    if out.is_dir():
        raise UserError(f"output {out} is a directory; name a file")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


class _writer:
    """Context manager yielding ``write(row)`` for a JSONL or Parquet file."""

    def __init__(self, path: Path) -> None:
        self.path, self.parquet = path, path.name.endswith(".parquet.partial")
        self.batch: list[dict] = []
        self.pq_writer = None

    def __enter__(self):
        if not self.parquet:
            self.file = self.path.open("w", encoding="utf-8")
            return lambda row: self.file.write(json.dumps(row, ensure_ascii=False) + "\n")
        return self._add

    def _add(self, row: dict) -> None:
        self.batch.append(row)
        if len(self.batch) >= PARQUET_BATCH:
            self._flush()

    def _flush(self) -> None:
        # only for Parquet output
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.batch:
            return
        try:
            schema = self.pq_writer.schema if self.pq_writer else None
            table = pa.Table.from_pylist(self.batch, schema=schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError) as e:
            raise UserError(
                f"rows of different shapes cannot share one Parquet schema ({e}); "
                "write a .jsonl output instead"
            ) from None
        if self.pq_writer is None:
            self.pq_writer = pq.ParquetWriter(self.path, table.schema)
        self.pq_writer.write_table(table)
        self.batch = []

    def __exit__(self, *exc) -> None:
        if not self.parquet:
            self.file.close()
            return
        if exc[0] is None:
            self._flush()
        if self.pq_writer is not None:
            self.pq_writer.close()
        elif exc[0] is None:  # no rows kept: an empty file with no columns
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table({}), self.path)


# --- a stage's data ------------------------------------------------------------------------------


def clean_rows(
    rows: list[dict], spec: CleanSpec, report: CleanReport, count: Callable[[str], int], name: str
) -> tuple[list[dict], list[int]]:
    """Scrub and judge normalized rows (a stage's training or held-out set) by the file
    command's rules, except decontamination (:func:`decontaminate`, after the split). Returns
    the kept rows and their indices in ``rows``."""
    cleaner = Cleaner(spec, report, count)
    kept, index = [], []
    for i, row in enumerate(rows):
        where = f"{name} row {i}"
        report.rows_in += 1
        row = cleaner.scrub(row, where)
        if cleaner.keep(row, where, i):
            kept.append(row)
            index.append(i)
    report.rows_out += len(kept)
    return kept, index


def decontaminate(
    rows: list[dict], spec: CleanSpec, report: CleanReport, index: Decontaminator | None
) -> list[dict]:
    """Drop the training rows that overlap the eval texts in ``index``."""
    if index is None:
        return rows
    kept = []
    for i, row in enumerate(rows):
        why = contamination(index, turns(row))
        if why is None:
            kept.append(row)
        else:
            example = {"where": f"train row {i}", "why": why, "row": preview(row)}
            report.add(report.removed, "contaminated", example, spec.examples)
    report.rows_out -= len(rows) - len(kept)
    report.decontamination_texts = index.texts
    return kept
