"""Score (prompt, completion) pairs with a trained reward model.

Loads a finished ``reward_model`` stage (base + LoRA with its score head, or a full model), or
any transformers sequence-classification checkpoint (a PEFT adapter dir with ``SEQ_CLS`` task
works too), and scores with the same rendering as training: the chat template applied to the
prompt messages plus the completion as an assistant turn, tokenized once. Sequences longer than
the stage's ``max_length`` keep their last tokens (the score is read at the last token).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from alignkit.config import ModelSpec
from alignkit.errors import UserError
from alignkit.handoff import StageOutput
from alignkit.models import load_base, load_stage_model, load_tokenizer

Messages = list[dict]


class RewardModelScorer:
    """A reward function: ``scorer(prompts, completions, **meta) -> list[float]``."""

    def __init__(self, model, tokenizer, max_length: int | None = 1024, batch_size: int = 32):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.__name__ = "reward_model"

    @classmethod
    def from_path(cls, path: str | Path, batch_size: int = 32) -> RewardModelScorer:

        path = Path(path)
        stage = StageOutput.read(path)
        if stage is not None:
            if stage.kind != "reward_model":
                raise UserError(f"{path} is a {stage.kind!r} stage, not a reward_model stage")
            model, tok = load_stage_model(
                path, stage.base, model_cls=AutoModelForSequenceClassification
            )
            max_length = stage.record.get("outputs", {}).get("max_length", 1024)
            return cls(model, tok, max_length=max_length, batch_size=batch_size)
        if (path / "adapter_config.json").exists():
            base = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
            spec = ModelSpec(name=base)
            tok = load_tokenizer(path if (path / "tokenizer_config.json").exists() else base, spec)
            model = load_base(spec, tok, model_cls=AutoModelForSequenceClassification, num_labels=1)

            return cls(PeftModel.from_pretrained(model, str(path)), tok, batch_size=batch_size)
        if (path / "config.json").exists() or not path.exists():
            spec = ModelSpec(name=str(path))
            tok = load_tokenizer(str(path), spec)
            model = load_base(spec, tok, model_cls=AutoModelForSequenceClassification)
            if model.config.num_labels != 1:
                raise UserError(
                    f"{path}: a reward model needs one output; it has {model.config.num_labels}"
                )
            return cls(model, tok, batch_size=batch_size)
        raise UserError(
            f"{path}: not a reward_model stage, PEFT adapter or transformers checkpoint"
        )

    def encode(
        self, prompt: str | Messages, completion: str | Messages, truncated: bool = False
    ) -> list[int]:
        """Token ids as the RM was trained on them: the chat template over prompt + answer.
        ``truncated``: the answer was cut off (no EOS): the template's generation prompt plus
        the answer's tokens, with no end-of-turn, so the RM sees an unfinished answer."""
        prompt_msgs = (
            [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        )
        if isinstance(completion, str):
            completion_msgs = [{"role": "assistant", "content": completion}]
        else:
            completion_msgs = list(completion)
        if truncated:
            ids = self.tokenizer.apply_chat_template(
                prompt_msgs, tokenize=True, return_dict=True, add_generation_prompt=True
            )["input_ids"]
            text = "".join(str(m["content"]) for m in completion_msgs)
            ids = list(ids) + self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tokenizer.apply_chat_template(
                prompt_msgs + completion_msgs, tokenize=True, return_dict=True
            )["input_ids"]
        if self.max_length is not None and len(ids) > self.max_length:
            ids = ids[-self.max_length :]
        return ids

    @torch.no_grad()
    def score_ids(self, sequences: Sequence[list[int]]) -> list[float]:
        """Scores for already-tokenized sequences, batched, right-padded (the classifier reads
        the last non-pad token)."""
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id
        out: list[float] = []
        for i in range(0, len(sequences), self.batch_size):
            chunk = sequences[i : i + self.batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for j, s in enumerate(chunk):
                ids[j, : len(s)] = torch.tensor(s)
                mask[j, : len(s)] = 1
            logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            out.extend(logits[:, 0].float().cpu().tolist())
        return out

    def __call__(
        self, prompts: Sequence[str | Messages], completions: Sequence[str | Messages], **meta
    ) -> list[float]:
        """``finish_reason`` in meta (as rollouts pass it): a ``"length"`` answer is scored as
        the truncated text it is, not re-rendered with an end token it never produced."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        reasons = meta.get("finish_reason") or ["stop"] * len(completions)
        return self.score_ids(
            [
                self.encode(p, c, truncated=r == "length")
                for p, c, r in zip(prompts, completions, reasons, strict=True)
            ]
        )
