"""Reference-free preference optimisation: SimPO and ORPO, on TRL's experimental trainers.

TRL 1.16 keeps these under ``trl.experimental`` (``CPOTrainer`` with ``loss_type="simpo"``, and
``ORPOTrainer``); the API may change between TRL releases. No reference model is held: SimPO
compares length-normalised log-probs against a margin, ORPO adds an odds-ratio term to the SFT
loss. The policy continues the parent SFT adapter (or a new adapter without a parent).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from datasets import Dataset
from pydantic import Field

from alignkit.data.preference import load_preference
from alignkit.data.split import data_records, train_eval_rows
from alignkit.handoff import PolicyPair
from alignkit.pipeline import StageContext, StageResult
from alignkit.stages import policy
from alignkit.stages.common import data_context
from alignkit.training import make_trl_trainer, stage_trl_args


class SimPOStageConfig(policy.PreferenceStageConfig):
    kind: Literal["simpo"] = "simpo"
    trainer_config: ClassVar[str] = "trl.experimental.cpo.CPOConfig"
    beta: float = Field(2.0, gt=0)
    """SimPO's reward scale (the paper uses 2.0-2.5)."""
    gamma: float = Field(0.5, ge=0)
    """Target reward margin (SimPO's γ, as a fraction of β in TRL's ``simpo_gamma``)."""


class ORPOStageConfig(policy.PreferenceStageConfig):
    kind: Literal["orpo"] = "orpo"
    trainer_config: ClassVar[str] = "trl.experimental.orpo.ORPOConfig"
    beta: float = Field(0.1, gt=0)
    """Weight of the odds-ratio term (ORPO's λ)."""


def run(cfg: SimPOStageConfig | ORPOStageConfig, ctx: StageContext) -> StageResult:
    built = build_trainer(cfg, ctx)
    return policy.finish(cfg, ctx, built, policy.train(cfg, ctx, built))


def build_trainer(
    cfg: SimPOStageConfig | ORPOStageConfig, ctx: StageContext
) -> policy.PolicyTrainer:
    """Data, policy and TRL's CPOTrainer (SimPO) or ORPOTrainer. No reference is trained
    against: the held-out KL is measured to the policy the stage started from."""
    torch.manual_seed(ctx.seed)
    train_rows, eval_rows = train_eval_rows(
        cfg.data, load_preference, ctx.seed, data_context(ctx, cfg.data, cfg.heldout)
    )
    model, tokenizer, adapter, saved = policy.start_policy(cfg, ctx, cfg.kind)

    def dataset(rows):
        keep = ("prompt", "chosen", "rejected")
        return Dataset.from_list([{k: r[k] for k in keep} for r in rows]) if rows else None

    if isinstance(cfg, SimPOStageConfig):
        # trl.experimental warns on import that its API is unstable: only SimPO/ORPO import it
        from trl.experimental.cpo import CPOConfig as config_cls
        from trl.experimental.cpo import CPOTrainer as trainer_cls

        ours = {"loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": cfg.gamma}
    else:
        # trl.experimental warns on import that its API is unstable: only SimPO/ORPO import it
        from trl.experimental.orpo import ORPOConfig as config_cls
        from trl.experimental.orpo import ORPOTrainer as trainer_cls

        ours = {}
    args = stage_trl_args(
        config_cls, cfg, ctx, beta=cfg.beta, max_length=cfg.max_length,
        per_device_eval_batch_size=32, **ours,
    )  # fmt: skip
    trainer = make_trl_trainer(
        trainer_cls,
        ctx,
        saved,
        options=cfg,
        adapter=adapter,
        model=model,
        args=args,
        train_dataset=dataset(train_rows),
        eval_dataset=dataset(eval_rows),
        processing_class=tokenizer,
    )
    counts = {"train_rows": float(len(train_rows)), "eval_rows": float(len(eval_rows))}
    pair = PolicyPair.of(trainer.model)  # no reference: finish() loads the starting policy
    data = tuple(data_records(cfg.data, train_rows, eval_rows))
    return policy.PolicyTrainer(
        trainer, tokenizer, pair, adapter.type, counts, bool(eval_rows), data=data
    )
