"""What one stage hands the next: a finished stage's output, and a policy with its reference.

One place for what every stage agrees on, so a stage never spells it itself:

- on disk, a finished stage is ``<run_dir>/<stage>/`` with ``stage.json``
  (:data:`alignkit.rundir.STAGE_FILE`) and its weights in ``adapter/`` (:data:`ADAPTER_DIR`) or
  ``model/`` (:data:`FULL_MODEL_DIR`, full fine-tuning);
- in memory, a policy and its frozen reference share one base: the trained adapter is peft's
  first adapter, :data:`POLICY_ADAPTER`, and the frozen copy is :data:`REFERENCE_ADAPTER`, the
  name TRL's DPO, GRPO and RLOO trainers give it (our PPO uses the same names);
- :class:`StageOutput`: a finished stage read once from its directory (kind, weights, base
  model, adapter type, tokenizer), found in a run by :func:`find_stage`;
- :class:`AdapterView` and :class:`PolicyPair`: the policy a stage trains and the reference it
  is measured against, as one value each, whatever way the stage holds them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignkit.config import BUILTIN_MODEL, ModelSpec, did_you_mean
from alignkit.errors import UserError
from alignkit.rundir import STAGE_FILE, read_json_or_none

if TYPE_CHECKING:  # torch costs ~1.4 s to import; the pipeline runner reads stages without it
    from torch import nn

#: Subdirectory of a finished stage holding its peft adapter.
ADAPTER_DIR = "adapter"
#: Subdirectory of a finished stage holding a fully fine-tuned model.
FULL_MODEL_DIR = "model"
#: peft's name for a model's first adapter: the one a stage trains and saves.
POLICY_ADAPTER = "default"
#: TRL's name for the frozen copy of the starting adapter (the reference).
REFERENCE_ADAPTER = "ref"


def weights_subdir(adapter_type: str) -> str:
    """The subdirectory a stage trained with ``adapter_type`` saves its weights in."""
    return FULL_MODEL_DIR if adapter_type == "full" else ADAPTER_DIR


# --- a finished stage --------------------------------------------------------------------------


@dataclass(frozen=True)
class StageOutput:
    """A finished stage: its directory and ``stage.json`` (``record``), read once."""

    name: str
    kind: str
    dir: Path
    record: dict

    @classmethod
    def read(cls, stage_dir: str | Path) -> StageOutput | None:
        """The finished stage in ``stage_dir``, or ``None`` when it has no readable
        ``stage.json`` (not run, still running, failed, or torn by a crash)."""
        stage_dir = Path(stage_dir)
        record = read_json_or_none(stage_dir / STAGE_FILE)
        if not isinstance(record, dict):
            return None
        return cls(stage_dir.name, record.get("kind", ""), stage_dir, record)

    @property
    def adapter_type(self) -> str:
        """``lora``, ``full``, ... as the stage trained (``none`` for a stage without weights)."""
        return self.record.get("adapter_type", "none")

    @property
    def weights_dir(self) -> Path | None:
        """``adapter/`` or ``model/`` (full fine-tuning); ``None`` for a stage without weights."""
        for sub in (FULL_MODEL_DIR, ADAPTER_DIR):
            if (self.dir / sub).is_dir():
                return self.dir / sub
        return None

    @property
    def adapter_dir(self) -> Path | None:
        """The peft adapter the stage saved, if it saved one."""
        path = self.dir / ADAPTER_DIR
        return path if path.is_dir() else None

    @property
    def tokenizer_dir(self) -> Path:
        """The tokenizer (with its chat template) is saved in the stage directory itself."""
        return self.dir

    @property
    def is_policy(self) -> bool:
        """Whether the stage produced a policy a later stage may start from. The pipeline
        records it; a stage.json written before it did counts generating weights as one."""
        if "is_policy" in self.record:
            return bool(self.record["is_policy"])
        return self.kind != "reward_model" and self.weights_dir is not None

    @property
    def base(self) -> ModelSpec:
        """The base model the stage trained on (see :func:`spec_from_record`)."""
        return spec_from_record(self.record)


def spec_from_record(record: dict, **override) -> ModelSpec:
    """The base model a finished stage names in its ``stage.json``: name, revision, dtype and
    quantization only. Nothing that runs code (``trust_remote_code``) is ever taken from a run
    directory, which may come from anyone; pass it explicitly (``override``) when it is meant."""
    base = record.get("base_model") or {}
    fields = {
        "name": base.get("name", BUILTIN_MODEL),
        "revision": base.get("revision"),
        "dtype": base.get("dtype", "auto"),
        "quantization": record.get("quantization", "none"),
    }
    try:
        return ModelSpec(**{**fields, **override})
    except ValueError as e:
        raise UserError(f"{STAGE_FILE} names an unusable base model: {e}") from None


def run_stages(run_dir: Path, kinds: tuple[str, ...] | None = None) -> list[StageOutput]:
    """The finished stages of a run (of ``kinds`` when given), by name."""
    if not run_dir.is_dir():
        return []
    found = (StageOutput.read(p) for p in sorted(run_dir.iterdir()) if p.is_dir())
    return [s for s in found if s is not None and (kinds is None or s.kind in kinds)]


def find_stage(run_dir: Path, name: str, kinds: tuple[str, ...], where: str) -> StageOutput:
    """The finished stage ``name`` of the run in ``run_dir``, which must be one of ``kinds``;
    ``where`` names the config key that named it. Only plain stage names resolve, never a path
    out of the run; an unknown name gets the nearest finished stage of those kinds as a hint."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise UserError(f"{where}: {name!r} is not a stage name of this run")
    stage = StageOutput.read(run_dir / name)
    if stage is None:
        others = [s.name for s in run_stages(run_dir, kinds)]
        raise UserError(
            f"{where}: no finished {' or '.join(kinds)} stage {name!r} in {run_dir}"
            f"{did_you_mean(name, others)}; put "
            f"that stage earlier in the pipeline; {' or '.join(kinds)} stages there: "
            f"{', '.join(others) or 'none'}"
        )
    if stage.kind not in kinds:
        raise UserError(
            f"{where}: {name!r} is a {stage.kind} stage; it must be " + " or ".join(kinds)
        )
    return stage


# --- a policy and its reference ----------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class AdapterView:
    """``model`` with ``adapter`` active; ``adapter=None`` uses the model as it is, and
    ``base=True`` runs a peft model with every adapter disabled (its base weights).

    Stages hold a policy and its reference in three ways, and a view names each: one peft model
    with adapters :data:`POLICY_ADAPTER` and :data:`REFERENCE_ADAPTER` (DPO, GRPO, PPO); a peft
    model whose reference is its base (SFT, :meth:`base_of`); two separate models (full
    fine-tuning). ``with view.active() as model:`` runs the block with that adapter active and
    restores the previously active adapter afterwards. peft's ``set_adapter`` (which every
    switch goes through, TRL's ``use_adapter`` included) also makes the active adapter
    trainable and freezes the others; a view puts every parameter's ``requires_grad`` back as
    it found it, so evaluating inside a training loop never changes what trains.
    """

    model: nn.Module
    adapter: str | None = None
    base: bool = False

    @classmethod
    def base_of(cls, model: nn.Module) -> AdapterView:
        """The base weights of a peft model (every adapter disabled)."""
        return cls(model, None, base=True)

    def describe(self) -> str:
        if self.base:
            return "base (adapters disabled)"
        return f"adapter {self.adapter!r}" if self.adapter else type(self.model).__name__

    @contextmanager
    def active(self) -> Iterator[nn.Module]:
        """Activate this view's adapter for the block; yields the model to call."""
        if self.adapter is None and not self.base:
            yield self.model
            return
        # peft and trl take ~6 s to import: only a view that switches adapters needs them, and
        # the pipeline runner and config checks import this module without training anything
        from peft import PeftModel
        from trl.trainer.utils import use_adapter

        if not isinstance(self.model, PeftModel):
            raise TypeError(
                f"AdapterView({self.describe()}) needs a peft model, got {type(self.model).__name__}"
            )
        if self.adapter is not None and self.adapter not in self.model.peft_config:
            raise ValueError(
                f"no adapter {self.adapter!r} on this model; it has {sorted(self.model.peft_config)}"
            )
        trainable = {name: p.requires_grad for name, p in self.model.named_parameters()}
        try:
            with use_adapter(self.model, None if self.base else self.adapter):
                _set_requires_grad(self.model, trainable)
                yield self.model
        finally:
            _set_requires_grad(self.model, trainable)


def _set_requires_grad(model: nn.Module, flags: dict[str, bool]) -> None:
    for name, p in model.named_parameters():
        if p.requires_grad != flags[name]:
            p.requires_grad_(flags[name])


@dataclass(frozen=True)
class PolicyPair:
    """The policy a stage trains and the reference its KL is measured against. ``reference``
    is ``None`` when the trainer holds none (GRPO at ``beta: 0``, SimPO, ORPO): health checks
    then skip the KL, and the held-out evaluation loads the starting policy instead."""

    policy: AdapterView
    reference: AdapterView | None

    @classmethod
    def of(cls, model: Any, ref_model: Any = None, base_is_reference: bool = False) -> PolicyPair:
        """The pair as a trainer holds it: a peft ``model`` with the :data:`POLICY_ADAPTER`
        and, when present, the :data:`REFERENCE_ADAPTER`; or a full model and its separate
        frozen ``ref_model``. ``base_is_reference``: without a reference adapter, the trainer
        scores the reference with adapters disabled (SFT, TRL's DPO), so the base is it."""
        if not hasattr(model, "peft_config"):
            reference = AdapterView(ref_model) if ref_model is not None else None
            return cls(AdapterView(model), reference)
        if ref_model is not None:
            return cls(AdapterView(model, POLICY_ADAPTER), AdapterView(ref_model))
        if REFERENCE_ADAPTER in model.peft_config:
            reference = AdapterView(model, REFERENCE_ADAPTER)
        else:
            reference = AdapterView.base_of(model) if base_is_reference else None
        return cls(AdapterView(model, POLICY_ADAPTER), reference)
