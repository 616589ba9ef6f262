"""`alignkit data check`: read a dataset and report formats, bad rows and lengths; never fail on
bad rows (that is what the report is for), only on a source that cannot be read at all.

One ``check_<kind>`` function per data kind; they share the report, the percentiles and the
printing, so a preference check sits beside ``check_sft`` with only its own row lengths.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from rich.console import Console
from rich.table import Table

from alignkit.data.sft import mixed_kinds_problem, normalize_sft_row
from alignkit.data.sources import Normalized, load_rows, normalize_rows

LengthUnit = Literal["tokens", "characters"]
PERCENTILES = (50, 90, 99)
MAX_PRINTED_PROBLEMS = 20


@dataclass
class CheckReport:
    """What ``check_*`` found. ``lengths`` has p50/p90/p99/max in ``length_unit``."""

    source: str
    kind: str
    total: int
    good: int
    formats: Counter
    problems: list[tuple[str, str]]
    lengths: dict[str, int]
    length_unit: LengthUnit
    notes: list[str] = field(default_factory=list)

    @property
    def bad(self) -> int:
        return self.total - self.good


def check_sft(source: str, split: str | None = None, tokenizer: Any = None) -> CheckReport:
    """Check SFT data; lengths are tokens with ``tokenizer`` (chat template applied), else
    characters. Rows the chat template rejects are reported as problems."""
    result = normalize_rows(load_rows(source, split), normalize_sft_row)
    lengths = []
    for row, where in zip(result.rows, result.wheres, strict=True):
        try:
            lengths.append(sft_length(row, tokenizer))
        except Exception as e:  # a template's own error (e.g. no system role) is the finding
            result.problems.append((where, f"chat template failed: {type(e).__name__}: {e}"))
    notes = [note for note in [mixed_kinds_problem(result)] if note is not None]
    return build_report(source, "sft", result, lengths, tokenizer, notes)


def sft_length(row: dict, tokenizer: Any = None) -> int:
    """Length of one normalized SFT row: tokens as the trainer will see them, or characters."""
    if "text" in row:
        if tokenizer is None:
            return len(row["text"])
        return len(tokenizer(row["text"])["input_ids"])
    if tokenizer is None:
        return sum(len(message["content"]) for message in row["messages"])
    return len(tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=False))


def build_report(
    source: str,
    kind: str,
    result: Normalized,
    lengths: list[int],
    tokenizer: Any,
    notes: list[str],
) -> CheckReport:
    return CheckReport(
        source=source,
        kind=kind,
        total=result.total,
        good=result.total - len(result.problems),
        formats=result.formats,
        problems=result.problems,
        lengths=length_percentiles(lengths),
        length_unit="characters" if tokenizer is None else "tokens",
        notes=notes,
    )


def length_percentiles(lengths: list[int]) -> dict[str, int]:
    """Nearest-rank p50/p90/p99 and max (each an observed length); empty for no lengths."""
    if not lengths:
        return {}
    ordered = sorted(lengths)
    stats = {f"p{p}": ordered[math.ceil(p / 100 * len(ordered)) - 1] for p in PERCENTILES}
    stats["max"] = ordered[-1]
    return stats


def print_report(report: CheckReport, console: Console) -> None:
    """A summary table, then the first problems as ``where: reason`` lines."""
    table = Table(title=f"{report.kind} data: {report.source}", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("rows", str(report.total))
    table.add_row("good", str(report.good))
    table.add_row("bad", str(report.bad))
    formats = ", ".join(f"{name} {count}" for name, count in report.formats.most_common())
    table.add_row("formats", formats or "-")
    for name, value in report.lengths.items():
        table.add_row(f"length {name} ({report.length_unit})", str(value))
    console.print(table)
    for note in report.notes:
        console.print(f"[yellow]note:[/yellow] {note}", markup=True, highlight=False)
    if report.problems:
        console.print(f"problems ({len(report.problems)}):", highlight=False)
        for where, reason in report.problems[:MAX_PRINTED_PROBLEMS]:
            console.print(f"  {where}: {reason}", markup=False, highlight=False)
        if len(report.problems) > MAX_PRINTED_PROBLEMS:
            rest = len(report.problems) - MAX_PRINTED_PROBLEMS
            console.print(f"  ... and {rest} more", highlight=False)
