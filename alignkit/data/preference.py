"""Preference data: detect each row's format and normalize it to TRL's conversational pairs.

Formats (detected on every row, so one file may mix them):

- ``explicit``: ``{"prompt": str, "chosen": str, "rejected": str}`` (``builtin:preference``)
- ``conversational`` (TRL): ``prompt`` a message list, ``chosen``/``rejected`` the completion
  messages only (a string prompt or string completions are accepted beside message lists)
- ``implicit``: only ``chosen``/``rejected``, two full conversations sharing the prompt turns
- ``hh_rlhf``: ``chosen``/``rejected`` transcripts ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``
  that share every turn but the last assistant reply
- ``ultrafeedback`` (binarized): ``prompt`` plus ``chosen``/``rejected`` full conversations
  that start with the prompt turn, and optional ``score_chosen``/``score_rejected``

A normalized row is ``{"prompt": [messages], "chosen": [messages], "rejected": [messages],
"margin": float | None}``: the prompt ends with a user turn, chosen/rejected start with an
assistant turn. ``margin`` comes from a ``margin`` column, else ``score_chosen -
score_rejected``. As in ``sft.py``, keys whose value is null count as absent.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from alignkit.data.sft import check_trainable, parse_messages
from alignkit.data.sources import (
    BadRowPolicy,
    RowError,
    kind_of,
    load_checked,
)

if TYPE_CHECKING:
    import datasets

__all__ = [
    "IdenticalPairError",
    "PreferenceData",
    "load_preference",
    "normalize_preference_row",
    "prompt_messages",
    "to_trl_dataset",
]

# A turn marker opens the transcript or follows a blank line; text after "\n\n" without a
# marker continues the previous turn (as in Anthropic's HH-RLHF files).
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


class IdenticalPairError(RowError):
    """A pair whose chosen and rejected are the same: it teaches nothing (``data clean``
    counts these under their own rule)."""


@dataclass
class PreferenceData:
    """Normalized preference pairs plus what loading found: formats seen and skipped bad rows."""

    rows: list[dict]
    formats: Counter
    problems: list[tuple[str, str]]
    total: int
    fields: list[dict] = field(default_factory=list)
    """Raw values of the ``keep_fields`` asked for, one dict per row."""


def load_preference(
    source: str,
    split: str | None = None,
    on_bad_rows: BadRowPolicy = "error",
    max_bad_fraction: float = 0.05,
    keep_fields: tuple[str, ...] = (),
) -> PreferenceData:
    """Load and normalize preference pairs from any source; raises DataError for unusable data."""
    result = load_checked(
        source, split, normalize_preference_row, on_bad_rows, max_bad_fraction, keep_fields
    )
    return PreferenceData(result.rows, result.formats, result.problems, result.total, result.fields)


def to_trl_dataset(data: PreferenceData) -> datasets.Dataset:
    """TRL's conversational preference columns ``prompt``/``chosen``/``rejected`` (message
    lists), plus ``margin`` only when every row has one (a partial column would be nulls)."""
    import datasets  # datasets (~1 s): only when a Dataset is built; checking data needs none

    columns = {name: [row[name] for row in data.rows] for name in ("prompt", "chosen", "rejected")}
    if data.rows and all(row["margin"] is not None for row in data.rows):
        columns["margin"] = [row["margin"] for row in data.rows]
    return datasets.Dataset.from_dict(columns)


def normalize_preference_row(data: dict) -> tuple[str, dict]:
    """Return ``(format_name, normalized_row)``; raises RowError saying what is wrong."""
    fields = {key: value for key, value in data.items() if value is not None}
    for side in ("chosen", "rejected"):
        if side not in fields:
            raise RowError(
                f"missing '{side}' (a preference row needs chosen and rejected); "
                f"got keys {sorted(data)}"
            )
        value = fields[side]
        if not isinstance(value, str | list):
            raise RowError(f"'{side}' must be a string or a message list, got {kind_of(value)}")
        if not (value.strip() if isinstance(value, str) else value):
            raise RowError(f"empty '{side}'")
    chosen, rejected = fields["chosen"], fields["rejected"]
    if type(chosen) is not type(rejected):
        raise RowError(
            f"'chosen' is {kind_of(chosen)} but 'rejected' is {kind_of(rejected)}; "
            "give both as strings or both as message lists"
        )
    margin = _margin(fields)
    if "prompt" in fields:
        fmt, pair = _with_prompt(fields["prompt"], chosen, rejected)
    elif isinstance(chosen, str):
        fmt, pair = "hh_rlhf", _hh_rlhf(chosen, rejected)
    else:
        fmt = "implicit"
        pair = _split_shared_prefix(
            parse_messages(chosen, "chosen"), parse_messages(rejected, "rejected")
        )
    prompt, chosen_messages, rejected_messages = pair
    if chosen_messages == rejected_messages:
        raise IdenticalPairError("chosen is identical to rejected")
    return fmt, {
        "prompt": prompt,
        "chosen": chosen_messages,
        "rejected": rejected_messages,
        "margin": margin,
    }


def prompt_messages(value: object, field: str = "prompt") -> list[dict]:
    """A prompt as messages: a string becomes one user turn; a list must end with a user turn."""
    if isinstance(value, str):
        if not value.strip():
            raise RowError(f"empty '{field}'")
        return [{"role": "user", "content": value}]
    messages = parse_messages(value, field)
    _check_prompt(messages, field)
    return messages


def _check_prompt(messages: list[dict], field: str) -> None:
    last = messages[-1]
    if last["role"] != "user":
        raise RowError(f"'{field}' must end with a user turn (its last role is {last['role']!r})")
    if not last["content"].strip():
        raise RowError(f"empty user turn at the end of '{field}'")


def _with_prompt(prompt: object, chosen: str | list, rejected: str | list) -> tuple[str, tuple]:
    if isinstance(chosen, str):  # rejected has the same type (checked by the caller)
        pair = (
            prompt_messages(prompt),
            [{"role": "assistant", "content": chosen}],
            [{"role": "assistant", "content": rejected}],
        )
        return ("explicit" if isinstance(prompt, str) else "conversational"), pair
    chosen_messages = parse_messages(chosen, "chosen")
    rejected_messages = parse_messages(rejected, "rejected")
    chosen_first, rejected_first = chosen_messages[0]["role"], rejected_messages[0]["role"]
    if (chosen_first == "assistant") != (rejected_first == "assistant"):
        raise RowError(
            f"'chosen' starts with role {chosen_first!r} but 'rejected' with {rejected_first!r}; "
            "give both as completions (assistant turns after the prompt) or both as full "
            "conversations"
        )
    if chosen_first == "assistant":  # completions only
        prompt_list = prompt_messages(prompt)
        for messages, side in ((chosen_messages, "chosen"), (rejected_messages, "rejected")):
            check_trainable(messages, side)
        return "conversational", (prompt_list, chosen_messages, rejected_messages)
    # Full conversations beside the prompt (UltraFeedback): strip the shared turns, which
    # must be the prompt.
    pair = _split_shared_prefix(chosen_messages, rejected_messages)
    _check_prompt_matches(prompt, pair[0])
    return "ultrafeedback", pair


def _check_prompt_matches(prompt: object, shared: list[dict]) -> None:
    if isinstance(prompt, str):
        if prompt.strip() != shared[-1]["content"].strip():
            raise RowError(
                "'prompt' does not match the last user turn that chosen and rejected share "
                f"(turn {len(shared) - 1})"
            )
    elif prompt_messages(prompt) != shared:
        raise RowError("'prompt' does not match the turns that chosen and rejected share")


def _split_shared_prefix(chosen: list[dict], rejected: list[dict]) -> tuple[list, list, list]:
    """Prompt = the longest run of identical leading turns; the rest are the completions."""
    if chosen == rejected:
        raise IdenticalPairError("chosen is identical to rejected")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise RowError(
            "chosen and rejected share no prefix (without a 'prompt', both must start with "
            "the same prompt turns)"
        )
    for messages, side in ((chosen, "chosen"), (rejected, "rejected")):
        if len(messages) == n:
            raise RowError(f"'{side}' has nothing after the prompt turns it shares")
        if messages[n]["role"] != "assistant":
            raise RowError(
                f"chosen and rejected differ at turn {n}, a {messages[n]['role']} turn; they "
                "must share every turn before the first assistant reply that differs"
            )
        check_trainable(messages[n:], side, start=n)
    prompt = chosen[:n]
    _check_prompt(prompt, "prompt")
    return prompt, chosen[n:], rejected[n:]


def _hh_rlhf(chosen: str, rejected: str) -> tuple[list, list, list]:
    chosen_turns, rejected_turns = _transcript(chosen, "chosen"), _transcript(rejected, "rejected")
    prompt, chosen_tail, rejected_tail = _split_shared_prefix(chosen_turns, rejected_turns)
    for tail, side in ((chosen_tail, "chosen"), (rejected_tail, "rejected")):
        if len(tail) > 1:
            raise RowError(
                f"'{side}' differs from the other transcript before its final assistant turn "
                f"(at turn {len(prompt)}); HH-RLHF pairs may differ only in the last reply"
            )
    return prompt, chosen_tail, rejected_tail


def _transcript(text: str, field: str) -> list[dict]:
    """``"\\n\\nHuman: q\\n\\nAssistant: a"`` → ``[{user q}, {assistant a}]``."""
    parts = _HH_TURN.split(text.strip())
    if parts[0].strip():
        raise RowError(
            f"'{field}' is a string without a 'prompt' column and is not an HH-RLHF transcript "
            "(expected '\\n\\nHuman: ...\\n\\nAssistant: ...'); add a 'prompt' column"
        )
    turns = [
        {"role": _HH_ROLES[speaker], "content": content.strip()}
        for speaker, content in zip(parts[1::2], parts[2::2], strict=True)
    ]
    if not any(turn["role"] == "assistant" for turn in turns):
        raise RowError(f"no assistant turn in the '{field}' transcript")
    return turns


def _margin(fields: dict) -> float | None:
    if "margin" in fields:
        return _number(fields["margin"], "margin")
    scores = [fields.get(name) for name in ("score_chosen", "score_rejected")]
    if all(score is None for score in scores):
        return None
    if any(score is None for score in scores):
        raise RowError("score_chosen and score_rejected must be given together")
    return _number(scores[0], "score_chosen") - _number(scores[1], "score_rejected")


def _number(value: object, field: str) -> float:
    # CSV cells are always strings, so a numeric string counts as a number.
    try:
        number = float(value) if isinstance(value, int | float | str) else math.nan
    except ValueError:
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number):
        raise RowError(f"'{field}' is not a number (got {value!r})")
    return number
