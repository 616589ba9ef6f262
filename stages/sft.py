"""Supervised fine-tuning on TRL's SFTTrainer: LoRA, QLoRA or full fine-tuning.

Loss is on assistant turns only by default. With a chat template that marks assistant turns
(``{% generation %}``, or one TRL knows how to patch) every assistant turn is trained; otherwise
each conversation is split into prompt (all turns before the last assistant turn) and completion
(that turn), and only the completion is trained. Plain-text rows train on every token.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

from alignkit.config import AdapterSpec, DataSpec, HeldoutSpec, StageBase
from alignkit.errors import UserError
from alignkit.handoff import AdapterView, weights_subdir
from alignkit.pipeline import StageContext, StageResult
from alignkit.training import (
    make_trl_trainer,
    snapshot_adapter,
    train_and_evaluate,
    trl_args,
)


class SFTStageConfig(StageBase):
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


def run(cfg: SFTStageConfig, ctx: StageContext) -> StageResult:
    import torch
    from trl import SFTConfig, SFTTrainer

    from alignkit.data.sft import load_sft
    from alignkit.data.split import train_eval_rows
    from alignkit.models import count_parameters, load_policy, save_stage_model, torch_dtype

    torch.manual_seed(ctx.seed)
    # 1. data first: a bad row stops the stage before any model is loaded
    train_rows, eval_rows = train_eval_rows(cfg.data, load_sft, ctx.seed)
    if not train_rows:
        raise UserError(f"{ctx.where}.data: no training rows left")

    # 2. model: base (+ the parent's adapter, trainable, or a new adapter)
    adapter = cfg.adapter or ctx.adapter
    model, tokenizer = load_policy(ctx.model, adapter, ctx.parent.dir if ctx.parent else None)
    saved = snapshot_adapter(model, ctx.model.quantization != "none", torch_dtype(ctx.model))
    trainable, total = count_parameters(model)
    ctx.console.print(f"trainable parameters: {trainable:,} of {total:,} ({adapter.type})")

    # 3. data in the form TRL trains on, with the loss mask we want
    fmt = _trl_format(train_rows, tokenizer, cfg.loss_on)
    train_ds, eval_ds = (
        _to_dataset(train_rows, fmt),
        _to_dataset(eval_rows, fmt) if eval_rows else None,
    )

    # 4. trainer
    args = trl_args(
        SFTConfig,
        cfg.train,
        output_dir=ctx.checkpoint_dir,
        seed=ctx.seed,
        where=ctx.where,
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
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
    )

    # 5. held-out NLL of the untrained model, then train (resuming an interrupted attempt)
    metrics = train_and_evaluate(trainer, ctx, evaluate=eval_ds is not None)
    if eval_ds is not None:
        metrics["heldout_nll_base"] = metrics["before_eval_loss"]
        metrics["heldout_nll"] = metrics["eval_loss"]
        metrics["heldout_ppl"] = math.exp(min(metrics["eval_loss"], 50.0))
    metrics["train_rows"], metrics["eval_rows"] = float(len(train_rows)), float(len(eval_rows))
    metrics.update(_heldout(cfg, ctx, trainer.model, tokenizer))

    # 7. save the trained adapter (or full model) and the tokenizer with its chat template
    if ctx.is_main:
        sub = save_stage_model(trainer.model, tokenizer, ctx.out_dir)
    else:
        sub = weights_subdir(adapter.type)
    return StageResult(metrics=metrics, adapter_type=adapter.type, outputs={"weights": sub})


def _heldout(cfg, ctx, model, tokenizer) -> dict[str, float]:
    """Policy vs its reference: the base (adapters disabled), or a fresh base for full FT."""
    from peft import PeftModel

    from alignkit.models import load_base
    from alignkit.stages.common import heldout_evaluation

    if isinstance(model, PeftModel):
        reference = AdapterView.base_of(model)
    elif cfg.heldout.enabled:
        reference = AdapterView(load_base(ctx.model, tokenizer).to(model.device))
    else:
        return {}
    return heldout_evaluation(cfg, ctx, AdapterView(model), reference, tokenizer)


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
    from trl.chat_template_utils import get_training_chat_template

    try:
        get_training_chat_template(tokenizer)  # None (already marked) or a patched template
        return "messages_assistant"
    except (ValueError, NotImplementedError):
        return "prompt_completion"  # template TRL cannot mark: train on the last assistant turn


def _to_dataset(rows: list[dict], fmt: str):
    from datasets import Dataset

    if fmt == "text":
        return Dataset.from_list([{"text": r["text"]} for r in rows])
    if fmt == "prompt_completion":
        return Dataset.from_list(
            [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows]
        )
    return Dataset.from_list([{"messages": r["messages"]} for r in rows])
