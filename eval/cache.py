"""What a comparison keeps in its output dir, so a re-run regenerates nothing it already has.

``OUT/generations/<label>/`` per model:

- ``model.json``: the identity of the samples (model, adapter, stage record, prompts, sampling).
  A different identity there means the model or the settings changed: that model's cache is
  cleared and it generates again (said on the console).
- ``rollouts-NNNNN.jsonl``: sharded rows written by :class:`~alignkit.rollouts.shards.ShardWriter`
  (whole lines, fsynced; a torn tail is repaired), one row per sample: ``prompt_id``,
  ``sample``, ``completion``, ``completion_ids``, ``finish_reason``. A chunk of prompts is
  written at once; a killed run resumes at the first prompt without all its samples.
- ``logprobs.json``: for each model these samples were scored under (itself, the base, a
  head-to-head rival), that model's identity and the summed completion log-prob per sample.
- ``reference_nll.json``: the model's NLL of each prompt's reference answer (sum and tokens).

Rewards are not cached: they are cheap next to generation, and the point of the cache is that
a re-run with another ``--reward`` reuses every sample.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rich.console import Console

from alignkit.rollouts.shards import ShardWriter, read_rollouts, repair_torn_tail, shard_paths
from alignkit.rundir import write_json_atomic

MODEL_FILE, LOGPROBS_FILE, NLL_FILE = "model.json", "logprobs.json", "reference_nll.json"


def sample_key(prompt_id: str, sample: int) -> str:
    return f"{prompt_id}/{sample}"


class GenerationCache:
    """One model's cached samples and scores under ``out/generations/<label>``."""

    def __init__(self, out: Path, label: str, identity: dict):
        self.dir = Path(out) / "generations" / label
        self.label = label
        self.identity = identity

    def open(self, console: Console) -> GenerationCache:
        """Create the dir, or check the identity it was made with (clearing it on a change)."""
        record = self.dir / MODEL_FILE
        if record.is_file():
            old = json.loads(record.read_text()).get("identity")
            if old != self.identity:
                changed = sorted(
                    k for k in {*old, *self.identity} if old.get(k) != self.identity.get(k)
                )
                console.print(
                    f"[yellow]note[/] {self.label}: cached samples were made with other "
                    f"{', '.join(changed)}; generating again"
                )
                shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        if not record.is_file():
            write_json_atomic(record, {"label": self.label, "identity": self.identity})
        for path in shard_paths(self.dir):
            note = repair_torn_tail(path)
            if note:
                console.print(f"[yellow]repaired[/] {note}")
        return self

    # --- samples ---
    def rows(self) -> dict[str, dict]:
        """Every cached sample by :func:`sample_key` (a later row for the same key wins: a
        prompt cut short by a kill is generated again in full)."""
        return {sample_key(r["prompt_id"], r["sample"]): r for r in read_rollouts(self.dir)}

    def missing(self, prompt_ids: list[str], n: int) -> list[str]:
        """Prompts (in the given order) that lack one of their ``n`` samples."""
        have = self.rows()
        return [p for p in prompt_ids if any(sample_key(p, j) not in have for j in range(n))]

    def write(self, rows: list[dict]) -> None:
        with ShardWriter(self.dir) as writer:
            writer.write(rows)

    # --- scores ---
    def logprobs(self, under: str, identity: dict) -> dict[str, float]:
        """Summed log-probs of these samples under model ``under`` (empty when not cached or
        cached for another version of that model)."""
        entry = self._read(LOGPROBS_FILE).get(under)
        return entry["values"] if entry and entry["identity"] == identity else {}

    def save_logprobs(self, under: str, identity: dict, values: dict[str, float]) -> None:
        data = self._read(LOGPROBS_FILE)
        data[under] = {"identity": identity, "values": values}
        write_json_atomic(self.dir / LOGPROBS_FILE, data)

    def reference_nll(self) -> dict[str, list[float]] | None:
        """``{prompt_id: [nll_sum, tokens]}`` under this model, when cached."""
        data = self._read(NLL_FILE)
        return data.get("values") if data else None

    def save_reference_nll(self, values: dict[str, list[float]]) -> None:
        write_json_atomic(self.dir / NLL_FILE, {"values": values})

    def _read(self, name: str) -> dict:
        path = self.dir / name
        return json.loads(path.read_text()) if path.is_file() else {}
