"""What a PPO rollout is worth: the training reward, shaped, and a held-out RM's view of it.

The training score of a completion is one :class:`~alignkit.rewards.registry.WeightedReward`:
the run's reward model (an adapter on PPO's base, or a model of its own) as one component and
the ``rewards`` functions as the others, computed on the rollout as generated (a cut-off answer
is scored as cut off). :meth:`Scoring.shape` then normalises it (statistics of the first step, or running),
clips it and subtracts the missing-EOS penalty. A held-out reward model, when there is one,
scores the same rollouts for the gold-free hacking check. Statistics are taken over every
rank's scores (``gather``), so all ranks normalise alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from alignkit.rewards.registry import RewardFn, WeightedReward


class RunningMoments:
    """Mean and std of every score seen so far (Chan et al.'s parallel update)."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def update(self, xs: torch.Tensor) -> None:
        n, mean, var = (
            len(xs),
            xs.mean().item(),
            xs.var(unbiased=False).item() if len(xs) > 1 else 0.0,
        )
        total = self.count + n
        delta = mean - self.mean
        self.var = (self.var * self.count + var * n + delta**2 * self.count * n / total) / total
        self.mean += delta * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 1e-8))


class Scoring:
    """``reward``: the training reward (reward model and functions, weighted);
    ``heldout_scorer``: a held-out reward model that only watches, or None."""

    def __init__(
        self,
        cfg,
        reward: WeightedReward,
        heldout_scorer: RewardFn | None,
        gather: Callable[[torch.Tensor], torch.Tensor],
    ):
        self.cfg, self.reward, self.heldout_scorer, self.gather = (
            cfg,
            reward,
            heldout_scorer,
            gather,
        )
        self.score_stats = RunningMoments()
        self.heldout_stats, self.proxy_stats = RunningMoments(), RunningMoments()

    def raw(self, prompts, batch) -> torch.Tensor:
        """Raw scores of the rollouts as generated: a truncated answer is scored truncated."""
        return torch.tensor(
            self.reward(prompts, batch.completion_text, finish_reason=batch.finish_reason)
        )

    def heldout(self, prompts, batch, scores_raw: torch.Tensor) -> dict[str, float]:
        """What the held-out RM says of these rollouts, each RM's scores in units of its own
        first step (the starting policy): ``heldout_rm_score`` (its mean), ``proxy_score``
        (the training score's mean in the same units) and ``rm_disagreement`` (mean absolute
        difference per sample: grows when the policy writes what the two RMs never learned)."""
        if self.heldout_scorer is None:
            return {}
        held = torch.tensor(
            self.heldout_scorer(prompts, batch.completion_text, finish_reason=batch.finish_reason)
        )
        proxy = scores_raw.detach().cpu().float()
        for stats, values in ((self.heldout_stats, held), (self.proxy_stats, proxy)):
            if stats.count == 0:
                stats.update(self.gather(values).cpu())
        z_held = (held - self.heldout_stats.mean) / self.heldout_stats.std
        z_proxy = (proxy - self.proxy_stats.mean) / self.proxy_stats.std
        return {
            "heldout_rm_score": z_held.mean().item(),
            "proxy_score": z_proxy.mean().item(),
            "rm_disagreement": (z_proxy - z_held).abs().mean().item(),
        }

    def shape(self, raw: torch.Tensor, finish_reason: list[str]) -> torch.Tensor:
        """Normalise (fixed or running statistics), clip, then subtract the missing-EOS penalty."""
        cfg, stats = self.cfg, self.score_stats
        if cfg.normalize_scores == "running" or (
            cfg.normalize_scores == "fixed" and stats.count == 0
        ):
            stats.update(self.gather(raw).cpu())  # every rank's scores: one normalisation
        scores = raw if cfg.normalize_scores == "none" else (raw - stats.mean) / stats.std
        if cfg.score_clip is not None:
            scores = scores.clamp(-cfg.score_clip, cfg.score_clip)
        cut = torch.tensor([r == "length" for r in finish_reason], dtype=scores.dtype)
        return scores - cfg.eos_penalty * cut.to(scores.device)

    def state_dict(self) -> dict[str, dict]:
        return {
            "score_stats": vars(self.score_stats),
            "heldout_stats": vars(self.heldout_stats),
            "proxy_stats": vars(self.proxy_stats),
        }

    def load_state_dict(self, state: dict) -> None:
        vars(self.score_stats).update(state["score_stats"])
        vars(self.heldout_stats).update(state.get("heldout_stats", {}))
        vars(self.proxy_stats).update(state.get("proxy_stats", {}))
