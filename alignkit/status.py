"""``alignkit status``: a run's stages as a table that fits the terminal, once or live.

The narrow view (the default below 120 columns) keeps what a person scans for: each stage's
name, kind, status, its two most telling metrics (one per line, short names) and its health;
``--wide`` adds the parent, every headline metric and the output path. ``--watch`` redraws
while the run's process is alive.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from alignkit.errors import UserError
from alignkit.rundir import LOCK_FILE, RunDir

#: (metric, short name) in the order a stage's headline is chosen from
STATUS_METRICS = (
    ("gold_gain", "gold gain"),
    ("heldout_nll", "nll"),
    ("heldout_pairwise_accuracy", "pair acc"),
    ("eval_rewards/accuracies", "pref acc"),
    ("kl_ref", "kl"),
    ("pairs", "pairs"),
    ("samples", "samples"),
    ("train_loss", "loss"),
    ("global_step", "steps"),
)
COLORS = {"complete": "green", "running": "yellow", "failed": "red", "stale": "magenta",
          "interrupted": "yellow", "stopped": "red"}  # fmt: skip
WIDE_FROM = 120  # columns from which the wide view is the default


def load_status(run_dir: Path) -> dict:
    """The manifest with each stage's state as the files show it now: a finished stage's
    metrics and health, ``stale`` when its config changed, the checkpoint an unfinished stage
    would resume from, and ``stopped`` for a stage marked running whose process is gone."""
    rd = RunDir(run_dir)
    manifest = rd.manifest()
    if manifest is None:
        raise UserError(f"{run_dir}: no manifest.json here; is this a run directory?")
    live = run_is_live(rd)
    for entry in manifest["stages"]:
        record = rd.stage_json(entry["name"])
        if record is not None and record.get("config_hash") == entry["config_hash"]:
            entry["status"] = "complete"
            entry["metrics"] = record.get("metrics", {})
            if "health" in record:
                entry["health"] = record["health"]
            entry["path"] = str(rd.stage_dir(entry["name"]))
        elif entry["status"] == "complete":
            entry["status"] = "stale"
        elif entry["status"] == "running" and not live:
            entry["status"] = "stopped"
        checkpoint = rd.state(entry["name"]).checkpoint
        if checkpoint is not None and entry["status"] != "complete":
            entry["checkpoint"] = str(checkpoint)
    manifest["live"] = live
    return manifest


def run_is_live(rd: RunDir) -> bool:
    """Whether the process holding the run directory's lock is alive (same host), judged from
    the pid the lock file names: taking the lock to test it could make a starting run fail."""
    try:
        holder = (rd.path / LOCK_FILE).read_text().split()
    except OSError:
        return False
    if len(holder) < 4 or holder[0] != "pid" or not holder[1].isdigit():
        return False
    if holder[3] != socket.gethostname():
        return True  # another node's process: assume it runs
    try:
        os.kill(int(holder[1]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def headline(metrics: dict, limit: int | None = 2) -> list[tuple[str, float]]:
    """A stage's most telling metrics, short-named: gold gain over the reference first."""
    values = dict(metrics)
    if "gold_reward" in values and "gold_reward_ref" in values:
        values["gold_gain"] = values["gold_reward"] - values["gold_reward_ref"]
    found = [(short, values[key]) for key, short in STATUS_METRICS if key in values]
    return found[:limit] if limit else found


def status_view(manifest: dict, run_dir: Path, wide: bool):
    title = Text(f"{manifest['run']}  ({run_dir})", style="bold", overflow="fold")
    table = Table(show_edge=False, expand=False)
    table.add_column("stage", no_wrap=True, overflow="fold")
    table.add_column("kind", no_wrap=True)
    if wide:
        table.add_column("from", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("metrics", no_wrap=True)
    table.add_column("health", overflow="fold")
    if wide:
        table.add_column("output", overflow="fold")
    for e in manifest["stages"]:
        st = e["status"]
        metrics = "\n".join(
            f"{name} {value:.4g}"
            for name, value in headline(e.get("metrics") or {}, None if wide else 2)
        )
        row = [escape(e["name"]), e["kind"]]
        if wide:
            row.append(escape(e.get("parent") or "-"))
        row += [
            f"[{COLORS.get(st, 'white')}]{st}[/]",
            metrics or "-",
            _health_cell(e.get("health"), wide),
        ]
        if wide:
            row.append(escape(e.get("path") or e.get("checkpoint") or "-"))
        table.add_row(*row)
    trips = [
        Text.from_markup(
            f"[yellow]health[/] {escape(e['name'])} step {t['step']}: {escape(t['message'])}"
        )
        for e in manifest["stages"]
        for t in (e.get("health") or {}).get("trips", [])
    ]
    return Group(title, table, *trips)


def _health_cell(health: dict | None, wide: bool) -> str:
    if not health:
        return "-"
    trips = health.get("trips", [])
    if not trips:
        return f"[green]ok[/] ({health.get('checks', 0)} checks)" if wide else "[green]ok[/]"
    if wide:
        return "[yellow]" + ", ".join(f"{t['check']}@{t['step']}" for t in trips) + "[/]"
    return f"[yellow]{len(trips)} trip{'s' if len(trips) > 1 else ''}[/]"


def show(run_dir: Path, console: Console, wide: bool | None = None) -> None:
    manifest = load_status(run_dir)
    console.print(status_view(manifest, run_dir, _wide(console, wide)))


def watch(run_dir: Path, console: Console, wide: bool | None = None, every: float = 2.0) -> None:
    """Redraw every ``every`` seconds until the run's process ends (or Ctrl-C)."""
    manifest = load_status(run_dir)
    with Live(status_view(manifest, run_dir, _wide(console, wide)), console=console) as live:
        while manifest["live"]:
            time.sleep(every)
            manifest = load_status(run_dir)
            live.update(status_view(manifest, run_dir, _wide(console, wide)))


def _wide(console: Console, wide: bool | None) -> bool:
    return console.width >= WIDE_FROM if wide is None else wide
