"""The model-bound work of a comparison: generate, score log-probs and reference NLL, collect.

Each model is loaded at most once per pass and only when something it must do is missing from
the cache. Pass 1 visits the models in order (aligned first, base last): generate the missing
samples, score under this model the samples whose KL it is the second argument of (its own,
and those of models already generated), and the reference answers' NLL. Pass 2 loads only a
model still owing log-probs (a head-to-head rival generated after it).
"""

from __future__ import annotations

import gc
import time
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from alignkit.eval.cache import sample_key
from alignkit.eval.logprobs import reference_completion_ids, sequence_logprobs
from alignkit.rollouts import make_engine
from alignkit.rollouts.hf import HFEngine


@dataclass
class ModelSamples:
    """Everything measured on one model's samples; arrays are ``(prompts, n)``, prompt-major."""

    label: str
    rows: list[dict]
    rewards: dict[str, np.ndarray]
    logprobs: dict[str, np.ndarray]
    """Summed completion log-probs of these samples under each scoring model, by label."""
    tokens: np.ndarray
    eos: np.ndarray
    reference_nll: np.ndarray | None
    """``(prompts, 2)``: NLL sum and tokens of each prompt's reference, under this model."""

    def kl(self, against: str) -> np.ndarray | None:
        """Per-sequence ``log p_self - log p_against`` on these samples (``None`` when the
        two models share no vocabulary)."""
        if self.label not in self.logprobs or against not in self.logprobs:
            return None
        return self.logprobs[self.label] - self.logprobs[against]


class Work:
    def __init__(self, cfg, rows, entries, caches, kl_pairs, console):
        self.cfg, self.rows, self.entries, self.caches = cfg, rows, entries, caches
        self.kl_pairs, self.console = kl_pairs, console
        self.ids = [r["id"] for r in rows]
        self.with_reference = [r for r in rows if r["reference"]]

    def run(self) -> None:
        for final in (False, True):
            for entry in self.entries:
                loaded = _Loaded(entry, self.cfg)
                try:
                    if not final:
                        self._generate(entry, loaded)
                        self._reference_nll(entry, loaded)
                    self._logprobs_under(entry, loaded)
                finally:
                    loaded.close()

    # --- the three kinds of work -------------------------------------------------------------
    def _generate(self, entry, loaded) -> None:
        cache = self.caches[entry.label]
        todo = cache.missing(self.ids, self.cfg.n)
        if not todo:
            return
        started, tokens = time.perf_counter(), 0
        for i in range(0, len(todo), self.cfg.chunk_prompts):
            chunk = todo[i : i + self.cfg.chunk_prompts]
            sampling = self.cfg.sampling.model_copy(
                update={"seed": chunk_seed(self.cfg.seed, chunk[0])}
            )
            batch = loaded.engine().generate([entry.prompt_ids[p] for p in chunk], sampling)
            cache.write(
                [
                    {
                        "prompt_id": chunk[batch.prompt_index(k)],
                        "sample": k % batch.n,
                        "completion": batch.completion_text[k],
                        "completion_ids": batch.completion_ids[k],
                        "finish_reason": batch.finish_reason[k],
                    }
                    for k in range(len(batch))
                ]
            )
            tokens += sum(len(c) for c in batch.completion_ids)
        seconds = time.perf_counter() - started
        self.console.print(
            f"  {entry.label}: {len(todo)} prompts x {self.cfg.n} samples in {seconds:.1f}s "
            f"({tokens / max(seconds, 1e-9):,.0f} tok/s)"
        )

    def _logprobs_under(self, entry, loaded) -> None:
        """Score under ``entry`` every generated sample set whose KL needs it."""
        owners = {a for a, b in self.kl_pairs if b == entry.label}
        if any(a == entry.label for a, _ in self.kl_pairs):
            owners.add(entry.label)
        for owner in sorted(owners):
            cache = self.caches[owner]
            if cache.missing(self.ids, self.cfg.n):
                continue  # not generated yet: pass 2 comes back for it
            have = cache.logprobs(entry.label, entry.identity)
            rows = cache.rows()
            todo = [rows[sample_key(p, j)] for p in self.ids for j in range(self.cfg.n)]
            todo = [r for r in todo if sample_key(r["prompt_id"], r["sample"]) not in have]
            if not todo:
                continue
            owner_prompts = next(e for e in self.entries if e.label == owner).prompt_ids
            logp = sequence_logprobs(
                loaded.model(),
                [owner_prompts[r["prompt_id"]] for r in todo],
                [r["completion_ids"] for r in todo],
                temperature=self.cfg.temperature,
                batch_size=max(1, self.cfg.batch_size // 4),
            )
            for r, lp in zip(todo, logp, strict=True):
                have[sample_key(r["prompt_id"], r["sample"])] = float(lp.sum())
            cache.save_logprobs(entry.label, entry.identity, have)

    def _reference_nll(self, entry, loaded) -> None:
        cache = self.caches[entry.label]
        have = cache.reference_nll() or {}
        todo = [r for r in self.with_reference if r["id"] not in have]
        if not todo:
            return
        prompts = [entry.prompt_ids[r["id"]] for r in todo]
        answers = [
            reference_completion_ids(entry.tokenizer, r["prompt"], p, r["reference"])
            for r, p in zip(todo, prompts, strict=True)
        ]
        logp = sequence_logprobs(
            loaded.model(), prompts, answers, batch_size=max(1, self.cfg.batch_size // 4)
        )
        for r, lp in zip(todo, logp, strict=True):
            have[r["id"]] = [float(-lp.sum()), len(lp)]
        cache.save_reference_nll(have)

    # --- everything, as arrays ---------------------------------------------------------------
    def collect(self, rewards) -> dict[str, ModelSamples]:
        """Every model's samples with their rewards (scored now), log-probs and NLL."""
        n, shape = self.cfg.n, (len(self.rows), self.cfg.n)
        per_sample = [r for r in self.rows for _ in range(n)]
        out = {}
        for entry in self.entries:
            cache = self.caches[entry.label]
            cached = cache.rows()
            rows = [cached[sample_key(p, j)] for p in self.ids for j in range(n)]
            scores = rewards.score(
                [r["prompt"] for r in per_sample],
                [r["completion"] for r in rows],
                completion_ids=[r["completion_ids"] for r in rows],
                finish_reason=[r["finish_reason"] for r in rows],
                reference=[r["reference"] for r in per_sample],
                prompt_id=[r["id"] for r in per_sample],
            )
            logprobs = {}
            for e in self.entries:
                values = cache.logprobs(e.label, e.identity)
                keys = [sample_key(r["prompt_id"], r["sample"]) for r in rows]
                if values and all(k in values for k in keys):
                    logprobs[e.label] = np.array([values[k] for k in keys]).reshape(shape)
            nll = cache.reference_nll()
            out[entry.label] = ModelSamples(
                label=entry.label,
                rows=rows,
                rewards={
                    name: np.array([np.nan if v is None else v for v in vals], dtype=float).reshape(
                        shape
                    )
                    for name, vals in scores.items()
                },
                logprobs=logprobs,
                tokens=np.array([len(r["completion_ids"]) for r in rows]).reshape(shape),
                eos=np.array([r["finish_reason"] == "stop" for r in rows]).reshape(shape),
                reference_nll=(
                    np.array([nll[r["id"]] if r["id"] in nll else [np.nan, 0] for r in self.rows])
                    if nll and self.with_reference
                    else None
                ),
            )
        return out


class _Loaded:
    """One model, loaded on first use: the engine for generation, an HF model for scoring
    (the HF engine's own model; with vLLM, a separate HF load after the engine is dropped)."""

    def __init__(self, entry, cfg):
        self.entry, self.cfg = entry, cfg
        self._engine = self._model = None

    def engine(self):
        if self._engine is None:
            self._engine = make_engine(
                self.cfg.engine,
                self.entry.source,
                batch_size=self.cfg.batch_size,
                vllm=self.cfg.vllm,
            )
        return self._engine

    def model(self):
        if self._model is None:
            if isinstance(self._engine, HFEngine):
                self._model = self._engine.model
            else:
                self.close()
                self._model = make_engine("hf", self.entry.source).model
        return self._model

    def close(self) -> None:
        loaded = self._engine is not None or self._model is not None
        self._engine = self._model = None
        if loaded:
            free_memory()


def chunk_seed(seed: int, first_prompt_id: str) -> int:
    """The seed of one engine call: the same prompts get the same seed in every model."""
    return zlib.crc32(f"{seed}:{first_prompt_id}".encode())


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
