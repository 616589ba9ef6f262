"""Run directory and manifest.

Layout of ``<run_dir>``::

    manifest.json        stages in order: status, config hash, parent, output dir
    report.html          the run page (``alignkit report``), written at the end of ``alignkit run``
    tracking/            the trackers' files when ``run.report_to`` is set (default tracking_dir)
    <stage>/             a finished stage (complete only when stage.json exists)
    .<stage>.partial/    a stage in progress: trainer checkpoints live here until it finishes

A stage writes into its partial dir; :meth:`RunDir.finish_stage` writes ``stage.json`` there and
renames the dir into place, so a reader never sees half a stage. Only the main process writes.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignkit.errors import UserError

log = logging.getLogger(__name__)

STAGE_FILE = "stage.json"
MANIFEST_FILE = "manifest.json"
HASH_FILE = ".config_hash"
LOCK_FILE = ".lock"
#: Names a stage may not take: they would collide with the run directory's own files.
REPORT_FILE = "report.html"
TRACKING_DIR = "tracking"
RESERVED_NAMES = (MANIFEST_FILE, LOCK_FILE, REPORT_FILE, TRACKING_DIR)
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def match_directory_modes(root: Path) -> None:
    """Give every file under ``root`` the read/write bits its directory got from the umask.

    Some writers create private files (safetensors writes weights 0600) while everything else
    follows the umask (0644): a run directory shared with a team, or copied to a server, would
    have unreadable weights beside readable configs."""
    file_mode = root.stat().st_mode & 0o666
    for path in [root, *root.rglob("*")]:
        if path.is_file() and not path.is_symlink():
            path.chmod(file_mode)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temp file beside ``path``, fsync it, rename it over ``path`` and fsync
    the directory: after a crash the file is the old one or the new one, never torn."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def read_json_or_none(path: Path) -> Any:
    """The JSON in ``path``; None when it is missing or unreadable (torn by a crash, edited by
    hand), with a warning naming it: a state file that cannot be read counts as absent."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable %s (%s); it is treated as absent", path, e)
        return None


def trim_logs_to_step(stage_dir: Path, step: int) -> None:
    """On resume from checkpoint ``step``: drop what was logged after it (those steps run
    again) from ``metrics.jsonl``, ``samples.jsonl`` and ``health.json``, and any torn line."""
    for name in ("metrics.jsonl", "samples.jsonl"):
        path = stage_dir / name
        if not path.exists():
            continue
        kept = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a torn last line
            if isinstance(row, dict) and row.get("step", 0) <= step:
                kept.append(line)
        write_text_atomic(path, "".join(line + "\n" for line in kept))
    health = stage_dir / "health.json"
    saved = read_json_or_none(health) if health.exists() else None
    if isinstance(saved, dict):
        saved["history"] = [h for h in saved.get("history", []) if h.get("step", 0) <= step]
        saved["trips"] = [t for t in saved.get("trips", []) if t.get("step", 0) <= step]
        write_json_atomic(health, saved)


def checkpoint_step(checkpoint: Path) -> int:
    """N of a ``checkpoint-N`` directory."""
    return int(CHECKPOINT_RE.match(checkpoint.name).group(1))


def latest_checkpoint(directory: Path) -> Path | None:
    """The checkpoint an interrupted stage resumes from: the ``checkpoint-N`` under
    ``directory`` with the highest N that holds trainer state and was saved while training
    was still going on.

    A checkpoint transformers saved after training had stopped (its last step, or early
    stopping) is passed over: transformers resumed from it takes one more optimizer step before
    it checks whether to stop, so the stage would end one step past the uninterrupted run.
    Resuming from the checkpoint before it repeats those steps exactly; with none, the stage
    starts again."""
    if not directory.is_dir():
        return None
    best: tuple[int, Path] | None = None
    for child in directory.iterdir():
        m = CHECKPOINT_RE.match(child.name)
        state = read_json_or_none(child / "trainer_state.json") if m else None
        if isinstance(state, dict) and not training_had_stopped(state):
            step = int(m.group(1))
            if best is None or step > best[0]:
                best = (step, child)
    return best[1] if best else None


def training_had_stopped(trainer_state: dict) -> bool:
    """Whether a transformers ``trainer_state.json`` was saved at or after the end of training:
    ``global_step`` reached ``max_steps``, or a callback had set ``should_training_stop`` (early
    stopping). PPO's checkpoints record only ``global_step``; its own loop resumes exactly."""
    max_steps = trainer_state.get("max_steps")
    step = trainer_state.get("global_step")
    if isinstance(max_steps, int) and isinstance(step, int) and 0 < max_steps <= step:
        return True
    control = trainer_state.get("stateful_callbacks", {}).get("TrainerControl", {})
    if isinstance(control, list):  # transformers keeps a list when several share a class
        control = control[0] if control else {}
    return bool(control.get("args", {}).get("should_training_stop"))


@dataclass
class StageState:
    """What is on disk for one stage."""

    name: str
    complete_hash: str | None  # hash recorded in <stage>/stage.json, if complete
    partial_hash: str | None  # hash of an interrupted attempt, if any
    checkpoint: Path | None  # latest checkpoint of that attempt


class RunDir:
    def __init__(self, path: str | Path, is_main: bool = True):
        self.path = Path(path)
        self.is_main = is_main

    # --- paths ---
    def stage_dir(self, name: str) -> Path:
        return self.path / name

    def partial_dir(self, name: str) -> Path:
        return self.path / f".{name}.partial"

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_FILE

    # --- reading ---
    def stage_json(self, name: str) -> dict | None:
        return read_json_or_none(self.stage_dir(name) / STAGE_FILE)

    def state(self, name: str) -> StageState:
        done = self.stage_json(name)
        partial = self.partial_dir(name)
        hash_file = partial / HASH_FILE
        partial_hash = hash_file.read_text().strip() if hash_file.exists() else None
        return StageState(
            name=name,
            complete_hash=done.get("config_hash") if done else None,
            partial_hash=partial_hash,
            checkpoint=latest_checkpoint(partial / "checkpoints") if partial_hash else None,
        )

    def manifest(self) -> dict | None:
        return read_json_or_none(self.manifest_path)

    # --- writing (main process only) ---
    def begin_stage(self, name: str, config_hash: str, resume: bool) -> Path:
        """Return the partial dir to write into; keep it (and its checkpoints) when resuming."""
        partial = self.partial_dir(name)
        if not self.is_main:
            return partial
        if partial.exists() and not resume:
            shutil.rmtree(partial)
        partial.mkdir(parents=True, exist_ok=True)
        write_text_atomic(partial / HASH_FILE, config_hash + "\n")
        return partial

    def finish_stage(self, name: str, record: dict) -> Path:
        """Write stage.json into the partial dir, drop its checkpoints, and rename it into place.

        stage.json is written first: a crash before the rename leaves the partial dir with its
        hash and checkpoints, so the next run resumes rather than losing the training."""
        partial, final = self.partial_dir(name), self.stage_dir(name)
        if not self.is_main:
            return final
        write_json_atomic(partial / STAGE_FILE, record)
        shutil.rmtree(partial / "checkpoints", ignore_errors=True)
        (partial / HASH_FILE).unlink(missing_ok=True)
        match_directory_modes(partial)
        old = None
        if final.exists():
            old = self.path / f".{name}.old-{int(time.time() * 1000)}"
            os.replace(final, old)
        os.replace(partial, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return final

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run directory for this process (one run per directory): a second run
        on it stops at once with a UserError naming the holder. The OS releases the lock
        when its process dies, so a stale lock file is taken over (and said so)."""
        if not self.is_main:
            yield
            return
        self.path.mkdir(parents=True, exist_ok=True)
        path = self.path / LOCK_FILE
        handle = open(path, "a+")  # noqa: SIM115 (held for the whole run)
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise UserError(
                    f"run directory {self.path} is in use by {holder}; wait for that run to end "
                    "or choose another --run-dir"
                ) from None
            handle.seek(0)
            previous = handle.read().strip()
            if previous:
                log.warning("taking over the lock of a run that ended without releasing it (%s)",
                            previous)  # fmt: skip
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
            handle.flush()
            try:
                yield
            finally:
                handle.seek(0)
                handle.truncate()
                handle.flush()
                fcntl.flock(handle, fcntl.LOCK_UN)
        finally:
            handle.close()

    def write_manifest(self, manifest: dict) -> None:
        if self.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.manifest_path, manifest)
