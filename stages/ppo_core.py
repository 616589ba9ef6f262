"""The PPO algorithm's pure tensor functions (no models, no I/O), used by ``stages/ppo.py``.

Hand-written because TRL no longer ships PPO. Shapes: ``B`` sequences, ``T`` completion tokens
(right-padded); ``mask`` is 1 on a sequence's completion tokens up to and including its EOS.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_mean((x - mean) ** 2, mask)
    return var * n / (n - 1).clamp(min=1)  # unbiased, as a sample estimate


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    all_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``x`` scaled to unit variance (and zero mean unless ``shift_mean`` is false) over the
    masked entries. ``all_sum`` sums a tensor over data-parallel ranks: the statistics are then
    those of every rank's batch together, as one process with the union batch would compute."""
    if all_sum is None:
        mean, var = masked_mean(x, mask), masked_var(x, mask)
    else:
        totals = all_sum(torch.stack([(x * mask).sum(), mask.sum()]))
        mean, n = totals[0] / totals[1].clamp(min=1), totals[1]
        var = all_sum(((x - mean) ** 2 * mask).sum()) / (n - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL(policy || ref) from the policy's samples: k1 = log r (unbiased, noisy),
    k3 = (r_ref - 1) - log r_ref (unbiased, never negative), with r_ref = p_ref / p."""
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r} (k1 or k3)")


def token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """[B, T] rewards: −kl_coef·KL on every completion token, plus the score on the last one."""
    rewards = -kl_coef * kl * mask
    last = mask.sum(1).long().clamp(min=1) - 1
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over completion tokens; returns (advantages, returns),
    both [B, T] and zero outside ``mask``."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    T = rewards.shape[1]
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = delta + gamma * lam * last_gae * (mask[:, t + 1] if t + 1 < T else 0)
        advantages[:, t] = last_gae
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


@dataclass
class Experience:
    """One step's rollouts, scored and ready for the update (on this rank). ``B`` sequences,
    prompts left-padded to ``P`` tokens, completions right-padded to ``T``."""

    ids: torch.Tensor  # [B, P+T]
    attn: torch.Tensor  # [B, P+T]
    pos: torch.Tensor  # [B, P+T] position ids (left padding taken into account)
    cmask: torch.Tensor  # [B, T] 1 on completion tokens up to and including EOS
    P: int
    old_logp: torch.Tensor  # [B, T] the sampling policy's log-probs
    values: torch.Tensor  # [B, T] the value head before the update
    advantages: torch.Tensor  # [B, T] whitened GAE advantages
    returns: torch.Tensor  # [B, T]
    scores: torch.Tensor  # [B] shaped scores (normalised, clipped, EOS penalty)
    stats: dict[str, float]
    gen_seconds: float

    def rows(self, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``ids, attn, pos, cmask, old_logp, values, advantages, returns`` of sequences idx,
        cut after the longest of their completions: the columns dropped are padding of every
        row (masked out of each loss, and never attended to by an earlier position), so the
        update's forwards skip them. Completions vary in length (the quickstart's: ~17 tokens
        on average, padded to the step's longest)."""
        T = max(1, int(self.cmask[idx].sum(1).max()))
        whole = (self.ids, self.attn, self.pos)
        per_token = (self.cmask, self.old_logp, self.values, self.advantages, self.returns)
        return (*(t[idx, : self.P + T] for t in whole), *(t[idx, :T] for t in per_token))


@dataclass
class PolicyLoss:
    loss: torch.Tensor
    clip_fraction: torch.Tensor
    approx_kl: torch.Tensor


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
) -> PolicyLoss:
    """Clipped surrogate objective (to minimise)."""
    log_ratio = (logp - old_logp) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(0.5 * log_ratio**2, mask)
    return PolicyLoss(loss, clip_fraction, approx_kl)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss 0.5·max((v−R)², (clip(v)−R)²); returns (loss, clip fraction)."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)
    return loss, masked_mean((loss_clipped > loss_unclipped).float(), mask).detach()


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``log p(token)`` under ``logits`` [B, T, V] for ``tokens`` [B, T]: the logit minus the
    log-sum-exp, so no [B, T, V] log-softmax is kept for the backward (equal to
    ``log_softmax(logits).gather(tokens)`` to float rounding)."""
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy [B, T] of ``logits`` [B, T, V]. Without gradients (the default PPO
    config, ``entropy_coef: 0``, logs it only) one sequence at a time, so the [B, T, V]
    temporaries never exist at once beside the activations the backward still needs."""
    if torch.is_grad_enabled() and logits.requires_grad:
        return _entropy(logits)
    return torch.cat([_entropy(row) for row in logits.split(1)])


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    var_returns = masked_var(returns, mask)
    if var_returns.item() == 0:
        return float("nan")
    return float(1 - masked_var(returns - values, mask) / var_returns)


class AdaptiveKLController:
    """Ziegler et al.'s proportional controller, with the target as a budget: move the KL
    coefficient so the observed KL approaches ``target``, ``overshoot_gain`` times faster when
    KL is above it than below. ``horizon`` is in samples; a horizon of about ten steps' worth of
    samples responds within a short run (the classic 10 000 barely moves at 64 per step).

    Why asymmetric: a symmetric controller that holds its target leaves the policy's KL above
    the target about half the time (measured on the builtin task, target 3: held-out KL 2.95,
    3.07, 3.26 on three seeds). Spending more KL than budgeted is what reward hacking does, so
    overshoots are corrected quickly while the coefficient is given back slowly."""

    def __init__(self, init: float, target: float, horizon: int, overshoot_gain: float = 4.0):
        self.value, self.target, self.horizon = init, target, horizon
        self.overshoot_gain = overshoot_gain

    def update(self, current_kl: float, n_samples: int) -> None:
        if not math.isfinite(current_kl):
            return
        error = max(-0.2, min(0.2, current_kl / self.target - 1))
        gain = self.overshoot_gain if error > 0 else 1.0
        self.value *= 1 + error * gain * n_samples / self.horizon
