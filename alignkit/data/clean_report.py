"""The report of a clean pass: rows in and out, and per rule a count and a few examples; written
as JSON with a Markdown twin, and printed as a table."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.table import Table

#: Rules in the order they are checked; a removed row counts under the first that fires.
RULES = (
    "bad_row",
    "identical_pair",
    "empty_turn",
    "non_text",
    "length",
    "repeated_ngrams",
    "contaminated",
    "exact_duplicate",
    "near_duplicate",
)


@dataclass
class RuleCount:
    count: int = 0
    examples: list[dict] = field(default_factory=list)


@dataclass
class CleanReport:
    """What a clean pass did: rows in and out, removals and PII masks per rule with examples."""

    source: str
    kind: str
    settings: dict
    output: str | None = None
    rows_in: int = 0
    rows_out: int = 0
    removed: dict[str, RuleCount] = field(default_factory=lambda: {r: RuleCount() for r in RULES})
    scrubbed: dict[str, RuleCount] = field(default_factory=dict)
    decontamination_texts: int = 0
    lsh_bands: list[int] | None = None
    seconds: float = 0.0
    peak_rss_mb: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)

    def write(self, json_path: Path) -> tuple[Path, Path]:
        """``json_path`` and a Markdown twin beside it."""
        json_path.write_text(json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n")
        md_path = json_path.with_suffix(".md")
        md_path.write_text(self.markdown())
        return json_path, md_path

    def markdown(self) -> str:
        lines = [
            f"# Data cleaning: {self.source}",
            "",
            f"{self.rows_in} rows in, {self.rows_out} out ({self.kind}); "
            f"{self.seconds:.1f} s, peak memory {self.peak_rss_mb:.0f} MB (process).",
            "",
            "| rule | rows removed |",
            "|---|---|",
            *(f"| {rule} | {c.count} |" for rule, c in self.removed.items()),
            "",
            "| PII scrubbed (a regex scrub, not a guarantee) | masks |",
            "|---|---|",
            *(f"| {kind} | {c.count} |" for kind, c in self.scrubbed.items()),
        ]
        for title, table in (("Removed", self.removed), ("Scrubbed", self.scrubbed)):
            for rule, c in table.items():
                for ex in c.examples:
                    lines.append(f"- {title} `{rule}` at {ex['where']}: {ex['why']} — {ex['row']}")
        return "\n".join(lines) + "\n"

    def add(self, table: dict[str, RuleCount], rule: str, example: dict, limit: int, n=1) -> None:
        entry = table.setdefault(rule, RuleCount())
        entry.count += n
        if len(entry.examples) < limit:
            entry.examples.append(example)


def print_report(report: CleanReport, console) -> None:

    table = Table(title=f"{report.rows_in} rows in, {report.rows_out} kept")
    for column in ("rule", "removed", "example"):
        table.add_column(column)
    for rule, c in report.removed.items():
        example = f"{c.examples[0]['where']}: {c.examples[0]['why']}" if c.examples else ""
        table.add_row(rule, str(c.count), example, style=None if c.count else "dim")
    for kind, c in report.scrubbed.items():
        table.add_row(f"pii: {kind} (masked)", str(c.count), c.examples[0]["where"])
    console.print(table)


def report_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(out.suffix) + ".report.json")
