"""The HF engine: ``transformers`` ``generate`` with left padding and the KV cache.

It is the reference for correctness and the CPU default. Prompts are sorted by length (longest
first, so a batch that does not fit fails at once) and cut into batches of ``batch_size``
sequences (prompts x samples); results come back in the caller's order.

What it guards against (see ``../shared/notes/builtin-task-facts.md``):
- ``generate`` fills every unset option from the model's ``generation_config.json`` and then
  from global defaults (top-k 50; Qwen's instruct configs add repetition_penalty 1.05,
  top-k 20, ...). For the duration of a call the model gets a blank generation config, so it
  samples exactly what :class:`SamplingSpec` says.
- Temperature, top-k and top-p run as our own processors, followed by a recorder, so the
  recorded log-probs are those of the distribution actually sampled from.
- The completion is cut at the first EOS / stop token (kept) or stop string; what ``generate``
  pads after it is dropped, so a tokenizer whose pad equals EOS loses no EOS.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
from peft import PeftModel
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from alignkit.models import load_adapter, load_base, load_tokenizer
from alignkit.rollouts.source import ModelSource
from alignkit.rollouts.types import Prompt, RolloutBatch, SamplingSpec, encode_prompts


class HFEngine:
    """Generate with a loaded (peft or plain) causal LM. The model is used as is, not copied:
    a PPO loop can hand its live policy over and sample from its current weights."""

    def __init__(self, model, tokenizer, batch_size: int = 64):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.eos_ids = _eos_ids(model, tokenizer)

    @classmethod
    def from_source(cls, source: ModelSource, batch_size: int = 64) -> HFEngine:

        tokenizer = load_tokenizer(source.tokenizer_dir, source.spec)
        model = load_base(source.spec, tokenizer, path=source.model_path)
        if source.adapter_dir is not None:
            model = load_adapter(model, source.adapter_dir, trainable=False)
        if torch.cuda.is_available() and source.spec.quantization == "none":
            model = model.to("cuda")
        return cls(model.eval(), tokenizer, batch_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(self, prompts: Sequence[Prompt], cfg: SamplingSpec) -> RolloutBatch:
        prompt_ids = encode_prompts(self.tokenizer, prompts)
        order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
        per_batch = max(1, self.batch_size // cfg.n)
        samples: dict[int, list[tuple]] = {}
        with (
            _fork_rng(cfg.seed, self.device),
            _blank_generation_config(self.model),
            _eval(self.model),
        ):
            for start in range(0, len(order), per_batch):
                idx = order[start : start + per_batch]
                rows = self._generate_batch([prompt_ids[i] for i in idx], cfg)
                for j, i in enumerate(idx):
                    samples[i] = rows[j * cfg.n : (j + 1) * cfg.n]
        flat = [s for i in range(len(prompt_ids)) for s in samples[i]]
        return RolloutBatch(
            prompt_ids=prompt_ids,
            prompt_text=[self.tokenizer.decode(p) for p in prompt_ids],
            completion_ids=[s[0] for s in flat],
            completion_text=[s[1] for s in flat],
            finish_reason=[s[2] for s in flat],
            n=cfg.n,
            logprobs=[s[3] for s in flat] if cfg.logprobs else None,
        )

    @torch.no_grad()
    def _generate_batch(self, batch: list[list[int]], cfg: SamplingSpec) -> list[tuple]:
        """One ``generate`` call: ``(ids, text, finish_reason, logprobs)`` per sample, prompt-major."""
        pad = self.tokenizer.pad_token_id
        batch = [p for p in batch for _ in range(cfg.n)]  # prompt-major, as num_return_sequences
        width = max(len(p) for p in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, p in enumerate(batch):  # left padding: every prompt ends where generation starts
            input_ids[r, width - len(p) :] = torch.tensor(p)
            attention_mask[r, width - len(p) :] = 1
        stop_ids = set(cfg.stop_token_ids) | (set() if cfg.ignore_eos else self.eos_ids)
        recorder = _LogprobRecorder() if cfg.logprobs else None
        out = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            generation_config=GenerationConfig(
                do_sample=not cfg.greedy,
                num_beams=1,
                # the warpers below do temperature/top-k/top-p; these keep generate's own off
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                repetition_penalty=1.0,
                max_new_tokens=cfg.max_new_tokens,
                eos_token_id=sorted(stop_ids) or None,
                pad_token_id=pad,
                stop_strings=cfg.stop or None,
                use_cache=True,
            ),
            logits_processor=LogitsProcessorList(
                [*_warpers(cfg), *([recorder] if recorder else [])]
            ),
            tokenizer=self.tokenizer if cfg.stop else None,
        )
        generated = out[:, width:].tolist()
        logprobs = recorder.finish(out[:, -1]).tolist() if recorder else None
        rows = []
        for k, toks in enumerate(generated):
            end, reason = _completion_end(toks, stop_ids, cfg.stop, self.tokenizer)
            text = self.tokenizer.decode(toks[:end], skip_special_tokens=True)
            if cfg.stop and reason == "stop":
                text = _cut_at_stop(text, cfg.stop)
            rows.append((toks[:end], text, reason, logprobs[k][:end] if logprobs else None))
        return rows


def _warpers(cfg: SamplingSpec) -> list[LogitsProcessor]:
    if cfg.greedy:
        return []
    warpers: list[LogitsProcessor] = []
    if cfg.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(cfg.temperature))
    if cfg.top_k > 0:
        warpers.append(TopKLogitsWarper(cfg.top_k))
    if cfg.top_p < 1.0:
        warpers.append(TopPLogitsWarper(cfg.top_p))
    return warpers


class _LogprobRecorder(LogitsProcessor):
    """Keeps the last step's log-softmax of the final scores; when the next step shows which
    token was sampled (``input_ids[:, -1]``), keeps that token's log-prob. One step of
    ``(batch, vocab)`` in memory, not the whole sequence."""

    def __init__(self):
        self.previous: torch.Tensor | None = None
        self.taken: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.previous is not None:
            self.taken.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
        self.previous = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, last_tokens: torch.Tensor) -> torch.Tensor:
        """``(batch, new_tokens)`` log-probs, given the final generated column."""
        self.taken.append(self.previous.gather(1, last_tokens[:, None]).squeeze(1))
        return torch.stack(self.taken, dim=1).cpu()


def _completion_end(toks: list[int], stop_ids: set[int], stop: list[str], tokenizer):
    """Length of the real completion (through its stop token) and why it ended."""
    end = next((t + 1 for t, tok in enumerate(toks) if tok in stop_ids), None)
    head = toks[:end] if end else toks
    if stop and any(s in tokenizer.decode(head, skip_special_tokens=True) for s in stop):
        for t in range(1, len(head) + 1):  # the shortest prefix whose text holds a stop string
            if any(s in tokenizer.decode(head[:t], skip_special_tokens=True) for s in stop):
                return t, "stop"
    return (end, "stop") if end else (len(toks), "length")


def _cut_at_stop(text: str, stop: list[str]) -> str:
    cuts = [text.find(s) for s in stop if s in text]
    return text[: min(cuts)] if cuts else text


def _eos_ids(model, tokenizer) -> set[int]:
    """The tokenizer's EOS and any further EOS ids in the model's generation config (chat models
    often end turns with a token other than the tokenizer's EOS)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    extra = getattr(model.generation_config, "eos_token_id", None)
    ids.update([extra] if isinstance(extra, int) else extra or [])
    return ids


@contextmanager
def _blank_generation_config(model):

    target = model.get_base_model() if isinstance(model, PeftModel) else model
    saved = target.generation_config
    target.generation_config = GenerationConfig()
    try:
        yield
    finally:
        target.generation_config = saved


@contextmanager
def _eval(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextmanager
def _fork_rng(seed: int | None, device: torch.device):
    """Seed sampling without touching the caller's global RNG state."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        if seed is not None:
            torch.manual_seed(seed)
        yield
