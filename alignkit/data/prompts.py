"""Prompt-only data for rollouts, online RL and evaluation: a prompt, an optional reference
answer and a stable id per row.

Accepted rows (detected per row): ``prompt`` (a string or a message list), ``messages`` (a
trailing assistant turn becomes the reference), ``instruction`` (+ ``input``), ShareGPT
``conversations``, and any preference row (its prompt; the chosen reply is the reference).
The reference is ``reference`` when given, else the row's own answer: the trailing assistant
turn, ``chosen``, ``completion``, ``output`` or ``answer``.

A normalized row is ``{"prompt": [messages], "reference": str | None, "id": str}``. ``id`` is
the row's ``id`` field, else a hash of the prompt messages, so a resumable job can key on it
across runs (identical prompts share a hashed id).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field

from alignkit.data.preference import normalize_preference_row, prompt_messages
from alignkit.data.sft import normalize_sft_row, parse_messages
from alignkit.data.sources import (
    BadRowPolicy,
    RowError,
    kind_of,
    load_checked,
)

__all__ = ["PromptData", "load_prompts", "normalize_prompt_row", "prompt_id"]

ANSWER_FIELDS = ("completion", "output", "answer", "solution")
QUESTION_FIELDS = ("question", "problem")  # plain-text prompts of QA/maths sets (GSM8K, MATH)
EXPECTED_FIELDS = "prompt, messages, instruction, question, problem, conversations, chosen/rejected"


@dataclass
class PromptData:
    """Normalized prompt rows plus what loading found: formats seen and skipped bad rows."""

    rows: list[dict]
    formats: Counter
    problems: list[tuple[str, str]]
    total: int
    fields: list[dict] = field(default_factory=list)
    """Raw values of the ``keep_fields`` asked for, one dict per row."""


def load_prompts(
    source: str,
    split: str | None = None,
    on_bad_rows: BadRowPolicy = "error",
    max_bad_fraction: float = 0.05,
    keep_fields: tuple[str, ...] = (),
) -> PromptData:
    """Load and normalize prompt rows from any source; raises DataError for unusable data."""
    result = load_checked(
        source, split, normalize_prompt_row, on_bad_rows, max_bad_fraction, keep_fields
    )
    return PromptData(result.rows, result.formats, result.problems, result.total, result.fields)


def normalize_prompt_row(data: dict) -> tuple[str, dict]:
    """Return ``(format_name, normalized_row)``; raises RowError saying what is wrong."""
    fields = {key: value for key, value in data.items() if value is not None}
    answer = None  # the row's own answer, when its format carries one
    if "chosen" in fields or "rejected" in fields:
        fmt, pair = "preference", normalize_preference_row(data)[1]
        prompt, answer = pair["prompt"], _last_reply(pair["chosen"])
    elif "messages" in fields or "conversations" in fields:
        fmt, prompt, answer = _conversation(fields)
    elif "prompt" in fields:
        fmt, prompt = "prompt", prompt_messages(fields["prompt"])
    elif "instruction" in fields:
        fmt, prompt = "instruction", [{"role": "user", "content": _instruction(fields)}]
    elif name := next((f for f in QUESTION_FIELDS if f in fields), None):
        fmt, prompt = name, prompt_messages(fields[name], name)
    else:
        raise RowError(
            f"no prompt fields (expected one of {EXPECTED_FIELDS}); got keys {sorted(data)}"
        )
    reference = _reference(fields, answer)
    return fmt, {"prompt": prompt, "reference": reference, "id": _row_id(fields, prompt)}


def prompt_id(prompt: list[dict]) -> str:
    """A stable id for a prompt: the first 16 hex digits of its messages' SHA-256."""
    canonical = json.dumps(prompt, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def _conversation(fields: dict) -> tuple[str, list[dict], str | None]:
    if "messages" in fields:
        fmt, messages = "messages", parse_messages(fields["messages"], "messages")
    else:  # ShareGPT goes through the SFT reader, which needs a reply to read the speakers
        fmt, messages = "sharegpt", normalize_sft_row(fields)[1]["messages"]
    answer = None
    if messages[-1]["role"] == "assistant":
        answer = messages[-1]["content"]
        messages = messages[:-1]
    if not messages:
        raise RowError("no prompt: the conversation holds only an assistant turn")
    return fmt, prompt_messages(messages, "messages"), answer


def _instruction(fields: dict) -> str:
    instruction, extra = fields["instruction"], fields.get("input", "")
    for name, value in (("instruction", instruction), ("input", extra)):
        if not isinstance(value, str):
            raise RowError(f"non-string {name} (got {kind_of(value)})")
    if not instruction.strip():
        raise RowError("empty instruction")
    return instruction + ("\n\n" + extra if extra.strip() else "")


def _reference(fields: dict, answer: str | None) -> str | None:
    if "reference" in fields:
        return _text(fields["reference"], "reference")
    if answer is not None:
        return answer or None
    for name in ANSWER_FIELDS:
        if name in fields:
            value = fields[name]
            if isinstance(value, list):  # a completion given as messages
                return _last_reply(parse_messages(value, name))
            return _text(value, name)
    return None


def _text(value: object, field: str) -> str | None:
    if not isinstance(value, str):
        raise RowError(f"'{field}' must be a string, got {kind_of(value)}")
    return value if value.strip() else None  # a blank CSV cell means no reference


def _last_reply(messages: list[dict]) -> str | None:
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    return replies[-1] if replies else None


def _row_id(fields: dict, prompt: list[dict]) -> str:
    value = fields.get("id", "")
    if value == "":  # absent, or a blank CSV cell
        return prompt_id(prompt)
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise RowError(f"'id' must be a string or an integer, got {kind_of(value)}")
    return str(value)
