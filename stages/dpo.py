"""Direct preference optimization on TRL's DPOTrainer.

Handoff: with a parent SFT stage, the policy is the SFT adapter loaded trainable, and TRL adds a
frozen copy of it as the "ref" adapter on the same base weights (no second model; works on a
4-bit base). Without a parent the policy is a new adapter and the reference is the base itself
(a zero-initialised adapter copy computes exactly the base). Only the trained adapter is saved.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from datasets import Dataset
from pydantic import Field, field_validator
from trl import DPOConfig, DPOTrainer

from alignkit.config import ReplaySpec
from alignkit.data.preference import load_preference
from alignkit.data.split import data_records, train_eval_rows
from alignkit.handoff import PolicyPair
from alignkit.health import HealthSpec
from alignkit.models import load_base, load_stage_model
from alignkit.pipeline import StageContext, StageResult
from alignkit.stages import common, policy
from alignkit.stages.common import DPO_LOGS, data_context, replay_stages
from alignkit.training import make_trl_trainer, stage_trl_args

#: TRL 1.16 DPOTrainer loss types. TRL exposes no list to import (only the help text of
#: ``DPOConfig.loss_type`` and the trainer's if-chain), so this copy is checked against that help
#: text by tests/stages/test_stage_configs.py: a TRL upgrade that adds or drops one fails there.
LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)


REPLAY_HINT = (
    "DPO replays preference pairs (prompt, chosen, rejected). Replay general text in the SFT "
    "stage before DPO, or add `sft` to loss_type for an NLL term on the chosen answers."
)


class DPOStageConfig(policy.PreferenceStageConfig):
    kind: Literal["dpo"] = "dpo"
    trainer_config: ClassVar[str] = "trl.DPOConfig"

    loss_type: list[str] = ["sigmoid"]
    """One or more TRL loss types (sigmoid, ipo, hinge, robust, ...); several are summed with
    ``train.loss_weights``."""
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    """Probability that a label is flipped (robust DPO); 0 for plain DPO."""
    precompute_ref_log_probs: bool = False
    """Compute the reference's log-probs once before training instead of at every step."""
    health: HealthSpec = HealthSpec()
    """Training health checks (DPO collapse, KL, length, repetition, reward vs gold)."""
    replay: ReplaySpec | None = None
    """Mix earlier preference pairs into the training pairs (``fraction`` of them): a previous
    round's data, or ``stage:NAME`` for what an earlier DPO/SimPO/ORPO/reward-model stage
    trained on. Pairs, not text: a DPO loss needs a chosen and a rejected answer (replay
    general text in the SFT stage, or add ``sft`` to ``loss_type`` for an NLL term)."""

    def uses_stages(self) -> list[str]:
        return replay_stages(self.replay)

    @field_validator("loss_type", mode="before")
    @classmethod
    def _one_or_more(cls, v):
        v = [v] if isinstance(v, str) else v
        for item in v:
            if item not in LOSS_TYPES:
                raise ValueError(
                    f"unknown loss_type {item!r}; TRL's DPO offers: {', '.join(LOSS_TYPES)}"
                )
        return v


def run(cfg: DPOStageConfig, ctx: StageContext) -> StageResult:
    built = build_trainer(cfg, ctx)
    return policy.finish(cfg, ctx, built, policy.train(cfg, ctx, built))


def build_trainer(cfg: DPOStageConfig, ctx: StageContext) -> policy.PolicyTrainer:
    """Data, policy (+ reference) and the DPOTrainer. Separate from :func:`run` so tests can
    inspect the handoff."""
    torch.manual_seed(ctx.seed)
    train_rows, eval_rows = train_eval_rows(
        cfg.data, load_preference, ctx.seed, data_context(ctx, cfg.data, cfg.heldout)
    )
    counts = {"train_rows": float(len(train_rows)), "eval_rows": float(len(eval_rows))}
    data = data_records(cfg.data, train_rows, eval_rows)
    if cfg.replay is not None:
        kinds = ("dpo", "simpo", "orpo", "reward_model")
        replayed, record = common.replay(
            cfg.replay, ctx, load_preference, len(train_rows), kinds, REPLAY_HINT
        )
        train_rows = train_rows + replayed  # the trainer shuffles
        counts["replay_rows"] = float(len(replayed))
        data.append(record)

    model, tokenizer, adapter, saved = policy.start_policy(cfg, ctx, "dpo")
    ref_model = None
    if adapter.type == "full":  # no adapters to switch: the reference is a second frozen copy
        if ctx.parent is not None:
            ref_model, _ = load_stage_model(ctx.parent.dir, ctx.model)
        else:
            ref_model = load_base(ctx.model, tokenizer)

    args = stage_trl_args(
        DPOConfig,
        cfg,
        ctx,
        beta=cfg.beta,
        loss_type=cfg.loss_type,
        label_smoothing=cfg.label_smoothing,
        precompute_ref_log_probs=cfg.precompute_ref_log_probs,
        max_length=cfg.max_length,
        per_device_eval_batch_size=32,
    )
    trainer = make_trl_trainer(
        DPOTrainer,
        ctx,
        saved,
        options=cfg,
        adapter=adapter,
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=_dataset(train_rows),
        eval_dataset=_dataset(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
    )
    # without a "ref" adapter or a reference model, TRL scores the reference with the adapters
    # disabled: the base is the reference then
    pair = PolicyPair.of(trainer.model, trainer.ref_model, base_is_reference=True)
    return policy.PolicyTrainer(
        trainer,
        tokenizer,
        pair,
        adapter.type,
        counts,
        bool(eval_rows),
        health_logs=DPO_LOGS,
        data=tuple(data),
    )


def _dataset(rows: list[dict]):
    return Dataset.from_list(
        [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]
    )
