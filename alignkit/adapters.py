"""What some PEFT methods need beyond creating the adapter: AdaLoRA's rank budget, called every
optimizer step, and the starting adapter of PiSSA/OLoRA, kept so the trained adapter can be
converted to apply to the original base weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict
from peft.tuners.adalora import AdaLoraLayer
from safetensors.torch import save_file
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from alignkit.config import AdaLoraSpec, AdapterSpec
from alignkit.errors import UserError
from alignkit.handoff import POLICY_ADAPTER

#: The adapter as PiSSA/OLoRA initialised it, kept in the stage's partial dir until the trained
#: adapter has been saved (converted against it) and read as the held-out reference.
INITIAL_ADAPTER_DIR = "adapter_init"


class AdaLoraBudget(TrainerCallback, ExportableState):
    """AdaLoRA's schedule through the trainer: the total step count (known once training
    begins) sets the warm-up and final phases, and ``update_and_allocate`` runs after every
    optimizer step, before the gradients are cleared (peft scores each triplet by weight x
    gradient; under DDP the gradients are already averaged, so every rank prunes the same).

    Between steps the rank pattern lives here, not in the adapter's config: with it there, peft
    would save checkpoints cut to the current ranks, which a resumed run (full ranks, pruned
    triplets at 0) cannot load. It travels in the checkpoint's trainer state instead. A resume
    restarts peft's sensitivity averages (they are not checkpointed), so the ranks it prunes
    after a resume can differ from an uninterrupted run's."""

    def __init__(self, spec: AdaLoraSpec, where: str):
        self.spec, self.where = spec, where
        self.rank_pattern: dict | None = None

    def state(self) -> dict:
        return {"args": {}, "attributes": {"rank_pattern": self.rank_pattern}}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        saved = state.stateful_callbacks.get(type(self).__name__)
        if state.global_step > 0 and isinstance(saved, dict):
            self.rank_pattern = saved.get("attributes", {}).get("rank_pattern")
        config = model.peft_config[POLICY_ADAPTER]
        total = state.max_steps
        config.total_step = total
        config.tinit = int(self.spec.tinit * total)
        config.tfinal = max(1, int(self.spec.tfinal * total))
        if config.tinit >= total - config.tfinal:
            raise UserError(
                f"{self.where}.adapter.adalora: {total} training steps leave no pruning phase "
                f"(tinit {config.tinit} + tfinal {config.tfinal} steps); train longer or lower "
                "tinit/tfinal"
            )

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        config = model.peft_config[POLICY_ADAPTER]
        config.rank_pattern = self.rank_pattern
        model.base_model.update_and_allocate(state.global_step)
        self.rank_pattern, config.rank_pattern = config.rank_pattern, None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        model.peft_config[POLICY_ADAPTER].rank_pattern = self.rank_pattern


def keep_initial_adapter(
    model, adapter: AdapterSpec, out_dir: Path, *, quantized: bool, sharded: bool, is_main: bool
) -> None:
    """After creating a PiSSA/OLoRA adapter: save it as initialised (peft's recipe: with
    ``init_lora_weights`` set to true, so loading it never decomposes the residual base again)
    for :func:`alignkit.models.save_stage_model` to convert the trained adapter against."""
    if not adapter.changes_base_weights:
        return
    if sharded:
        raise UserError(
            f"adapter.init_lora_weights: {adapter.init_lora_weights} is not supported with "
            "weights sharded across ranks (DeepSpeed ZeRO-3, FSDP): peft converts the adapter "
            "from whole tensors; use DDP or ZeRO-2, or init_lora_weights: default"
        )
    if quantized:
        raise UserError(
            f"adapter.init_lora_weights: {adapter.init_lora_weights} needs an unquantized base "
            "(on a quantized one the residual weights are re-quantized and the saved adapter no "
            "longer reproduces the trained model); set model.quantization: none"
        )
    model.peft_config[POLICY_ADAPTER].init_lora_weights = True
    if is_main:
        model.save_pretrained(
            str(out_dir / INITIAL_ADAPTER_DIR), selected_adapters=[POLICY_ADAPTER]
        )


def save_adalora_as_lora(model, out_dir: Path, state_dict: dict | None = None) -> None:
    """Save a trained AdaLoRA adapter as the LoRA adapter that computes the same update.

    AdaLoRA's update is ``B (A * E) * scaling / ranknum`` with the pruned triplets' ``E`` at 0.
    The same function as LoRA: per module the kept triplets only (rank = its budget), ``A``
    scaled by ``E * scaling / ranknum``, and ``lora_alpha`` equal to the rank (scale 1). A
    module pruned to rank 0 is left out. Saved so, the adapter continues into DPO/GRPO (TRL
    copies a LoRA adapter into its frozen reference; it cannot copy an AdaLoRA one), PPO, merge
    and vLLM like any LoRA adapter. ``state_dict``: the weights gathered from every rank."""
    config = model.peft_config[POLICY_ADAPTER]
    live = dict(model.named_parameters())

    def tensor(key: str) -> torch.Tensor:
        value = state_dict[key] if state_dict is not None and key in state_dict else live[key]
        return value.detach().float().cpu()

    weights: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for name, module in model.named_modules():
        if not isinstance(module, AdaLoraLayer) or POLICY_ADAPTER not in module.lora_A:
            continue
        a, b, e = (
            tensor(f"{name}.{part}.{POLICY_ADAPTER}") for part in ("lora_A", "lora_B", "lora_E")
        )
        ranknum = tensor(f"{name}.ranknum.{POLICY_ADAPTER}").item()
        keep = e.flatten() != 0  # pruned triplets are exactly 0 (peft masks them with masked_fill)
        if not keep.any():
            continue
        scale = module.scaling[POLICY_ADAPTER] / (ranknum + 1e-5)
        dtype = live[f"{name}.lora_A.{POLICY_ADAPTER}"].dtype
        weights[f"{name}.lora_A.weight"] = ((a * e) * scale)[keep].to(dtype).contiguous()
        weights[f"{name}.lora_B.weight"] = b[:, keep].to(dtype).contiguous()
        ranks[name.removeprefix("base_model.model.")] = int(keep.sum())
    others = get_peft_model_state_dict(model, state_dict=state_dict, adapter_name=POLICY_ADAPTER)
    weights.update({k: v for k, v in others.items() if "lora_" not in k and "ranknum" not in k})
    top = max(ranks.values(), default=1)
    lora = LoraConfig(
        r=top,
        lora_alpha=top,
        rank_pattern=ranks,
        alpha_pattern=ranks,
        target_modules=sorted(ranks) or None,
        lora_dropout=config.lora_dropout,
        fan_in_fan_out=config.fan_in_fan_out,
        modules_to_save=config.modules_to_save,
        task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path,
        revision=config.revision,
        inference_mode=True,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    lora.save_pretrained(str(out_dir))
    save_file(weights, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
