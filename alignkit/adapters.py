"""What some PEFT methods need beyond creating the adapter: AdaLoRA's rank budget, called every
optimizer step, and the starting adapter of PiSSA/OLoRA, kept so the trained adapter can be
converted to apply to the original base weights.
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

from alignkit.config import AdaLoraSpec, AdapterSpec
from alignkit.errors import UserError
from alignkit.handoff import POLICY_ADAPTER

#: The adapter as PiSSA/OLoRA initialised it, kept in the stage's partial dir until the trained
#: adapter has been saved (converted against it) and read as the held-out reference.
INITIAL_ADAPTER_DIR = "adapter_init"


class AdaLoraBudget(TrainerCallback):
    """AdaLoRA's schedule through the trainer: the total step count (known once training
    begins) sets the warm-up and final phases, and ``update_and_allocate`` runs after every
    optimizer step, before the gradients are cleared (peft scores each triplet by weight x
    gradient; under DDP the gradients are already averaged, so every rank prunes the same).

    Only a new AdaLoRA adapter is budgeted: one continued from a parent stage has its ranks
    fixed (its saved ``rank_pattern``) and trains at those ranks."""

    def __init__(self, spec: AdaLoraSpec, where: str):
        self.spec, self.where = spec, where
        self.budgeting = False

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        config = model.peft_config.get(POLICY_ADAPTER)
        self.budgeting = config is not None and config.rank_pattern is None
        if not self.budgeting:
            return
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
        if self.budgeting:
            model.base_model.update_and_allocate(state.global_step)


def keep_initial_adapter(model, adapter: AdapterSpec, out_dir: Path, quantized: bool, is_main):
    """After creating a PiSSA/OLoRA adapter: save it as initialised (peft's recipe: with
    ``init_lora_weights`` set to true, so loading it never decomposes the residual base again)
    for :func:`alignkit.models.save_stage_model` to convert the trained adapter against."""
    if not adapter.changes_base_weights:
        return
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
