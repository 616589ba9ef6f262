"""Training stages, one module per kind, found through :data:`REGISTRY`.

A stage module defines its config schema (a :class:`~alignkit.config.StageBase` subclass) and
``run(cfg, ctx) -> StageResult``. Adding a kind means adding a module and one line here.
"""

from __future__ import annotations

from alignkit.pipeline import StageKind
from alignkit.stages import dpo, grpo, ppo, reward_model, rloo, rollout, sft, simpo
from alignkit.stages import eval as eval_stage

REGISTRY: dict[str, StageKind] = {
    "sft": StageKind(sft.SFTStageConfig, sft.run),
    "reward_model": StageKind(reward_model.RewardModelStageConfig, reward_model.run),
    "dpo": StageKind(dpo.DPOStageConfig, dpo.run),
    "grpo": StageKind(grpo.GRPOStageConfig, grpo.run),
    "rloo": StageKind(rloo.RLOOStageConfig, rloo.run),
    "ppo": StageKind(ppo.PPOStageConfig, ppo.run),
    "rollout": StageKind(rollout.RolloutStageConfig, rollout.run),
    "simpo": StageKind(simpo.SimPOStageConfig, simpo.run),
    "orpo": StageKind(simpo.ORPOStageConfig, simpo.run),
    "eval": StageKind(eval_stage.EvalStageConfig, eval_stage.run),
}


def stage_kinds() -> dict[str, type]:
    """Kind name -> config schema, as :func:`alignkit.config.load_pipeline` wants it."""
    return {kind: entry.config_cls for kind, entry in REGISTRY.items()}
