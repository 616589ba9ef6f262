"""SFT data: detect each row's format and normalize it to chat messages or plain text.

Formats (detected on every row, so one file may mix them):

- ``messages`` (OpenAI): ``{"messages": [{"role", "content"}, ...]}``
- ``sharegpt``: ``{"conversations": [{"from": "human|gpt|system", "value"}, ...]}``
- ``alpaca``: ``{"instruction", "input" (optional), "output"}``
- ``prompt_completion``: ``{"prompt", "completion"}``, each a string or a message list
- ``text``: ``{"text"}``, a plain language-modelling row

A normalized row is ``{"messages": [{"role", "content"}, ...]}`` or ``{"text": str}``; extra
keys of the input are ignored. Keys whose value is null count as absent, because columnar
files (Parquet, Hub datasets) fill the columns of other formats with nulls.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from alignkit.data.sources import (
    BadRowPolicy,
    Normalized,
    RowError,
    kind_of,
    load_checked,
)
from alignkit.errors import DataError

if TYPE_CHECKING:
    import datasets

__all__ = ["RowError", "SFTData", "load_sft", "normalize_sft_row", "to_trl_dataset"]

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "system": "system",
}
EXPECTED_FIELDS = "messages, conversations, instruction/output, prompt/completion, text"


@dataclass
class SFTData:
    """Normalized SFT rows plus what loading found: formats seen and skipped bad rows."""

    rows: list[dict]
    formats: Counter
    problems: list[tuple[str, str]]
    total: int
    fields: list[dict] = field(default_factory=list)
    """Raw values of the ``keep_fields`` asked for, one dict per row."""

    @property
    def kind(self) -> str:
        """``"messages"`` or ``"text"``: the one column every row has."""
        return "text" if self.rows and "text" in self.rows[0] else "messages"


def load_sft(
    source: str,
    split: str | None = None,
    on_bad_rows: BadRowPolicy = "error",
    max_bad_fraction: float = 0.05,
    keep_fields: tuple[str, ...] = (),
) -> SFTData:
    """Load and normalize SFT rows from any source; raises DataError for unusable data."""
    result = load_checked(
        source, split, normalize_sft_row, on_bad_rows, max_bad_fraction, keep_fields
    )
    mixed = mixed_kinds_problem(result)
    if mixed is not None:
        raise DataError(f"{source}: {mixed}", [])
    return SFTData(result.rows, result.formats, result.problems, result.total, result.fields)


def to_trl_dataset(data: SFTData) -> datasets.Dataset:
    """A Dataset with the single column TRL's SFTTrainer reads: ``messages`` or ``text``."""
    import datasets  # datasets (~1 s): only when a Dataset is built; checking data needs none

    column = data.kind
    return datasets.Dataset.from_dict({column: [row[column] for row in data.rows]})


def mixed_kinds_problem(result: Normalized) -> str | None:
    """Why the rows cannot form one dataset (plain text mixed with chat), or None."""
    first: dict[str, str] = {}
    for row, where in zip(result.rows, result.wheres, strict=True):
        first.setdefault("text" if "text" in row else "messages", where)
    if len(first) < 2:
        return None
    return (
        f"mixes plain-text rows (e.g. {first['text']}) with conversation rows "
        f"(e.g. {first['messages']}); one dataset must be either all plain text or all "
        "conversations: split it into two datasets"
    )


def normalize_sft_row(data: dict) -> tuple[str, dict]:
    """Return ``(format_name, normalized_row)``; raises RowError saying what is wrong."""
    fields = {key: value for key, value in data.items() if value is not None}
    if "messages" in fields:
        return "messages", {"messages": _conversation(fields["messages"], "messages")}
    if "conversations" in fields:
        return "sharegpt", {"messages": _sharegpt(fields["conversations"])}
    if "instruction" in fields:
        return "alpaca", {"messages": _alpaca(fields)}
    if "prompt" in fields and "completion" in fields:
        return "prompt_completion", {"messages": _prompt_completion(fields)}
    if "text" in fields:
        text = fields["text"]
        if not isinstance(text, str):
            raise RowError(f"'text' must be a string, got {kind_of(text)}")
        if not text.strip():
            raise RowError("empty text")
        return "text", {"text": text}
    raise RowError(
        f"no recognized SFT fields (expected one of {EXPECTED_FIELDS}); "
        f"got keys {sorted(data)}" + _hint(fields)
    )


def _hint(fields: dict) -> str:
    if "chosen" in fields or "rejected" in fields:
        return "; this looks like preference data (chosen/rejected), not SFT data"
    if "prompt" in fields:
        return "; 'prompt' without 'completion' is prompt-only data, not SFT data"
    return ""


def parse_messages(value: object, field: str) -> list[dict]:
    """Check a message list's shape: a non-empty list of {role, content: str}; shared with the
    preference and prompt loaders, so ``field`` names where the list came from."""
    if not isinstance(value, list):
        raise RowError(f"'{field}' must be a list of messages, got {kind_of(value)}")
    if not value:
        raise RowError(f"empty conversation ('{field}' has no turns)")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise RowError(f"{field}[{i}] must be an object, got {kind_of(message)}")
        role, content = message.get("role"), message.get("content")
        if role is None:
            raise RowError(f"{field}[{i}] has no 'role'")
        if role not in ROLES:
            raise RowError(
                f"unknown role {role!r} in {field}[{i}] (expected system, user or assistant)"
            )
        if not isinstance(content, str):
            raise RowError(f"non-string content in {field}[{i}] (got {kind_of(content)})")
        messages.append({"role": role, "content": content})
    return messages


def check_trainable(messages: list[dict], field: str, start: int = 0) -> None:
    """A conversation a trainer can learn from: it ends with a non-empty assistant turn.
    ``start`` is the index of ``messages[0]`` in ``field`` (for a tail of a longer list)."""
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError(f"conversation without an assistant turn in '{field}'")
    last = messages[-1]["role"]
    if last != "assistant":
        raise RowError(f"last turn of '{field}' is not the assistant's (it is {last!r})")
    for i, message in enumerate(messages, start=start):
        if message["role"] == "assistant" and not message["content"].strip():
            raise RowError(f"empty assistant content in {field}[{i}]")


def _conversation(value: object, field: str) -> list[dict]:
    messages = parse_messages(value, field)
    check_trainable(messages, field)
    return messages


def _sharegpt(turns: object) -> list[dict]:
    if not isinstance(turns, list):
        raise RowError(f"'conversations' must be a list of turns, got {kind_of(turns)}")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RowError(f"conversations[{i}] must be an object, got {kind_of(turn)}")
        if "from" not in turn and "role" in turn:  # some exports use OpenAI keys here
            messages.append(turn)
            continue
        speaker, value = turn.get("from"), turn.get("value")
        if speaker is None:
            raise RowError(f"conversations[{i}] has no 'from'")
        role = SHAREGPT_ROLES.get(str(speaker).lower())
        if role is None:
            raise RowError(
                f"unknown speaker {speaker!r} in conversations[{i}] "
                f"(expected one of {', '.join(SHAREGPT_ROLES)})"
            )
        if not isinstance(value, str):
            raise RowError(f"non-string value in conversations[{i}] (got {kind_of(value)})")
        messages.append({"role": role, "content": value})
    return _conversation(messages, "conversations")


def _alpaca(fields: dict) -> list[dict]:
    instruction, extra = fields["instruction"], fields.get("input", "")
    if "output" not in fields:
        raise RowError("alpaca row has 'instruction' but no 'output'")
    output = fields["output"]
    for name, value in (("instruction", instruction), ("input", extra), ("output", output)):
        if not isinstance(value, str):
            raise RowError(f"non-string {name} (got {kind_of(value)})")
    if not instruction.strip():
        raise RowError("empty instruction")
    if not output.strip():
        raise RowError("empty output")
    user = instruction + ("\n\n" + extra if extra.strip() else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _prompt_completion(fields: dict) -> list[dict]:
    prompt, completion = fields["prompt"], fields["completion"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise RowError("empty prompt")
        prompt_messages = [{"role": "user", "content": prompt}]
    else:
        prompt_messages = parse_messages(prompt, "prompt")
    if isinstance(completion, str):
        if not completion.strip():
            raise RowError("empty completion")
        completion_messages = [{"role": "assistant", "content": completion}]
    else:
        completion_messages = _conversation(completion, "completion")
    return prompt_messages + completion_messages
