"""Steps every TRL-backed stage shares: building the TRL config, logging metrics, resuming."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from transformers import EarlyStoppingCallback, TrainerCallback
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer_callback import ExportableState

from alignkit import models  # through the module: tests swap save_stage_model
from alignkit.adapters import AdaLoraBudget
from alignkit.config import AdapterSpec, TrainerOptions, did_you_mean
from alignkit.errors import UserError
from alignkit.finite import NonFiniteError, nonfinite_names, stop_message
from alignkit.handoff import weights_subdir
from alignkit.optim import grouped_optimizer
from alignkit.rundir import read_json_or_none, write_json_atomic


def stage_trl_args(cls: type, cfg, ctx, *, seed: int | None = None, **ours: Any):
    """:func:`trl_args` for a stage: its ``train:`` block, checkpoints in its partial dir, the
    run's seed (or ``seed``), errors named by the stage, and what its config asks of the trainer
    (early stopping)."""
    seed = ctx.seed if seed is None else seed
    return trl_args(
        cls, cfg.train, output_dir=ctx.checkpoint_dir, seed=seed, where=ctx.where, options=cfg,
        **ours,
    )  # fmt: skip


def trl_args(
    cls: type,
    user: dict[str, Any],
    *,
    output_dir: Path,
    seed: int,
    where: str,
    options: TrainerOptions | None = None,
    **ours: Any,
):
    """Build a TRL config: our defaults (``ours``), overridden by the user's ``train:`` block.

    Defaults that matter everywhere: no loggers of the trainer's own (``make_trl_trainer`` attaches
    the run's trackers), checkpoints in the stage's partial dir
    (so an interrupted stage resumes), and no bf16/gradient checkpointing on CPU (TRL turns both on
    by default; neither works there). ``options``: the stage's config, whose ``early_stopping``
    sets evaluation, checkpoints and best-model tracking (the config refuses those keys in
    ``train:`` then).
    """
    stopping = getattr(options, "early_stopping", None)
    if stopping is not None:
        ours = {**ours, **stopping.trainer_args()}
    cuda = torch.cuda.is_available()
    defaults: dict[str, Any] = {
        "output_dir": str(output_dir),
        "report_to": "none",
        "seed": seed,
        "data_seed": seed,
        "bf16": cuda and torch.cuda.is_bf16_supported(),
        "gradient_checkpointing": False,
        "save_strategy": "steps",
        "save_steps": 50,
        "save_total_limit": 2,
        "logging_steps": 10,
        "eval_strategy": "no",
        "use_cpu": not cuda,
    }
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in {**defaults, **ours}.items() if k in names}
    kwargs.update(user)
    kwargs["output_dir"] = str(output_dir)  # checkpoints must live where resume looks for them
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}.train: {cls.__name__} rejected the options: {e}") from None


def snapshot_adapter(model, quantized: bool, compute_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Trainable weights to restore after a TRL trainer is built (see :func:`restore_adapter`).

    On a quantized base TRL casts trainable adapter weights to bfloat16. With float32 compute
    (CPU) that rounding makes the policy differ from the stage it continues (and from TRL's own
    "ref" copy, taken before the cast), so DPO would not start at ln 2. Empty when not needed.
    """
    if not quantized or compute_dtype != torch.float32:
        return {}
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def restore_adapter(model, saved: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        if name in saved:
            p.data = saved[name]


class FiniteGuard(TrainerCallback):
    """Stops a TRL trainer at the first non-finite loss, grad norm or trainable tensor.

    It must run before any callback that uses the model (the health probe) and before the
    trainer's own save, both of which follow ``on_step_end``."""

    def __init__(self, where: str):
        self.where = where
        self.last_checkpoint: str | None = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        trainable = ((n, p) for n, p in model.named_parameters() if p.requires_grad)
        bad = nonfinite_names(trainable)
        if bad:
            what = f"non-finite weights ({', '.join(bad)})"
            raise NonFiniteError(
                stop_message(self.where, what, state.global_step, self.last_checkpoint)
            )

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if isinstance(value, int | float) and not math.isfinite(value):
                raise NonFiniteError(
                    stop_message(
                        self.where, f"{key} = {value}", state.global_step, self.last_checkpoint
                    )
                )

    def on_save(self, args, state, control, **kwargs):
        self.last_checkpoint = f"checkpoint-{state.global_step}"


class MetricsCallback(TrainerCallback):
    """Append every trainer log (loss, lr, eval metrics) to ``metrics.jsonl`` on the main process."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, **logs}
        if "train_loss" in logs:  # the trainer's own covers only the steps since a resume
            record["train_loss"] = whole_run_train_loss(state.log_history, logs["train_loss"])
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=float) + "\n")


class TokenCount(TrainerCallback, ExportableState):
    """Keeps TRL's running ``num_tokens`` across a resume: TRL counts tokens in the trainer
    (``_total_train_tokens``), which no checkpoint holds, so a resumed stage would log counts
    from 0 again. The count goes into the checkpoint's trainer_state.json (``stateful_callbacks``)
    and comes back from it when training resumes."""

    def __init__(self, trainer=None):
        self.trainer = trainer

    def state(self) -> dict:
        return {"args": {}, "attributes": {"total_train_tokens": self._count()}}

    def _count(self) -> int:
        return int(getattr(self.trainer, "_total_train_tokens", 0) or 0)

    def on_train_begin(self, args, state, control, **kwargs):
        saved = state.stateful_callbacks.get(type(self).__name__)
        if self.trainer is not None and state.global_step > 0 and isinstance(saved, dict):
            self.trainer._total_train_tokens = saved.get("attributes", {}).get(
                "total_train_tokens", self._count()
            )


def make_trl_trainer(
    trainer_cls,
    ctx,
    saved_adapter: dict[str, torch.Tensor],
    *,
    options: TrainerOptions | None = None,
    adapter: AdapterSpec | None = None,
    **kwargs,
):
    """A TRL trainer that stops at the first non-finite value (:class:`FiniteGuard`), logs to
    the stage's metrics.jsonl and the run's trackers (main process) and keeps its token count across a resume
    (:class:`TokenCount`), with the adapter weights of :func:`snapshot_adapter` put back after
    TRL's constructor cast them.

    ``options`` (the stage's config) and ``adapter`` add what they ask for: early stopping
    (transformers' ``EarlyStoppingCallback``; ``args`` from :func:`trl_args` with the same
    options), layer-wise learning rates or LoRA+ (an optimizer factory, see
    :mod:`alignkit.optim`) and AdaLoRA's rank budget (:class:`~alignkit.adapters.AdaLoraBudget`).
    """
    counter = TokenCount()
    callbacks = [FiniteGuard(ctx.where), counter, *kwargs.pop("callbacks", [])]
    stopping = getattr(options, "early_stopping", None)
    if stopping is not None:
        if kwargs.get("eval_dataset") is None:
            raise UserError(
                f"{ctx.where}.early_stopping: needs held-out data to evaluate on; give "
                "data.eval_source, data.eval_split or data.eval_size > 0"
            )
        callbacks += [
            MetricPresent(stopping.eval_metric, ctx.where),
            ResumableEarlyStopping(stopping.patience, stopping.min_delta),
        ]
    if adapter is not None and adapter.type == "adalora":
        callbacks.append(AdaLoraBudget(adapter.adalora, ctx.where))
    if ctx.is_main:
        callbacks.append(MetricsCallback(ctx.metrics_path))
    trainer = trainer_cls(callbacks=callbacks, **kwargs)
    for tracking in ctx.tracker.trainer_callbacks():  # the run's trackers, under this stage
        trainer.remove_callback(type(tracking))  # one a `train.report_to` added: ours instead
        trainer.add_callback(tracking)
    counter.trainer = trainer
    restore_adapter(trainer.model, saved_adapter)
    if adapter is not None:
        layerwise = getattr(options, "layerwise_lr", None)
        trainer.optimizer_cls_and_kwargs = grouped_optimizer(
            trainer.args, adapter, layerwise, ctx.where
        )
    return trainer


class ResumableEarlyStopping(EarlyStoppingCallback):
    """transformers' early stopping whose count of evaluations without improvement survives a
    resume. The trainer restores callback states only with ``restore_callback_states_from_
    checkpoint``, which rebuilds every stateful callback from its saved arguments (and would cut
    :class:`TokenCount` from its trainer), so the count is read back here, as TokenCount does."""

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        saved = state.stateful_callbacks.get(type(self).__name__)
        if state.global_step > 0 and isinstance(saved, dict):
            attributes = saved.get("attributes", {})
            self.early_stopping_patience_counter = attributes.get(
                "early_stopping_patience_counter", 0
            )


class MetricPresent(TrainerCallback):
    """Fails at the first evaluation (the baseline, before any step is trained) when the
    early-stopping metric is not among the trainer's evaluation metrics."""

    def __init__(self, metric: str, where: str):
        self.metric, self.where = metric, where

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and self.metric not in metrics:
            found = ", ".join(sorted(k for k in metrics if k.startswith("eval_")))
            raise UserError(
                f"{self.where}.early_stopping.metric: the evaluation reports no {self.metric!r}"
                f"{did_you_mean(self.metric, metrics)}; it reports: {found}"
            )


def early_stopping_record(trainer) -> dict[str, Any] | None:
    """What stage.json records of early stopping (``None`` when it was off): the metric, its
    best value and step (the weights the stage saved), and the step training stopped at."""
    args, state = trainer.args, trainer.state
    stopper = next(
        (c for c in trainer.callback_handler.callbacks if isinstance(c, EarlyStoppingCallback)),
        None,
    )
    if stopper is None:
        return None
    return {
        "metric": args.metric_for_best_model,
        "greater_is_better": args.greater_is_better,
        "best_metric": state.best_metric,
        "best_step": state.best_global_step,
        "stopped_at": state.global_step,
        "max_steps": state.max_steps,
        "stopped_early": state.global_step < state.max_steps,
        "patience": stopper.early_stopping_patience,
        "min_delta": stopper.early_stopping_threshold,
        "every": args.eval_steps,
    }


def evaluate_before_training(trainer, ctx, prefix: str = "before_") -> dict[str, float]:
    """Evaluate the untrained model once (the baseline a stage is judged against).

    The result is kept in the partial dir, so a resumed attempt reports the same baseline rather
    than evaluating its half-trained checkpoint. Called from inside ``train()`` (see
    :class:`BaselineEvaluation`): an ``evaluate()`` before it makes accelerate prepare the model
    for inference only, and the later ``prepare()`` for training then skips the DDP/DeepSpeed
    wrap, so every rank would train its own copy.
    """
    saved = ctx.out_dir / "eval_before_training.json"
    if ctx.resume_from is not None and (kept := read_json_or_none(saved)) is not None:
        return kept
    raw = trainer.evaluate()
    metrics = {prefix + k: float(v) for k, v in raw.items() if isinstance(v, int | float)}
    if ctx.is_main:
        write_json_atomic(saved, metrics)
    return metrics


class BaselineEvaluation(TrainerCallback):
    """Runs :func:`evaluate_before_training` at the start of ``train()``, after the trainer has
    wrapped the model for (distributed) training."""

    def __init__(self, trainer, ctx):
        self.trainer, self.ctx = trainer, ctx
        self.metrics: dict[str, float] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if not self.metrics:
            self.metrics = evaluate_before_training(self.trainer, self.ctx)


def evaluate_after_training(trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.evaluate().items() if isinstance(v, int | float)}


def train_and_evaluate(trainer, ctx, evaluate: bool) -> dict[str, float]:
    """Evaluate the untrained model (``before_*``), train (resuming an interrupted attempt from
    its checkpoint), evaluate again: the metrics a TRL-backed stage records."""
    baseline = BaselineEvaluation(trainer, ctx)
    if evaluate:
        trainer.add_callback(baseline)
    trainer.train(resume_from_checkpoint=str(ctx.resume_from) if ctx.resume_from else None)
    metrics = dict(baseline.metrics)
    metrics.update(final_train_metrics(trainer))
    if evaluate:
        metrics.update(evaluate_after_training(trainer))
    return metrics


def final_train_metrics(trainer) -> dict[str, float]:
    """The last logged value of each training metric (the trainer's own names).

    ``train_loss`` is the mean of every logged loss of the whole run: the trainer's own covers
    only the steps since a resume, so a resumed stage would report a different number for the
    same weights."""
    out: dict[str, float] = {}
    for entry in trainer.state.log_history:
        for k, v in entry.items():
            if isinstance(v, int | float) and k not in ("step", "epoch"):
                out[k] = float(v)
    if "train_loss" in out:
        out["train_loss"] = whole_run_train_loss(trainer.state.log_history, out["train_loss"])
    out["global_step"] = float(trainer.state.global_step)
    return out


def whole_run_train_loss(log_history: list[dict], trainer_value: float) -> float:
    """The mean of every logged loss, before and after any resume (``trainer_value`` if none)."""
    losses = [float(e["loss"]) for e in log_history if isinstance(e.get("loss"), int | float)]
    return sum(losses) / len(losses) if losses else float(trainer_value)


def save_trained(trainer, tokenizer, ctx, adapter_type: str) -> str:
    """Save a TRL stage's trained weights; every rank calls it, rank 0 writes. Returns the subdir.

    Under ZeRO-3 or FSDP each rank holds a shard of every large tensor, so the weights are
    gathered first (a collective) — saving the rank's own view writes empty tensors. DDP and
    ZeRO-2 hold whole tensors; a single process saves as is."""
    state_dict = None
    if trainer.accelerator.num_processes > 1:
        state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if not ctx.is_main:
        return weights_subdir(adapter_type)
    return models.save_stage_model(trainer.model, tokenizer, ctx.out_dir, state_dict=state_dict)


def weights_sharded() -> bool:
    """Whether each rank holds only a shard of the weights (DeepSpeed ZeRO-3, FSDP): then any
    forward pass is a collective every rank must join."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return True
    return is_deepspeed_zero3_enabled()
