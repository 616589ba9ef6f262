"""Optimizer parameter groups for TRL trainers: layer-wise learning rates (full fine-tuning) and
LoRA+ (LoRA). No trainer subclass: the groups reach the trainer as an optimizer factory in
``Trainer.optimizer_cls_and_kwargs``, which transformers calls with the model it trains when it
creates the optimizer (after wrapping it for FSDP when it delays that), so the groups hold the
parameters that train. The optimizer class and its settings (``train.optim``, betas, eps) stay
the trainer's: only the grouping and the per-group rates are ours.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from peft.optimizers import create_loraplus_optimizer
from torch import nn
from transformers import Trainer
from transformers.trainer_optimizer import is_optimizer_factory

from alignkit.config import AdapterSpec, LayerwiseLrSpec
from alignkit.errors import UserError

#: A transformer block's parameters: ``...layers.3.mlp...`` (Llama/Qwen/Mistral), ``h.3`` (GPT-2),
#: ``blocks.3``/``block.3``/``layer.3`` (others).
_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")
_EMBEDDING = re.compile(r"embed|(?:^|\.)(?:wte|wpe)(?:$|\.)")

Groups = Callable[[nn.Module], list[dict[str, Any]]]


def optimizer_factory(args, groups: Groups, where: str) -> tuple[Callable, dict]:
    """``(factory, {})`` for ``Trainer.optimizer_cls_and_kwargs``: the trainer's own optimizer
    class and settings over ``groups(model)``."""

    def build(model: nn.Module):
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
        if is_optimizer_factory(cls) or {"params", "model", "optimizer_dict"} & kwargs.keys():
            raise UserError(
                f"{where}.train.optim: {args.optim} builds its own parameter groups; layerwise_lr "
                "and adapter.loraplus_ratio need a plain optimizer (adamw_torch, sgd, ...)"
            )
        return cls(groups(model), **kwargs)

    return (lambda: build), {}


def decay_names(model: nn.Module) -> set[str]:
    """Parameters that get weight decay: the trainer's own rule (not biases or norms)."""
    return set(Trainer.get_decay_parameter_names(None, model))


def layerwise_groups(spec: LayerwiseLrSpec, lr: float, weight_decay: float) -> Groups:
    """Groups by depth, each split by weight decay, named ``embeddings``, ``layer.<i>`` and
    ``head``. Block i of L trains at ``head * decay ** (L - i)``; the embeddings (tied output
    embeddings included: one tensor) at ``spec.embeddings``; everything else above the blocks
    (final norm, LM or score head) at ``head``."""

    def groups(model: nn.Module) -> list[dict[str, Any]]:
        decayed = decay_names(model)
        embedding_ids = {id(p) for p in model.get_input_embeddings().parameters()}
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        depths = {n: int(m[1]) for n, _ in named if (m := _BLOCK.search(n))}
        if not depths:
            raise UserError(
                f"layerwise_lr: found no numbered transformer blocks in {type(model).__name__} "
                "(parameter names like 'layers.0.' or 'h.0.')"
            )
        blocks = max(depths.values()) + 1
        head = spec.head or lr
        rates = {"head": head, "embeddings": spec.embeddings or head * spec.decay ** (blocks + 1)}
        rates.update({f"layer.{d}": head * spec.decay ** (blocks - d) for d in range(blocks)})
        by_group: dict[tuple[str, bool], list[nn.Parameter]] = {}
        for name, p in named:
            if name in depths:
                group = f"layer.{depths[name]}"
            elif id(p) in embedding_ids or _EMBEDDING.search(name):
                group = "embeddings"
            else:
                group = "head"
            by_group.setdefault((group, name in decayed), []).append(p)
        return [
            {"params": params, "lr": rates[group], "weight_decay": weight_decay if decays else 0.0,
             "name": group}
            for (group, decays), params in by_group.items()
        ]  # fmt: skip

    return groups


def loraplus_groups(ratio: float, lr: float, weight_decay: float) -> Groups:
    """LoRA+ (Hayou et al. 2024) through peft's own grouping: B matrices (and 1-d adapter
    parameters) at ``lr * ratio``, A matrices at ``lr``. Each group is named (``lora_A``,
    ``lora_B``, ``lora_B_no_decay``, ``lora_embedding``) for the logs and tests."""
    names = ("lora_A", "lora_embedding", "lora_B", "lora_B_no_decay")

    class _Collect:  # peft builds the optimizer; we want only its groups
        def __init__(self, groups, **_):
            self.groups = groups

    def groups(model: nn.Module) -> list[dict[str, Any]]:
        built = create_loraplus_optimizer(
            model, _Collect, lr=lr, loraplus_lr_ratio=ratio, loraplus_weight_decay=weight_decay
        )
        return [{**g, "name": n} for g, n in zip(built.groups, names, strict=True) if g["params"]]

    return groups


def grouped_optimizer(args, adapter: AdapterSpec, layerwise: LayerwiseLrSpec | None, where: str):
    """``optimizer_cls_and_kwargs`` for a stage's options, or ``None`` for the trainer's
    default optimizer. Layer-wise rates are for full fine-tuning, LoRA+ for LoRA."""
    if layerwise is not None:
        if adapter.type != "full":
            raise UserError(
                f"{where}.layerwise_lr: learning rates by depth are for full fine-tuning "
                f"(adapter type here: {adapter.type}); for LoRA set adapter.loraplus_ratio"
            )
        groups = layerwise_groups(layerwise, args.learning_rate, args.weight_decay)
    elif adapter.loraplus_ratio is not None:
        groups = loraplus_groups(adapter.loraplus_ratio, args.learning_rate, args.weight_decay)
    else:
        return None
    return optimizer_factory(args, groups, where)
