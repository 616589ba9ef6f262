"""alignkit.rewards: reward functions behind one signature,
``fn(prompts, completions, **meta) -> list[float]`` (TRL's convention).

Name one with :func:`resolve_reward` (``gold``, a rule, ``module:function`` or a reward-model
directory); combine several with weights with :func:`resolve_rewards`.
"""

from alignkit.rewards.registry import WeightedReward, resolve_reward, resolve_rewards

__all__ = ["WeightedReward", "resolve_reward", "resolve_rewards"]
