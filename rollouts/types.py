"""The rollout contract: ``engine.generate(prompts, SamplingConfig) -> RolloutBatch``.

Prompts are message lists (rendered once, here, with the tokenizer's chat template and
``add_generation_prompt=True``) or token ids (used as given). Engines only ever see token ids:
a rendered string that an engine tokenizes again would get a second BOS / template prefix.

Ordering: ``RolloutBatch`` is prompt-major. Sample ``j`` of prompt ``i`` sits at index
``i * n + j`` of every per-sample list; per-prompt lists (``prompt_ids``, ``prompt_text``) have
one entry per prompt, in the order the prompts were given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from alignkit.config import SamplingSpec
from alignkit.errors import UserError

Messages = list[dict]
Prompt = Messages | list[int]
FinishReason = Literal["stop", "length"]
#: The rollout engines, named once: every config that picks one takes this type.
EngineName = Literal["hf", "vllm"]


#: The engines' sampling settings: the one :class:`~alignkit.config.SamplingSpec` (the core
#: defines it so that its held-out and health blocks can hand it out too).
SamplingConfig = SamplingSpec


@dataclass
class RolloutBatch:
    """Completions for a list of prompts; ``n`` samples per prompt, prompt-major (see module doc).

    ``completion_ids`` end with the stop token (EOS or a stop id) when ``finish_reason`` is
    ``"stop"`` because of a token; ``completion_text`` never contains EOS or a stop string.
    ``logprobs[k][t]`` belongs to ``completion_ids[k][t]``.
    """

    prompt_ids: list[list[int]]
    prompt_text: list[str]
    completion_ids: list[list[int]]
    completion_text: list[str]
    finish_reason: list[FinishReason]
    n: int
    logprobs: list[list[float]] | None = None

    def __post_init__(self) -> None:
        expected = len(self.prompt_ids) * self.n
        for name in ("completion_ids", "completion_text", "finish_reason"):
            if len(getattr(self, name)) != expected:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries, not {expected}")

    def __len__(self) -> int:
        return len(self.completion_ids)

    def prompt_index(self, k: int) -> int:
        """The prompt that sample ``k`` answers."""
        return k // self.n

    def sample_prompt_ids(self) -> list[list[int]]:
        """``prompt_ids`` repeated per sample, aligned with ``completion_ids``."""
        return [ids for ids in self.prompt_ids for _ in range(self.n)]


class Engine(Protocol):
    """A generation engine (``hf``, ``vllm``)."""

    tokenizer: object

    def generate(self, prompts: Sequence[Prompt], cfg: SamplingConfig) -> RolloutBatch: ...


def encode_prompts(tokenizer, prompts: Sequence[Prompt]) -> list[list[int]]:
    """Token ids for each prompt: message lists through the chat template (once), ids as given."""
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, list | tuple) and p and all(isinstance(t, int) for t in p):
            out.append([int(t) for t in p])
        elif isinstance(p, list | tuple) and p and all(isinstance(m, dict) for m in p):
            out.append(render_messages(tokenizer, list(p)))
        else:
            raise UserError(
                f"prompt {i}: expected a message list ([{{'role': 'user', 'content': ...}}]) or "
                f"token ids, got {type(p).__name__}{' (empty)' if not p else ''}; wrap a plain "
                "string as a user message"
            )
    return out


def render_messages(tokenizer, messages: Messages) -> list[int]:
    """The chat template applied once, ending with the assistant generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"tokenizer {tokenizer.name_or_path!r} has no chat template: give prompts as token "
            "ids, or use a model (or stage) whose tokenizer has one"
        )
    # tokenize=True renders and tokenizes without adding special tokens a second time.
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    return [int(t) for t in ids]
