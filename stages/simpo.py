"""Reference-free preference optimisation: SimPO and ORPO, on TRL's experimental trainers.

TRL 1.16 keeps these under ``trl.experimental`` (``CPOTrainer`` with ``loss_type="simpo"``, and
``ORPOTrainer``); the API may change between TRL releases. No reference model is held: SimPO
compares length-normalised log-probs against a margin, ORPO adds an odds-ratio term to the SFT
loss. The policy continues the parent SFT adapter (or a new adapter without a parent).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from alignkit.config import AdapterSpec, DataSpec, HeldoutSpec, StageBase
from alignkit.handoff import (
    ADAPTER_DIR,
    POLICY_ADAPTER,
    REFERENCE_ADAPTER,
    AdapterView,
    weights_subdir,
)
from alignkit.pipeline import StageContext, StageResult
from alignkit.training import (
    make_trl_trainer,
    snapshot_adapter,
    train_and_evaluate,
    trl_args,
)


class _ReferenceFree(StageBase):
    is_policy: ClassVar[bool] = True
    default_parent: ClassVar[bool] = True

    data: DataSpec
    """Preference pairs (any format the preference loader detects)."""
    adapter: AdapterSpec | None = None
    beta: float = Field(0.1, gt=0)
    max_length: int = 1024
    heldout: HeldoutSpec = HeldoutSpec()


class SimPOStageConfig(_ReferenceFree):
    kind: Literal["simpo"] = "simpo"
    trainer_config: ClassVar[str] = "trl.experimental.cpo.CPOConfig"
    beta: float = Field(2.0, gt=0)
    """SimPO's reward scale (the paper uses 2.0-2.5)."""
    gamma: float = Field(0.5, ge=0)
    """Target reward margin (SimPO's γ, as a fraction of β in TRL's ``simpo_gamma``)."""


class ORPOStageConfig(_ReferenceFree):
    kind: Literal["orpo"] = "orpo"
    trainer_config: ClassVar[str] = "trl.experimental.orpo.ORPOConfig"
    beta: float = Field(0.1, gt=0)
    """Weight of the odds-ratio term (ORPO's λ)."""


def run(cfg: _ReferenceFree, ctx: StageContext) -> StageResult:
    import torch
    from datasets import Dataset

    from alignkit.data.preference import load_preference
    from alignkit.data.split import train_eval_rows
    from alignkit.models import load_policy, save_stage_model, torch_dtype
    from alignkit.stages.common import heldout_evaluation

    torch.manual_seed(ctx.seed)
    train_rows, eval_rows = train_eval_rows(cfg.data, load_preference, ctx.seed)
    parent = ctx.require_policy_parent(cfg.kind)
    parent_dir = parent.dir if parent else None
    adapter = cfg.adapter or ctx.adapter
    model, tokenizer = load_policy(ctx.model, adapter, parent_dir)
    saved = snapshot_adapter(model, ctx.model.quantization != "none", torch_dtype(ctx.model))

    def dataset(rows):
        keep = ("prompt", "chosen", "rejected")
        return Dataset.from_list([{k: r[k] for k in keep} for r in rows]) if rows else None

    if isinstance(cfg, SimPOStageConfig):
        from trl.experimental.cpo import CPOConfig as config_cls
        from trl.experimental.cpo import CPOTrainer as trainer_cls

        ours = {"loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": cfg.gamma}
    else:
        from trl.experimental.orpo import ORPOConfig as config_cls
        from trl.experimental.orpo import ORPOTrainer as trainer_cls

        ours = {}
    args = trl_args(
        config_cls, cfg.train, output_dir=ctx.checkpoint_dir, seed=ctx.seed, where=ctx.where,
        beta=cfg.beta, max_length=cfg.max_length, per_device_eval_batch_size=32, **ours,
    )  # fmt: skip
    trainer = make_trl_trainer(
        trainer_cls,
        ctx,
        saved,
        model=model,
        args=args,
        train_dataset=dataset(train_rows),
        eval_dataset=dataset(eval_rows),
        processing_class=tokenizer,
    )
    metrics = train_and_evaluate(trainer, ctx, evaluate=bool(eval_rows))
    metrics["train_rows"], metrics["eval_rows"] = float(len(train_rows)), float(len(eval_rows))

    from peft import PeftModel

    # no reference is trained against; the held-out KL is measured to the starting policy
    model = trainer.model
    if isinstance(model, PeftModel):
        if parent_dir is not None and (parent_dir / ADAPTER_DIR).is_dir():
            model.load_adapter(
                str(parent_dir / ADAPTER_DIR), adapter_name=REFERENCE_ADAPTER, is_trainable=False
            )
            reference = AdapterView(model, REFERENCE_ADAPTER)
        else:
            reference = AdapterView.base_of(model)
        policy = AdapterView(model, POLICY_ADAPTER)
        metrics.update(heldout_evaluation(cfg, ctx, policy, reference, tokenizer))
    sub = weights_subdir(adapter.type)
    if ctx.is_main:
        sub = save_stage_model(trainer.model, tokenizer, ctx.out_dir)
    return StageResult(metrics=metrics, adapter_type=adapter.type, outputs={"weights": sub})
