"""RLOO on TRL's RLOOTrainer: the GRPO stage's run with RLOO's trainer and config class.

RLOO's advantage is each completion's reward minus the mean of the other completions of its
prompt (leave-one-out), and its KL is a penalty on the reward, not a term of the loss.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from alignkit.stages.grpo import OnlineRLConfig, run

__all__ = ["RLOOStageConfig", "run"]


class RLOOStageConfig(OnlineRLConfig):
    kind: Literal["rloo"] = "rloo"
    trainer_config: ClassVar[str] = "trl.RLOOConfig"

    beta: float = Field(0.05, ge=0)
    """KL coefficient: RLOO subtracts ``beta *`` the sequence's summed log-ratio to the reference
    from the reward (GRPO adds ``beta *`` a per-token KL to the loss), so its scale is the
    reward's. 0.05: TRL's RLOO default. With a parent adapter TRL keeps the "ref" copy even at 0."""
