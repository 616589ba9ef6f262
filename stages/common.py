"""Steps several stages share that need more than the core (the core imports no other area)."""

from __future__ import annotations


def heldout_evaluation(cfg, ctx, policy, reference, tokenizer, reward=None) -> dict[str, float]:
    """Run the stage's held-out evaluation (``cfg.heldout``) on the main process.

    Builtin training data implies the builtin held-out prompts and its gold reward; other data
    is evaluated only when ``heldout.prompts`` names a prompt source.
    """
    from alignkit.eval.heldout import evaluate_policy

    if not ctx.is_main:
        return {}
    builtin = cfg.data.source.startswith("builtin:")
    ctx.console.print("held-out evaluation: sampling the policy and its reference ...")
    return evaluate_policy(
        policy,
        reference,
        tokenizer,
        cfg.heldout,
        default_prompts="builtin:prompts" if builtin else None,
        has_gold=builtin,
        reward=reward,
    )
