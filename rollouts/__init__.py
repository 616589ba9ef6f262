"""alignkit.rollouts: generation engines behind one contract, rollout jobs, best-of-n.

``engine.generate(prompts, SamplingConfig) -> RolloutBatch`` (:mod:`.types`). Engines: ``hf``
(:mod:`.hf`, any device, the reference) and ``vllm`` (:mod:`.vllm`, CUDA, the ``vllm`` extra).
"""

from __future__ import annotations

import difflib
import typing

from alignkit.errors import UserError
from alignkit.rollouts.source import ModelSource, model_source
from alignkit.rollouts.types import (
    Engine,
    EngineName,
    RolloutBatch,
    SamplingConfig,
    encode_prompts,
)

ENGINES: tuple[str, ...] = typing.get_args(EngineName)

__all__ = [
    "ENGINES",
    "Engine",
    "EngineName",
    "ModelSource",
    "RolloutBatch",
    "SamplingConfig",
    "encode_prompts",
    "load_engine",
    "model_source",
]


def load_engine(name: str, source: ModelSource, batch_size: int = 64, vllm=None) -> Engine:
    """Build engine ``name`` on ``source``. ``batch_size``: sequences per HF forward;
    ``vllm``: a :class:`~alignkit.rollouts.vllm.VLLMConfig` for the vLLM engine."""
    if name == "hf":
        from alignkit.rollouts.hf import HFEngine

        return HFEngine.from_source(source, batch_size=batch_size)
    if name == "vllm":
        from alignkit.rollouts.vllm import VLLMEngine

        return VLLMEngine.from_source(source, vllm)
    close = difflib.get_close_matches(name, ENGINES, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UserError(f"--engine {name!r}: unknown engine{hint}; engines: {', '.join(ENGINES)}")
