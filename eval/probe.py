"""The health probe: sample a few held-out prompts mid-training and measure what degenerates.

:class:`HealthProbe` samples the policy (fixed prompts and seed, ``top_k=0``), scores the samples'
log-probs under the policy and its reference (KL per sequence), and measures response length,
repetition (share of token 3-grams that repeat an earlier one in the same response), the
invalid-token rate (undecodable bytes and unknown tokens; on the builtin task, words outside its
vocabulary) and, on the builtin task, the gold reward. Each call appends its samples to
``samples.jsonl`` with the step, so a run can be read back as it went (and to the run's trackers
as a table).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from alignkit.builtin.task import all_words
from alignkit.config import HeldoutSpec
from alignkit.eval.heldout import sample
from alignkit.eval.logprobs import sequence_logprobs
from alignkit.handoff import AdapterView
from alignkit.health import SAMPLES_FILE, HealthSpec
from alignkit.rewards.gold import gold_reward
from alignkit.tracking import NO_TRACKING, StageTracker


class HealthProbe:
    def __init__(
        self,
        spec: HealthSpec,
        prompts: list[dict],
        policy: AdapterView,
        reference: AdapterView | None,
        tokenizer,
        out_dir: Path,
        builtin: bool,
        is_main: bool = True,
        tracker: StageTracker = NO_TRACKING,
    ):
        self.rows = prompts[: spec.sample_prompts]
        self.policy, self.reference, self.tokenizer = policy, reference, tokenizer
        self.path, self.builtin, self.is_main = out_dir / SAMPLES_FILE, builtin, is_main
        self.tracker = tracker
        self.sampling = HeldoutSpec(
            num_prompts=spec.sample_prompts,
            samples_per_prompt=spec.samples_per_prompt,
            max_new_tokens=spec.max_new_tokens,
            seed=4321,
        )

    def __call__(self, step: int) -> dict[str, float]:

        with torch.random.fork_rng():  # a probe must not move the training's random stream
            return self._measure(step)

    def _measure(self, step: int) -> dict[str, float]:
        prompts = [r["prompt"] for r in self.rows]
        batch = sample(self.policy, self.tokenizer, prompts, self.sampling)
        values = {
            "length": float(np.mean([len(c) for c in batch.completion_ids])),
            "repetition": float(np.mean([repetition(c) for c in batch.completion_ids])),
            "invalid": self._invalid(batch),
        }
        kl = None
        if self.reference is not None:
            ids = batch.sample_prompt_ids()
            ours = sequence_logprobs(self.policy, ids, batch.completion_ids)
            theirs = sequence_logprobs(self.reference, ids, batch.completion_ids)
            kl = [float((a - b).sum()) for a, b in zip(ours, theirs, strict=True)]
            values["kl"] = float(np.mean(kl))
        gold = None
        if self.builtin:
            gold = gold_reward([p for p in prompts for _ in range(batch.n)], batch.completion_text)
            values["gold"] = float(np.mean(gold))
        if self.is_main:
            self._write(step, prompts, batch, kl, gold)
        return values

    def _invalid(self, batch) -> float:
        if self.builtin:
            vocab = set(all_words())
            words = [w for t in batch.completion_text for w in t.replace(".", " ").split()]
            return sum(w not in vocab for w in words) / max(len(words), 1)
        unk = self.tokenizer.unk_token_id
        tokens = sum(len(ids) for ids in batch.completion_ids)
        bad = sum(t.count("\ufffd") for t in batch.completion_text)  # undecodable bytes
        bad += sum(token == unk for ids in batch.completion_ids for token in ids)
        return bad / max(tokens, 1)

    def _write(self, step, prompts, batch, kl, gold) -> None:
        rows = []
        for k, text in enumerate(batch.completion_text):
            prompt = prompts[k // batch.n]
            row = {
                "step": step,
                "prompt": prompt if isinstance(prompt, str) else prompt[-1]["content"],
                "completion": text,
                "tokens": len(batch.completion_ids[k]),
                "finish_reason": batch.finish_reason[k],
            }
            if kl is not None:
                row["kl"] = round(kl[k], 4)
            if gold is not None:
                row["gold"] = round(gold[k], 4)
            rows.append(row)
        with self.path.open("a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        self.tracker.table("samples", rows, step)


def repetition(ids: list[int], n: int = 3) -> float:
    """Share of a sequence's ``n``-grams that repeat an earlier one in it (0: none repeat)."""
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0
