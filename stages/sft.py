"""Supervised fine-tuning on TRL's SFTTrainer: LoRA, QLoRA or full fine-tuning.

Loss is on assistant turns only by default. With a chat template that marks assistant turns
(``{% generation %}``, or one TRL knows how to patch) every assistant turn is trained; otherwise
each conversation is split into prompt (all turns before the last assistant turn) and completion
(that turn), and only the completion is trained. Plain-text rows train on every token.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from datasets import Dataset, concatenate_datasets
from pydantic import model_validator
from trl import SFTConfig, SFTTrainer
from trl.chat_template_utils import get_training_chat_template

from alignkit.config import (
    AdapterSpec,
    DataSpec,
    EvaluatedTrainerOptions,
    ForgettingSpec,
    HeldoutSpec,
    ReplaySpec,
    StageBase,
)
from alignkit.data.sft import load_sft
from alignkit.data.split import data_records, train_eval_rows
from alignkit.errors import UserError
from alignkit.handoff import PolicyPair
from alignkit.pipeline import StageContext, StageResult
from alignkit.stages import common, policy
from alignkit.stages.common import data_context, replay_stages
from alignkit.training import make_trl_trainer, stage_trl_args


class SFTStageConfig(StageBase, EvaluatedTrainerOptions):
    kind: Literal["sft"] = "sft"
    trainer_config: ClassVar[str] = "trl.SFTConfig"
    is_policy: ClassVar[bool] = True

    data: DataSpec
    """Demonstrations: messages, ShareGPT, Alpaca, prompt/completion or plain text rows."""
    adapter: AdapterSpec | None = None
    """Overrides the pipeline's ``adapter`` block for this stage."""
    loss_on: Literal["assistant", "all"] = "assistant"
    """``assistant``: train on assistant turns only; ``all``: every token of the conversation."""
    packing: bool = False
    """Pack several short examples into each sequence of ``max_length`` tokens (fewer pad tokens)."""
    max_length: int = 1024
    """Longer examples are truncated (their tail is dropped)."""
    heldout: HeldoutSpec = HeldoutSpec()
    """Sample the trained policy and the base on held-out prompts (gold reward, KL)."""
    forgetting: ForgettingSpec = ForgettingSpec()
    """Measure forgetting: general-text NLL before and after the stage."""
    replay: ReplaySpec | None = None
    """Mix general text or earlier demonstrations into the training rows (``fraction`` of
    them), trained with the same loss as the stage's own rows; e.g.
    ``{source: builtin:pretraining, fraction: 0.2}``."""

    def uses_stages(self) -> list[str]:
        return replay_stages(self.replay)

    @model_validator(mode="after")
    def _replay_unpacked(self) -> SFTStageConfig:
        if self.replay is not None and self.packing:
            raise ValueError("replay: does not work with packing: true yet; set packing: false")
        return self


def run(cfg: SFTStageConfig, ctx: StageContext) -> StageResult:
    torch.manual_seed(ctx.seed)
    # 1. data first: a bad row stops the stage before any model is loaded
    train_rows, eval_rows = train_eval_rows(
        cfg.data, load_sft, ctx.seed, data_context(ctx, cfg.data, cfg.heldout)
    )
    if not train_rows:
        raise UserError(f"{ctx.where}.data: no training rows left")

    # 2. model: base (+ the parent's adapter, trainable, or a new adapter)
    model, tokenizer, adapter, saved = policy.start_policy(cfg, ctx, "sft")

    # 3. data in the form TRL trains on, with the loss mask we want
    fmt = _trl_format(train_rows, tokenizer, cfg.loss_on)
    train_ds, eval_ds = (
        _to_dataset(train_rows, fmt),
        _to_dataset(eval_rows, fmt) if eval_rows else None,
    )

    # 4. trainer
    args = stage_trl_args(
        SFTConfig,
        cfg,
        ctx,
        max_length=cfg.max_length,
        packing=cfg.packing,
        eval_packing=False,
        assistant_only_loss=fmt == "messages_assistant",
        completion_only_loss=fmt == "prompt_completion",
        per_device_eval_batch_size=32,
    )
    trainer = make_trl_trainer(
        SFTTrainer,
        ctx,
        saved,
        options=cfg,
        adapter=adapter,
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
    )
    counts = {"train_rows": float(len(train_rows)), "eval_rows": float(len(eval_rows))}
    data = data_records(cfg.data, train_rows, eval_rows)
    if cfg.replay is not None:
        counts["replay_rows"], record = _mix_replay(cfg, ctx, trainer, tokenizer)
        data.append(record)
    # the reference is the base (adapters disabled), or a fresh base for full fine-tuning; after
    # PiSSA/OLoRA moved part of the base into the adapter, the adapter as initialised on it
    base = not adapter.changes_base_weights
    built = policy.PolicyTrainer(
        trainer,
        tokenizer,
        PolicyPair.of(trainer.model, base_is_reference=base),
        adapter.saved_type,
        counts,
        evaluate=eval_ds is not None,
        reference_is_base=True,
        data=tuple(data),
    )

    # 5. held-out NLL of the untrained model, then train (resuming an interrupted attempt)
    metrics = policy.train(cfg, ctx, built)
    if eval_ds is not None:
        metrics["heldout_nll_base"] = metrics["before_eval_loss"]
        metrics["heldout_nll"] = metrics["eval_loss"]
        metrics["heldout_ppl"] = math.exp(min(metrics["eval_loss"], 50.0))

    # 6. held-out samples against the base; save the adapter (or full model) and the tokenizer
    return policy.finish(cfg, ctx, built, metrics)


def _mix_replay(cfg: SFTStageConfig, ctx: StageContext, trainer, tokenizer) -> tuple[float, dict]:
    """Add the replay rows to the trainer's (tokenized) training set; returns their count and
    data record. They are tokenized by TRL in their own format (text rows: every token trained;
    conversations: as ``loss_on`` says), then the two sets are joined: the trainer samples
    batches from the union, so ``replay.fraction`` of every batch is replay, on average."""
    task = trainer.train_dataset
    rows, record = common.replay(cfg.replay, ctx, load_sft, len(task), ("sft",))
    # TRL has no public way to tokenize a second set as it did the first; its own step keeps
    # the loss masks and EOS handling identical (tested: tests/stages/test_replay.py)
    replayed = trainer._prepare_dataset(
        _to_dataset(rows, _trl_format(rows, tokenizer, cfg.loss_on)),
        tokenizer,
        trainer.args,
        False,
        None,
        "replay",
    )
    columns = ["input_ids", "labels"]
    mixed = [task.select_columns(columns), replayed.select_columns(columns)]
    trainer.train_dataset = concatenate_datasets(mixed).shuffle(seed=ctx.seed)
    return float(len(replayed)), record


def _trl_format(rows: list[dict], tokenizer, loss_on: str) -> str:
    """Which dataset layout to hand TRL: text, messages (+assistant mask) or prompt/completion."""
    if "text" in rows[0]:
        return "text"
    if loss_on == "all":
        return "messages_all"
    if tokenizer.chat_template is None:
        raise UserError(
            "the tokenizer has no chat template, so conversations cannot be rendered; "
            "use a chat/instruct model or plain-text rows"
        )

    try:
        get_training_chat_template(tokenizer)  # None (already marked) or a patched template
        return "messages_assistant"
    except (ValueError, NotImplementedError):
        return "prompt_completion"  # template TRL cannot mark: train on the last assistant turn


def _to_dataset(rows: list[dict], fmt: str):
    if fmt == "text":
        return Dataset.from_list([{"text": r["text"]} for r in rows])
    if fmt == "prompt_completion":
        return Dataset.from_list(
            [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows]
        )
    return Dataset.from_list([{"messages": r["messages"]} for r in rows])
