"""A model with a chosen adapter active: the policy or the reference of a stage, as one value.

Stages hold a policy and its reference in three ways, and :class:`AdapterView` names each:

- one peft model with adapters ``"default"`` (policy) and ``"ref"`` (reference), as DPO, PPO
  and GRPO leave it: ``AdapterView(model, "default")`` and ``AdapterView(model, "ref")``;
- a peft model whose reference is its base (SFT): ``AdapterView(model, "default")`` and
  ``AdapterView.base_of(model)``;
- two separate models (full fine-tuning): ``AdapterView(policy)`` and ``AdapterView(reference)``.

``with view.active() as model:`` runs the block with that adapter active and restores the
previously active adapter afterwards. peft's ``set_adapter`` (which every switch goes through,
TRL's ``use_adapter`` included) also makes the active adapter trainable and freezes the others;
a view puts every parameter's ``requires_grad`` back as it found it, so evaluating inside a
training loop never changes what trains.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True, eq=False)
class AdapterView:
    """``model`` with ``adapter`` active; ``adapter=None`` uses the model as it is, and
    ``base=True`` runs a peft model with every adapter disabled (its base weights)."""

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
