"""Run directory and manifest.

Layout of ``<run_dir>``::

    manifest.json        stages in order: status, config hash, parent, output dir
    <stage>/             a finished stage (complete only when stage.json exists)
    .<stage>.partial/    a stage in progress: trainer checkpoints live here until it finishes

A stage writes into its partial dir; :meth:`RunDir.finish_stage` writes ``stage.json`` there and
renames the dir into place, so a reader never sees half a stage. Only the main process writes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STAGE_FILE = "stage.json"
MANIFEST_FILE = "manifest.json"
HASH_FILE = ".config_hash"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temp file beside ``path`` and rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def latest_checkpoint(directory: Path) -> Path | None:
    """The ``checkpoint-N`` with the highest N under ``directory`` that holds trainer state."""
    if not directory.is_dir():
        return None
    best: tuple[int, Path] | None = None
    for child in directory.iterdir():
        m = CHECKPOINT_RE.match(child.name)
        if m and (child / "trainer_state.json").exists():
            step = int(m.group(1))
            if best is None or step > best[0]:
                best = (step, child)
    return best[1] if best else None


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
        f = self.stage_dir(name) / STAGE_FILE
        return read_json(f) if f.exists() else None

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
        return read_json(self.manifest_path) if self.manifest_path.exists() else None

    # --- writing (main process only) ---
    def begin_stage(self, name: str, config_hash: str, resume: bool) -> Path:
        """Return the partial dir to write into; keep it (and its checkpoints) when resuming."""
        partial = self.partial_dir(name)
        if not self.is_main:
            return partial
        if partial.exists() and not resume:
            shutil.rmtree(partial)
        partial.mkdir(parents=True, exist_ok=True)
        (partial / HASH_FILE).write_text(config_hash + "\n")
        return partial

    def finish_stage(self, name: str, record: dict) -> Path:
        """Write stage.json into the partial dir, drop its checkpoints, and rename it into place."""
        partial, final = self.partial_dir(name), self.stage_dir(name)
        if not self.is_main:
            return final
        shutil.rmtree(partial / "checkpoints", ignore_errors=True)
        (partial / HASH_FILE).unlink(missing_ok=True)
        write_json_atomic(partial / STAGE_FILE, record)
        old = None
        if final.exists():
            old = self.path / f".{name}.old-{int(time.time() * 1000)}"
            os.replace(final, old)
        os.replace(partial, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def write_manifest(self, manifest: dict) -> None:
        if self.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.manifest_path, manifest)
