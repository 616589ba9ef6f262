"""`alignkit data check`: read a dataset and report formats, bad rows and lengths; never fail on
bad rows (that is what the report is for), only on a source that cannot be read at all.

One ``check_<kind>`` function per data kind (sft, preference, prompts); they share the report,
the percentiles and the printing, and differ only in their row lengths and notes.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from rich.console import Console
from rich.table import Table

from alignkit.data.preference import normalize_preference_row
from alignkit.data.prompts import normalize_prompt_row
from alignkit.data.sft import mixed_kinds_problem, normalize_sft_row
from alignkit.data.sources import Normalized, load_rows, normalize_rows

LengthUnit = Literal["tokens", "characters"]
PERCENTILES = (50, 90, 99)
MAX_PRINTED_PROBLEMS = 20
# Outside this band of "chosen is longer" shares, a preference set teaches length, not content.
LENGTH_BIAS_BAND = (0.4, 0.6)


@dataclass
class CheckReport:
    """What ``check_*`` found. ``lengths`` has p50/p90/p99/max in ``length_unit`` (prefixed by
    the series name where a kind measures several, e.g. ``prompt+chosen p50``).
    ``length_bias``: for preference data, the share of pairs whose chosen is longer than its
    rejected (0.5 is unbiased)."""

    source: str
    kind: str
    total: int
    good: int
    formats: Counter
    problems: list[tuple[str, str]]
    lengths: dict[str, int]
    length_unit: LengthUnit
    notes: list[str] = field(default_factory=list)
    length_bias: float | None = None
    refusal: str | None = None
    """Why a stage would refuse this data as a whole (no rows; plain text mixed with chat): the
    check fails on exactly what ``alignkit run`` refuses."""

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
    report = build_report(source, "sft", result, lengths, tokenizer, [])
    report.refusal = report.refusal or mixed_kinds_problem(result)
    return report


def check_preference(source: str, split: str | None = None, tokenizer: Any = None) -> CheckReport:
    """Check preference pairs: lengths of prompt+chosen and prompt+rejected (tokens with
    ``tokenizer``, else characters) and the share of pairs whose chosen is the longer one."""
    result = normalize_rows(load_rows(source, split), normalize_preference_row)
    lengths: dict[str, list[int]] = {"prompt+chosen": [], "prompt+rejected": []}
    for row, where in zip(result.rows, result.wheres, strict=True):
        try:
            chosen, rejected = (
                sft_length({"messages": row["prompt"] + row[side]}, tokenizer)
                for side in ("chosen", "rejected")
            )
        except Exception as e:  # a template's own error is the finding, as in check_sft
            result.problems.append((where, f"chat template failed: {type(e).__name__}: {e}"))
            continue
        lengths["prompt+chosen"].append(chosen)
        lengths["prompt+rejected"].append(rejected)
    pairs = list(zip(lengths["prompt+chosen"], lengths["prompt+rejected"], strict=True))
    bias = sum(chosen > rejected for chosen, rejected in pairs) / len(pairs) if pairs else None
    notes = []
    if bias is not None and not LENGTH_BIAS_BAND[0] <= bias <= LENGTH_BIAS_BAND[1]:
        notes.append(
            f"chosen is longer than rejected in {bias:.1%} of pairs: a model trained on this "
            "can learn to prefer length itself; consider balancing pairs by length"
        )
    report = build_report(source, "preference", result, lengths, tokenizer, notes)
    report.length_bias = bias
    return report


def check_prompts(source: str, split: str | None = None, tokenizer: Any = None) -> CheckReport:
    """Check prompt-only data: prompt lengths as generation sees them (chat template with the
    generation prompt, or characters), how many rows carry a reference, and repeated ids."""
    result = normalize_rows(load_rows(source, split), normalize_prompt_row)
    lengths = []
    for row, where in zip(result.rows, result.wheres, strict=True):
        try:
            lengths.append(prompt_length(row["prompt"], tokenizer))
        except Exception as e:
            result.problems.append((where, f"chat template failed: {type(e).__name__}: {e}"))
    with_reference = sum(row["reference"] is not None for row in result.rows)
    notes = [f"{with_reference} of {len(result.rows)} prompts have a reference answer"]
    first_seen: dict[str, str] = {}
    repeats = []
    for row, where in zip(result.rows, result.wheres, strict=True):
        if row["id"] in first_seen:
            repeats.append(f"{where} repeats id {row['id']!r} of {first_seen[row['id']]}")
        first_seen.setdefault(row["id"], where)
    if repeats:
        notes.append(
            f"{len(repeats)} rows repeat an earlier id (e.g. {repeats[0]}); a resumable job "
            "keyed on id treats them as one prompt"
        )
    return build_report(source, "prompts", result, lengths, tokenizer, notes)


def prompt_length(prompt: list[dict], tokenizer: Any = None) -> int:
    """Length of a prompt as a generation engine sees it: templated with the generation
    prompt (tokens), or its characters."""
    if tokenizer is None:
        return sum(len(message["content"]) for message in prompt)
    ids = tokenizer.apply_chat_template(
        prompt, tokenize=True, return_dict=False, add_generation_prompt=True
    )
    return len(ids)


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
    lengths: list[int] | dict[str, list[int]],
    tokenizer: Any,
    notes: list[str],
) -> CheckReport:
    """``lengths`` is one series, or several by name (their percentiles are prefixed)."""
    if isinstance(lengths, dict):
        stats = {
            f"{name} {key}": value
            for name, series in lengths.items()
            for key, value in length_percentiles(series).items()
        }
    else:
        stats = length_percentiles(lengths)
    return CheckReport(
        source=source,
        kind=kind,
        total=result.total,
        good=result.total - len(result.problems),
        formats=result.formats,
        problems=result.problems,
        lengths=stats,
        length_unit="characters" if tokenizer is None else "tokens",
        notes=notes,
        refusal="no rows found" if result.total == 0 else None,
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
    if report.length_bias is not None:
        table.add_row("length bias", f"chosen longer in {report.length_bias:.1%} of pairs")
    console.print(table)
    for note in report.notes:
        console.print(f"[yellow]note:[/yellow] {note}", markup=True, highlight=False)
    if report.refusal:
        console.print(f"[red]refused:[/red] {report.source}: {report.refusal}", highlight=False)
    if report.problems:
        console.print(f"problems ({len(report.problems)}):", highlight=False)
        for where, reason in report.problems[:MAX_PRINTED_PROBLEMS]:
            console.print(f"  {where}: {reason}", markup=False, highlight=False)
        if len(report.problems) > MAX_PRINTED_PROBLEMS:
            rest = len(report.problems) - MAX_PRINTED_PROBLEMS
            console.print(f"  ... and {rest} more", highlight=False)
