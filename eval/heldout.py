"""Held-out evaluation of a policy stage: one function every policy stage calls after training.

:func:`evaluate_policy` samples the policy and its reference on the same held-out prompts with
the same seed (``top_k=0, top_p=1``: the models' own distributions), scores both sets of
samples, and estimates ``KL(policy || reference)`` from the policy's samples: per sequence, the
sum over its completion tokens of ``log p_policy - log p_reference``, both from a fresh forward
pass (:func:`~alignkit.eval.logprobs.sequence_logprobs`). The metric names go into
``stage.json`` as they are.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from alignkit.config import HeldoutSpec
from alignkit.data.prompts import load_prompts
from alignkit.eval.logprobs import sequence_logprobs
from alignkit.eval.stats import bootstrap_mean_ci
from alignkit.handoff import AdapterView
from alignkit.rewards.gold import gold_reward
from alignkit.rewards.registry import resolve_rewards
from alignkit.rollouts import make_engine

RewardFn = Callable[..., list[float]]


def evaluate_policy(
    policy: AdapterView,
    reference: AdapterView,
    tokenizer,
    spec: HeldoutSpec,
    default_prompts: str | None = None,
    has_gold: bool = False,
    reward: RewardFn | None = None,
    batch_size: int = 64,
) -> dict[str, float]:
    """Sample ``policy`` and ``reference`` on held-out prompts; return the stage metrics.

    ``spec.prompts`` (else ``default_prompts``) names the prompts; with neither, or with
    ``spec.enabled`` false, nothing is evaluated and ``{}`` comes back. ``has_gold``: the
    prompts belong to the builtin task, so its gold reward applies. ``reward``: a reward
    function to use instead of resolving ``spec.rewards`` (a PPO stage hands over the reward
    adapter it already holds).

    Metrics: ``gold_reward``/``gold_reward_ref`` (with ``has_gold``), ``reward``/``reward_ref``
    (the weighted sum of ``spec.rewards``; the gold reward when none is configured),
    ``*_gain`` with ``*_gain_ci_low``/``*_gain_ci_high`` (policy minus reference, 95% bootstrap
    CI over prompts), ``kl_ref`` (mean nats per sequence), ``kl_ref_per_token``, ``response_length``
    and ``eos_rate`` (with ``_ref`` twins for the reference), ``heldout_prompts``.
    """
    source = spec.prompts or default_prompts
    if not spec.enabled or source is None:
        return {}
    rows = load_prompts(source, spec.split).rows[: spec.num_prompts]
    prompts = [r["prompt"] for r in rows]
    policy_batch = sample(policy, tokenizer, prompts, spec, batch_size)
    reference_batch = sample(reference, tokenizer, prompts, spec, batch_size)

    prompt_ids = policy_batch.sample_prompt_ids()
    args = dict(temperature=spec.temperature, batch_size=max(1, batch_size // 4))
    logp_policy = sequence_logprobs(policy, prompt_ids, policy_batch.completion_ids, **args)
    logp_reference = sequence_logprobs(reference, prompt_ids, policy_batch.completion_ids, **args)
    kl = np.array([float((p - r).sum()) for p, r in zip(logp_policy, logp_reference, strict=True)])
    tokens = np.array([len(c) for c in policy_batch.completion_ids])

    metrics = {
        "heldout_prompts": float(len(rows)),
        "kl_ref": float(kl.mean()),
        "kl_ref_per_token": float(kl.sum() / max(tokens.sum(), 1)),
    }
    for suffix, batch in (("", policy_batch), ("_ref", reference_batch)):
        metrics["response_length" + suffix] = float(np.mean([len(c) for c in batch.completion_ids]))
        metrics["eos_rate" + suffix] = float(np.mean([r == "stop" for r in batch.finish_reason]))

    rewards: dict[str, RewardFn] = {}
    if has_gold:
        rewards["gold_reward"] = gold_reward
    if reward is None and spec.rewards:
        reward = resolve_rewards(spec.rewards)
    if reward is not None or has_gold:
        rewards["reward"] = reward or rewards["gold_reward"]
    per_sample = [r for r in rows for _ in range(spec.samples_per_prompt)]
    for name, fn in rewards.items():
        ours = _score(fn, per_sample, policy_batch).reshape(len(rows), -1).mean(axis=1)
        theirs = _score(fn, per_sample, reference_batch).reshape(len(rows), -1).mean(axis=1)
        low, high = bootstrap_mean_ci(ours - theirs, seed=spec.seed)
        metrics.update(
            {
                name: float(np.mean(ours)),
                f"{name}_ref": float(np.mean(theirs)),
                f"{name}_gain": float(np.mean(ours - theirs)),
                f"{name}_gain_ci_low": low,
                f"{name}_gain_ci_high": high,
            }
        )
    return metrics


def sample(view: AdapterView, tokenizer, prompts: list, spec: HeldoutSpec, batch_size: int = 64):
    """``spec.samples_per_prompt`` samples per prompt from ``view`` (a RolloutBatch)."""
    with view.active() as model:
        engine = make_engine("hf", model=model, tokenizer=tokenizer, batch_size=batch_size)
        return engine.generate(prompts, spec.sampling)


def _score(fn: RewardFn, rows: list[dict], batch) -> np.ndarray:
    values = fn(
        prompts=[r["prompt"] for r in rows],
        completions=batch.completion_text,
        completion_ids=batch.completion_ids,
        finish_reason=batch.finish_reason,
        reference=[r["reference"] for r in rows],
        prompt_id=[r["id"] for r in rows],
    )
    return np.array([0.0 if v is None else float(v) for v in values])  # None counts 0, as in a sum
