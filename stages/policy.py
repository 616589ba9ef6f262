"""Start, train and finish a policy stage on a TRL trainer: the steps SFT, DPO, SimPO/ORPO and
GRPO/RLOO share, written once.

A policy stage reads top to bottom::

    model, tokenizer, adapter, saved = start_policy(cfg, ctx, "dpo")   # parent checked, loaded
    trainer = make_trl_trainer(...)                                    # the stage's own part
    built = PolicyTrainer(trainer, tokenizer, PolicyPair.of(trainer.model), adapter.type, ...)
    return finish(cfg, ctx, built, train(cfg, ctx, built))

:func:`train` adds the health checks and trains (resuming an interrupted attempt); :func:`finish`
runs the held-out evaluation against the reference, measures forgetting against the starting
policy and saves the policy. A new policy stage on
a TRL trainer needs its config, its build step and a registry line, nothing more.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

from pydantic import Field
from transformers import TrainerCallback

from alignkit import models  # through the module: tests swap its functions
from alignkit.adapters import INITIAL_ADAPTER_DIR, keep_initial_adapter
from alignkit.config import (
    AdapterSpec,
    DataSpec,
    EvaluatedTrainerOptions,
    ForgettingSpec,
    HeldoutSpec,
    StageBase,
)
from alignkit.errors import UserError
from alignkit.handoff import REFERENCE_ADAPTER, AdapterView, PolicyPair
from alignkit.pipeline import StageContext, StageResult
from alignkit.stages.common import (
    forgetting_evaluation,
    health_callback,
    health_monitor,
    heldout_evaluation,
)
from alignkit.training import (
    early_stopping_record,
    evaluate_after_training,
    save_trained,
    snapshot_adapter,
    train_and_evaluate,
    weights_sharded,
)


class PreferenceStageConfig(StageBase, EvaluatedTrainerOptions):
    """The fields every stage that trains a policy on preference pairs shares (DPO, SimPO, ORPO,
    a new kind such as KTO), early stopping included: a kind adds its own and may redefine
    ``beta``'s default."""

    is_policy: ClassVar[bool] = True
    default_parent: ClassVar[bool] = True

    data: DataSpec
    """Preference pairs (any format the preference loader detects)."""
    adapter: AdapterSpec | None = None
    """Adapter for a stage without a parent (a parent's adapter is continued)."""
    beta: float = Field(0.1, gt=0)
    """The loss's scale: in DPO (and KTO) the strength of the pull towards the reference
    (higher: smaller drift); SimPO and ORPO document and default their own."""
    max_length: int = 1024
    """Prompt + completion tokens; longer pairs are truncated."""
    heldout: HeldoutSpec = HeldoutSpec()
    """Sample the trained policy and its reference on held-out prompts (gold reward, KL). A
    reference-free method (SimPO, ORPO) trains against no reference: the policy it started
    from is the yardstick."""
    forgetting: ForgettingSpec = ForgettingSpec()
    """Measure forgetting: general-text NLL before and after the stage."""


class PolicyTrainer(NamedTuple):
    """What a policy stage's build step returns for :func:`train` and :func:`finish` (a tuple
    that starts ``trainer, tokenizer``, so a test can unpack and wrap the build step).

    The stage's config must have ``data``, ``heldout`` (:class:`~alignkit.config.HeldoutSpec`)
    and ``forgetting`` (:class:`~alignkit.config.ForgettingSpec`), and ``health``
    (:class:`~alignkit.health.HealthSpec`) when ``health_logs`` is set."""

    trainer: Any
    """A TRL trainer built with :func:`alignkit.training.make_trl_trainer`."""
    tokenizer: Any
    """Saved with the policy (its chat template travels with it)."""
    pair: PolicyPair
    """The policy and the reference as the trainer holds them (see :meth:`PolicyPair.of`)."""
    adapter_type: str
    """Recorded in stage.json; decides ``adapter/`` or ``model/`` (full fine-tuning)."""
    counts: dict[str, float]
    """Data sizes recorded as metrics (``train_rows``/``eval_rows``, or ``train_prompts``)."""
    evaluate: bool = False
    """The trainer has an eval set: evaluated before training (``before_*``) and after."""
    health_logs: dict[str, str] | None = None
    """TRL log keys -> health values (``common.DPO_LOGS``); ``None``: no health checks."""
    heldout_reward: Callable[..., list[float]] | None = None
    """The reward the stage trained on: the held-out evaluation's, unless ``heldout.rewards``
    names others."""
    reference_is_base: bool = False
    """The held-out reference is the base model even after a parent stage (SFT: the base is
    what supervised training is judged against); otherwise it is the policy the stage started
    from, when the trainer holds no reference."""
    data: tuple[dict, ...] = ()
    """What the stage read (:func:`alignkit.data.fingerprint.data_record`), for stage.json and
    the model card."""


def start_policy(cfg, ctx: StageContext, kind: str):
    """The policy a stage trains, before its trainer is built: the parent's adapter (or full
    model) loaded trainable, or a new adapter from ``cfg.adapter`` (else the pipeline's) without
    a parent. Returns (model, tokenizer, adapter spec, the adapter snapshot for
    :func:`~alignkit.training.make_trl_trainer`). A parent that is no policy is refused."""
    parent = ctx.require_policy_parent(kind)
    adapter = cfg.adapter or ctx.adapter
    if (
        parent is None
        and kind != "sft"
        and (adapter.type == "adalora" or adapter.changes_base_weights)
    ):
        method = "AdaLoRA" if adapter.type == "adalora" else adapter.init_lora_weights
        raise UserError(
            f"{ctx.where}: a new {method} adapter is created by an SFT stage; start this {kind} "
            "stage from one (`from: sft`): it continues the saved adapter as plain LoRA"
        )
    if parent is not None:  # the parent's adapter is continued, whatever this stage's says
        adapter = continued_adapter(parent.record.get("adapter_type", adapter.type), adapter, ctx)
    model, tokenizer = models.load_policy(ctx.model, adapter, parent.dir if parent else None)
    quantized = ctx.model.quantization != "none"
    if parent is None:
        keep_initial_adapter(
            model, adapter, ctx.out_dir,
            quantized=quantized, sharded=weights_sharded(), is_main=ctx.is_main,
        )  # fmt: skip
    saved = snapshot_adapter(model, quantized, models.torch_dtype(ctx.model))
    trainable, total = models.count_parameters(model)
    ctx.console.print(f"trainable parameters: {trainable:,} of {total:,} ({adapter.type})")
    return model, tokenizer, adapter, saved


def continued_adapter(parent_type: str, configured: AdapterSpec, ctx: StageContext) -> AdapterSpec:
    """The spec of a parent's adapter this stage continues: its type, with the configured
    LoRA+ ratio (an optimizer setting, not part of the saved adapter)."""
    ratio = configured.loraplus_ratio
    if ratio is not None and parent_type != "lora":
        raise UserError(
            f"{ctx.where}: adapter.loraplus_ratio is for LoRA; the parent's adapter is "
            f"{parent_type}. Remove loraplus_ratio for this stage"
        )
    return AdapterSpec(type=parent_type, loraplus_ratio=ratio)


def train(cfg, ctx: StageContext, built: PolicyTrainer) -> dict[str, float]:
    """Train with the stage's health checks, evaluating before and after when there is an eval
    set; returns the trainer's metrics (its own names)."""
    if built.health_logs is not None:
        pair = built.pair
        check = health_monitor(cfg, ctx, pair.policy, pair.reference, built.tokenizer)
        for callback in health_callback(check, cfg.health.every, built.health_logs):
            built.trainer.add_callback(callback)
    if ctx.trial is not None:  # a sweep's trial: intermediate values for Optuna's pruner
        built.trainer.add_callback(_TrialCallback(cfg, ctx, built))
    return train_and_evaluate(built.trainer, ctx, evaluate=built.evaluate)


class _TrialCallback(TrainerCallback):
    """Every ``ctx.trial.every`` steps: the sweep's objective, from the trainer's latest logs if
    it is a training metric, from ``trainer.evaluate()`` if it is an ``eval_*`` metric, else from
    the held-out evaluation (the one :func:`finish` records), handed to the trial, which raises
    ``optuna.TrialPruned`` out of ``train()`` when the pruner stops it. Added after the finite
    guard (a NaN step is never reported) and runs before that step's checkpoint is saved."""

    def __init__(self, cfg, ctx: StageContext, built: PolicyTrainer):
        self.cfg, self.ctx, self.built = cfg, ctx, built

    def on_step_end(self, args, state, control, **kwargs):
        report = self.ctx.trial
        if not report.due(state.global_step):
            return
        metrics: dict[str, float] = {}
        for entry in state.log_history:
            metrics.update(entry)
        if report.objective not in metrics:
            if report.objective.startswith("eval_") and self.built.evaluate:
                metrics = evaluate_after_training(self.built.trainer)
            else:
                metrics = _heldout(self.cfg, self.ctx, self.built)
        report.report(state.global_step, metrics)


def finish(cfg, ctx: StageContext, built: PolicyTrainer, metrics: dict[str, float]) -> StageResult:
    """Record the data sizes, evaluate the policy against its reference on held-out prompts,
    measure forgetting (general-text NLL of the starting and the trained policy), save the policy
    (gathered from every rank when sharded, written by the main process) and return the stage's
    result. A training metric the held-out evaluation also reports (GRPO's ``reward``, the last
    batch's) is kept as ``train_<name>``."""
    metrics.update(built.counts)
    data = list(built.data)
    if ctx.is_main or weights_sharded():  # sharded: every forward is a collective, all join
        starts: dict[str | None, AdapterView] = {}
        heldout = _heldout(cfg, ctx, built, starts)
        for key in heldout.keys() & metrics.keys():
            metrics[f"train_{key}"] = metrics.pop(key)
        metrics.update(heldout)
        forgetting, used = forgetting_evaluation(
            cfg, ctx, built.pair.policy, _start(ctx, built, starts), built.tokenizer
        )
        metrics.update(forgetting)
        data += used
    sub = save_trained(built.trainer, built.tokenizer, ctx, built.adapter_type)
    return StageResult(
        metrics=metrics,
        adapter_type=built.adapter_type,
        outputs={"weights": sub},
        early_stopping=early_stopping_record(built.trainer),
        data=data,
    )


def _heldout(
    cfg, ctx: StageContext, built: PolicyTrainer, starts: dict | None = None
) -> dict[str, float]:
    """Held-out metrics against the reference (or, without one, the starting policy, loaded
    once into ``starts``). Every rank joins when the weights are sharded."""
    if not cfg.heldout.enabled or not (ctx.is_main or weights_sharded()):  # sharded: all join
        return {}
    starts = {} if starts is None else starts
    reference = built.pair.reference
    if reference is None:  # the trainer holds none: the policy the stage was measured from
        start = None if built.reference_is_base else ctx.parent
        reference = _loaded_start(ctx, built, start, starts)
    reward = None if cfg.heldout.rewards else built.heldout_reward
    return heldout_evaluation(cfg, ctx, built.pair.policy, reference, built.tokenizer, reward)


def _start(ctx: StageContext, built: PolicyTrainer, starts: dict) -> AdapterView:
    """The policy the stage started from: the trainer's reference when that is it (DPO, GRPO,
    SFT without a parent), else loaded (SimPO, ORPO, GRPO at ``beta: 0``, SFT after SFT)."""
    reference = built.pair.reference
    if reference is not None and (ctx.parent is None or not built.reference_is_base):
        return reference
    return _loaded_start(ctx, built, ctx.parent, starts)


def _loaded_start(ctx: StageContext, built: PolicyTrainer, start, starts: dict) -> AdapterView:
    """:func:`_starting_policy` for ``start`` (a parent stage, or ``None``: the base), loaded
    once per stage however many measurements use it."""
    key = start.name if start is not None else None
    if key not in starts:
        starts[key] = _starting_policy(ctx, built, start)
    return starts[key]


def _starting_policy(ctx: StageContext, built: PolicyTrainer, start) -> AdapterView:
    """A policy the trainer does not hold: ``start`` (a finished stage; ``None``: the base), on
    the same base when it is an adapter."""
    model = built.trainer.model
    initial = ctx.out_dir / INITIAL_ADAPTER_DIR
    if hasattr(model, "peft_config"):
        if start is None and initial.is_dir():  # PiSSA/OLoRA: the base alone is no longer it
            model.load_adapter(str(initial), adapter_name=REFERENCE_ADAPTER)
            return AdapterView(model, REFERENCE_ADAPTER)
        if start is None or start.adapter_dir is None:
            return AdapterView.base_of(model)
        model.load_adapter(str(start.adapter_dir), adapter_name=REFERENCE_ADAPTER)
        return AdapterView(model, REFERENCE_ADAPTER)
    if start is not None:
        frozen = models.load_stage_model(start.dir, ctx.model)[0]
    else:
        frozen = models.load_base(ctx.model, built.tokenizer)
    return AdapterView(frozen.to(model.device))
