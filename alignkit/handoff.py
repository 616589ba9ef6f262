"""What a finished stage hands the next one: the names its weights and adapters go by.

One place for the names every stage agrees on, so a stage never spells them itself:

- on disk, a finished stage is ``<run_dir>/<stage>/`` with ``stage.json``
  (:data:`alignkit.rundir.STAGE_FILE`) and its weights in ``adapter/`` (:data:`ADAPTER_DIR`) or
  ``model/`` (:data:`FULL_MODEL_DIR`, full fine-tuning);
- in memory, a policy and its frozen reference share one base: the trained adapter is peft's
  first adapter, :data:`POLICY_ADAPTER`, and the frozen copy is :data:`REFERENCE_ADAPTER`, the
  name TRL's DPO, GRPO and RLOO trainers give it (our PPO uses the same names).
"""

from __future__ import annotations

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
