"""alignkit.rollouts: generation engines behind one contract, rollout jobs, best-of-n.

``engine.generate(prompts, SamplingSpec) -> RolloutBatch`` (:mod:`.types`). Engines: ``hf``
(:mod:`.hf`, any device, the reference) and ``vllm`` (:mod:`.vllm`, CUDA, the ``vllm`` extra).
"""

from __future__ import annotations

import difflib
import typing
from typing import TYPE_CHECKING

from alignkit.errors import UserError
from alignkit.rollouts.source import ModelSource, model_source
from alignkit.rollouts.types import (
    Engine,
    EngineName,
    RolloutBatch,
    SamplingConfig,
    SamplingSpec,
    encode_prompts,
)

if TYPE_CHECKING:
    from alignkit.rollouts.vllm import VLLMConfig

ENGINES: tuple[str, ...] = typing.get_args(EngineName)

__all__ = [
    "ENGINES",
    "Engine",
    "EngineName",
    "ModelSource",
    "RolloutBatch",
    "SamplingConfig",
    "SamplingSpec",
    "encode_prompts",
    "load_engine",
    "make_engine",
    "model_source",
]


def make_engine(
    name: EngineName,
    source: ModelSource | None = None,
    *,
    model=None,
    tokenizer=None,
    batch_size: int = 64,
    vllm: VLLMConfig | None = None,
) -> Engine:
    """The one way to build a rollout engine. ``hf`` samples ``model`` with ``tokenizer`` as
    it is (a live policy, an adapter view) or else loads ``source``; ``batch_size``: sequences
    per forward. ``vllm`` serves ``source`` with ``vllm`` settings (defaults when None)."""
    if name == "hf":
        from alignkit.rollouts.hf import HFEngine  # torch and transformers: not at CLI start

        if model is not None:
            return HFEngine(model, tokenizer, batch_size=batch_size)
        return HFEngine.from_source(source, batch_size=batch_size)
    if name == "vllm":
        from alignkit.rollouts.vllm import VLLMEngine  # the optional extra: only when asked for

        if source is None:
            raise ValueError("the vllm engine serves a ModelSource, not a loaded model")
        return VLLMEngine(source, vllm)
    close = difflib.get_close_matches(name, ENGINES, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UserError(f"--engine {name!r}: unknown engine{hint}; engines: {', '.join(ENGINES)}")


#: The name bench scripts and older callers know :func:`make_engine` by.
load_engine = make_engine
