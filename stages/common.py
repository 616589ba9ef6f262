"""Steps several stages share that need more than the core (the core imports no other area)."""

from __future__ import annotations

import importlib.util
from typing import Literal

from pydantic import Field

from alignkit.config import Strict
from alignkit.errors import UserError


class RolloutSpec(Strict):
    """Where an online-RL stage's rollouts come from."""

    engine: Literal["hf", "vllm"] = "hf"
    """``hf``: transformers ``generate`` (any device). ``vllm``: a vLLM engine on the same GPU as
    training (the ``vllm`` extra, CUDA only)."""
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1)
    """vLLM's share of the GPU (weights + KV cache); the rest is left to training."""
    tensor_parallel_size: int = Field(1, ge=1)


def check_vllm(where: str) -> None:
    """Fail before any model loads: rollouts on vLLM need the extra and a CUDA GPU."""
    import torch

    if importlib.util.find_spec("vllm") is None:
        raise UserError(
            f"{where}.rollout.engine: vllm is not installed; install the extra "
            "(pip install 'alignkit[vllm]', CUDA only) or use engine: hf"
        )
    if not torch.cuda.is_available():
        raise UserError(f"{where}.rollout.engine: vllm needs a CUDA GPU; use engine: hf on CPU")


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
