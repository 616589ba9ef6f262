"""The ``sweep:`` block of a pipeline YAML: which stage, which parameters with which
distributions, the objective, the budget and the pruner. Parsed and checked here (no Optuna
needed), so a typo fails before anything trains.

A parameter is a dotted path into the swept stage, as ``--set`` writes it, and a distribution::

    stages.dpo.beta: loguniform(0.01, 1)
    stages.dpo.train.learning_rate: loguniform(1e-5, 1e-3)
    stages.dpo.label_smoothing: uniform(0, 0.2)
    stages.dpo.train.per_device_train_batch_size: int(8, 32, step=8)
    stages.dpo.train.lr_scheduler_type: categorical(linear, cosine)
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator

from alignkit.config import (
    StageBase,
    StageKinds,
    Strict,
    _format_errors,
    _model_in,
    apply_override,
    did_you_mean,
    read_yaml,
    trainer_config_class,
    validate_pipeline,
)
from alignkit.errors import UserError

KINDS = ("uniform", "loguniform", "int", "logint", "categorical")
_CALL = re.compile(r"^\s*(\w+)\s*\((.*)\)\s*$", re.S)


@dataclasses.dataclass(frozen=True)
class Distribution:
    """One parameter's search distribution: ``kind`` with ``low``/``high`` (and ``step`` for
    ``int``), or the ``choices`` of a ``categorical``."""

    kind: str
    low: float | None = None
    high: float | None = None
    step: int = 1
    choices: tuple = ()

    @property
    def example(self) -> Any:
        """A value inside the distribution (checks a config with it before any trial runs)."""
        return self.choices[0] if self.kind == "categorical" else self.low

    def suggest(self, trial, name: str) -> Any:
        """The value an Optuna trial draws for ``name``."""
        if self.kind == "categorical":
            return trial.suggest_categorical(name, list(self.choices))
        if self.kind in ("int", "logint"):
            step = 1 if self.kind == "logint" else self.step
            log = self.kind == "logint"
            return trial.suggest_int(name, int(self.low), int(self.high), step=step, log=log)
        return trial.suggest_float(name, self.low, self.high, log=self.kind == "loguniform")


def parse_distribution(text: Any, where: str) -> Distribution:
    """``loguniform(1e-5, 1e-3)`` and its kin -> a :class:`Distribution`; a UserError that says
    what is wrong and what is accepted otherwise. Arguments are read as YAML scalars."""
    usage = (
        "write one of uniform(LOW, HIGH), loguniform(LOW, HIGH), int(LOW, HIGH[, step=S]), "
        "logint(LOW, HIGH), categorical(A, B, ...)"
    )
    m = _CALL.match(text) if isinstance(text, str) else None
    if m is None:
        raise UserError(f"{where}: {text!r} is not a distribution; {usage}")
    kind, inner = m.group(1), m.group(2)
    if kind not in KINDS:
        raise UserError(
            f"{where}: unknown distribution {kind!r}{did_you_mean(kind, KINDS)}; {usage}"
        )
    args, kwargs = _arguments(inner, where)
    if kind == "categorical":
        if kwargs or not args:
            raise UserError(
                f"{where}: categorical takes one or more values, e.g. categorical(a, b)"
            )
        for value in args:
            if value is not None and not isinstance(value, bool | int | float | str):
                raise UserError(
                    f"{where}: categorical values must be numbers, strings, true/false or null "
                    f"(Optuna stores them), not {value!r}"
                )
        if len(set(map(repr, args))) != len(args):
            raise UserError(f"{where}: categorical lists a value twice: {args}")
        return Distribution(kind, choices=tuple(args))
    if len(args) != 2 or set(kwargs) - ({"step"} if kind == "int" else set()):
        extra = "[, step=S]" if kind == "int" else ""
        raise UserError(f"{where}: {kind} takes LOW, HIGH{extra}; got {text!r}")
    low, high = args
    for name, v in (("low", low), ("high", high)):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise UserError(f"{where}: {kind}'s {name} must be a finite number, not {v!r}")
    if kind in ("int", "logint") and not (isinstance(low, int) and isinstance(high, int)):
        raise UserError(f"{where}: {kind} bounds must be integers, got {low!r}, {high!r}")
    if not low < high:
        raise UserError(f"{where}: {kind} needs LOW < HIGH, got {low!r}, {high!r}")
    if kind in ("loguniform", "logint") and low <= 0:
        raise UserError(f"{where}: {kind} needs LOW > 0 (a log scale), got {low!r}")
    step = kwargs.get("step", 1)
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        raise UserError(f"{where}: int's step must be a positive integer, got {step!r}")
    if "uniform" in kind:
        low, high = float(low), float(high)
    return Distribution(kind, low, high, step)


def _arguments(inner: str, where: str) -> tuple[list, dict]:
    """The arguments of ``kind(...)`` read as a YAML flow sequence (``[a, b]`` is one value),
    ``name=value`` items as keyword arguments."""
    try:
        items = read_yaml(f"[{inner}]")
    except Exception:  # noqa: BLE001 (a YAML error: say which text)
        raise UserError(f"{where}: cannot read the arguments {inner!r}") from None
    args, kwargs = [], {}
    for item in items:
        m = re.fullmatch(r"(\w+)=(.*)", item) if isinstance(item, str) else None
        if m:
            kwargs[m.group(1)] = read_yaml(m.group(2)) if m.group(2).strip() else None
        elif kwargs:
            raise UserError(f"{where}: a positional value after a keyword: {inner!r}")
        else:
            args.append(item)
    return args, kwargs


class PrunerSpec(Strict):
    """Stops trials whose intermediate objective is poor (Optuna's pruners)."""

    type: Literal["median", "hyperband", "none"] = "median"
    """``median``: stop a trial whose value at a step is worse than the median of earlier
    trials at that step. ``hyperband``: successive halving over several brackets."""
    startup_trials: int = Field(3, ge=0)
    """Median: no trial is stopped until this many have finished."""
    warmup_steps: int = Field(0, ge=0)
    """Median: no trial is stopped before this training step."""
    reduction_factor: int = Field(3, ge=2)
    """Hyperband: the share of trials kept at each rung is 1 / this."""


class SweepSpec(Strict):
    """Hyperparameter search over one stage of the pipeline, on Optuna."""

    stage: str
    """The stage each trial runs with new values; the stages it starts from or reads run once
    and are shared; stages after it are not run by the sweep."""
    params: dict[str, Distribution]
    """Dotted path in the stage (``stages.dpo.beta``) -> distribution (``loguniform(0.01, 1)``)."""
    objective: str
    """A metric the stage records in its stage.json (``gold_reward_gain``, ``eval_loss``, ...)."""
    direction: Literal["maximize", "minimize"]
    """Whether a larger or a smaller objective is better."""
    trials: int = Field(gt=0)
    """Trial budget of the study: finished trials (complete, pruned or failed by their own
    error), over every process working on it."""
    report_every: int = Field(0, ge=0)
    """Training steps between intermediate objective values handed to the pruner (0: none; then
    nothing is pruned). Each costs one evaluation (for a held-out metric: sampling 2 models)."""
    pruner: PrunerSpec = PrunerSpec()
    """How poor trials are stopped (needs ``report_every``)."""
    sampler: Literal["tpe", "random"] = "tpe"
    """``tpe``: Optuna's default Bayesian sampler; ``random``: independent random draws."""
    startup_trials: int | None = Field(None, ge=1)
    """TPE: random trials before it models the results (default: a third of the budget, >= 3)."""
    seed: int | None = None
    """Sampler seed (default: the run's seed); a process joining a running study adds the
    number of trials it finds, so two workers do not draw the same values."""
    storage: str | None = None
    """Optuna storage URL; default ``sqlite:///<run_dir>/sweep/study.db``. Several machines:
    ``postgresql://USER:PASSWORD@HOST/DB`` (needs psycopg2), with a run directory they share."""
    study_name: str | None = None
    """Default: ``<run name>-<stage>``."""
    heartbeat_seconds: int = Field(60, ge=1)
    """A trial whose process sent no heartbeat for 3x this long is marked failed and retried
    (a crashed machine). On this host a dead process's trial is retried at once."""
    max_retries: int = Field(3, ge=0)
    """How often a killed trial is retried (resuming its checkpoint) before it counts as failed."""

    @field_validator("params", mode="before")
    @classmethod
    def _parse(cls, v: Any) -> Any:
        if not isinstance(v, dict) or not v:
            raise ValueError("params must map parameter paths to distributions")
        return {k: d if isinstance(d, Distribution) else parse_distribution(d, f"sweep.params.{k}")
                for k, d in v.items()}  # fmt: skip

    model_config = Strict.model_config | {"arbitrary_types_allowed": True}

    @property
    def n_startup(self) -> int:
        return self.startup_trials or max(3, self.trials // 3)


def load_sweep(raw: dict, stage_kinds: StageKinds, where: str) -> SweepSpec:
    """The checked ``sweep:`` block of a raw pipeline config: its keys, distributions, stage and
    parameter paths ("did you mean"), and the pipeline validated with each parameter set to a
    value of its distribution (a value of the wrong type fails here, not in trial 7)."""
    block = raw.get("sweep")
    if not isinstance(block, dict):
        raise UserError(f"{where}: no `sweep:` block (stage, params, objective, direction, trials)")
    try:
        spec = SweepSpec.model_validate(block)
    except ValidationError as e:
        raise UserError(_format_errors(e, SweepSpec, f"{where}: sweep")) from None
    cfg = validate_pipeline(raw, stage_kinds, where)
    names = [s.name for s in cfg.stages]
    if spec.stage not in names:
        raise UserError(
            f"{where}: sweep.stage: no stage named {spec.stage!r}{did_you_mean(spec.stage, names)}"
        )
    stage = cfg.stage(spec.stage)
    for path in spec.params:
        check_param_path(path, stage, f"{where}: sweep.params")
    if spec.pruner.type != "none" and spec.report_every == 0:
        raise UserError(
            f"{where}: sweep.report_every: the {spec.pruner.type} pruner needs intermediate "
            "values; set report_every to a number of training steps (or pruner.type: none)"
        )
    trial_raw = with_params(raw, {p: d.example for p, d in spec.params.items()})
    try:
        validate_pipeline(trial_raw, stage_kinds, where)
    except UserError as e:
        raise UserError(f"{e}\n(with the sweep's parameters at their first values)") from None
    return spec


def check_param_path(path: str, stage: StageBase, where: str) -> None:
    """``stages.<stage>.<field>[.<field>...]`` must name a field of the stage (a TRL option
    under ``train.``); unknown names get a "did you mean"."""
    parts = path.split(".")
    prefix = f"stages.{stage.name}."
    if not path.startswith(prefix) or len(parts) < 3:
        raise UserError(
            f"{where}: {path!r}: a parameter is a path inside the swept stage, e.g. "
            f"{prefix}beta (only that stage changes from trial to trial)"
        )
    model: Any = type(stage)
    for i, part in enumerate(parts[2:], start=2):
        if model is dict:  # train: TRL options, checked against the TRL config class
            valid = [f.name for f in dataclasses.fields(trainer_config_class(type(stage)))]
        else:
            valid = [f.alias or n for n, f in model.model_fields.items()]
        if part not in valid or (model is dict and i != len(parts) - 1):
            shown = ".".join(parts[:i])
            raise UserError(
                f"{where}: {path!r}: {shown} has no {'option' if model is dict else 'field'} "
                f"{part!r}{did_you_mean(part, valid)}"
            )
        if model is dict:
            break
        field = next(f for n, f in model.model_fields.items() if part in (n, f.alias))
        if part == "train" and type(stage).trainer_config is not None:
            model = dict
        elif i < len(parts) - 1:
            model = _model_in(field.annotation)
            if not (isinstance(model, type) and issubclass(model, BaseModel)):
                raise UserError(f"{where}: {path!r}: {'.'.join(parts[: i + 1])} has no fields")


def with_params(raw: dict, values: dict[str, Any]) -> dict:
    """A copy of the raw pipeline config with each dotted path set (as ``--set`` would), and
    the ``sweep:`` block removed: the config one trial runs."""
    out = copy.deepcopy({k: v for k, v in raw.items() if k != "sweep"})
    for path, value in values.items():
        apply_override(out, f"{path}={json.dumps(value)}")
    return out
