"""PPO's passes over one batch of experience: the no-grad forwards that price the samples
(sampling policy, reference, value) and the update's backward, a micro-batch at a time.

Memory is what shapes these: only the completion positions' logits are made (the LM head never
sees the prompt), log-probs are the logit minus its log-sum-exp (no [B, T, V] log-softmax kept
for the backward), and the update back-propagates the policy and the value in separate passes,
so one pass's activations are held at a time, as in an SFT step (``bench/ppo_memory.py``)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch

from alignkit.stages import ppo_core as core
from alignkit.stages.ppo_model import POLICY, REFERENCE, VALUE, PPOModel

FiniteCheck = Callable[[str, torch.Tensor], None]


def scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits at the sampling temperature (the rollouts' own), in fp32."""
    logits = logits.float()
    return logits if temperature == 1.0 else logits / temperature


@torch.no_grad()
def price(model: PPOModel, ids, attn, pos, P: int, temperature: float):
    """The sampling policy's and the reference's log-probs of the completions and the values
    before the update, each [B, T]."""
    model.eval()
    old_logp = logprobs(model, ids, attn, pos, P, temperature)
    with model.role(REFERENCE):
        ref_logp = logprobs(model, ids, attn, pos, P, temperature)
    return old_logp, ref_logp, model(ids, attn, pos, P, VALUE)  # the inner module: no DDP hooks


def logprobs(model: PPOModel, ids, attn, pos, P: int, temperature: float) -> torch.Tensor:
    """The active adapter's log-probs of the completion tokens, [B, T]."""
    logits = scaled(model.completion_logits(ids, attn, pos, P), temperature)
    return core.token_logprobs(logits, ids[:, P:])


def backward(
    acc, wrapped, cfg, exp: core.Experience, idx, weight: float, sync: bool, check: FiniteCheck
) -> dict[str, float]:
    """PPO's loss on sequences ``idx``, scaled by ``weight``, back-propagated in two passes: the
    policy's (clipped surrogate − entropy bonus), then the value's. They share no trainable
    parameter, so this gives the gradients of their sum. Across ranks the policy pass never
    synchronises; the value pass of a minibatch's last micro-batch (``sync``) averages every
    gradient (DDP, built with ``find_unused_parameters``, carries those accumulated under
    ``no_sync`` into that reduction). Returns the loss parts, detached, for the logs."""
    ids, attn, pos, cmask, old_logp, old_values, advantages, returns = exp.rows(idx)
    with acc.no_sync(wrapped):
        logits = scaled(wrapped(ids, attn, pos, exp.P, POLICY), cfg.temperature)
        logp = core.token_logprobs(logits, ids[:, exp.P :])
        pl = core.policy_loss(logp, old_logp, advantages, cmask, cfg.clip_range)
        with nullcontext() if cfg.entropy_coef else torch.no_grad():  # else logged only
            entropy = core.masked_mean(core.entropy_from_logits(logits), cmask)
        check("policy loss", pl.loss)
        acc.backward((pl.loss - cfg.entropy_coef * entropy) * weight)
        del logits, logp
    with nullcontext() if sync else acc.no_sync(wrapped):
        values = wrapped(ids, attn, pos, exp.P, VALUE)
        vl, vclip = core.value_loss(values, old_values, returns, cmask, cfg.value_clip_range)
        check("value loss", vl)
        acc.backward(cfg.vf_coef * vl * weight)
    parts = {"policy_loss": pl.loss, "clip_fraction": pl.clip_fraction,
             "approx_kl": pl.approx_kl, "entropy": entropy, "value_loss": vl,
             "value_clip_fraction": vclip}  # fmt: skip
    return {k: float(torch.as_tensor(v).detach()) for k, v in parts.items()}
