"""Train/eval rows from a :class:`DataSpec`, shared by every stage that reads a dataset: load,
clean (``data.clean``), split off held-out rows (stratified and grouped when asked), then drop
training rows that leak held-out text."""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignkit.config import CleanSpec, DataSpec
from alignkit.data.clean import (
    CleanReport,
    clean_rows,
    decontaminate,
    decontaminator,
    eval_source,
    token_counter,
    word_count,
)
from alignkit.data.prompts import prompt_id
from alignkit.data.quality import turns
from alignkit.errors import UserError

logger = logging.getLogger(__name__)

# (source, split, on_bad_rows, max_bad_fraction, keep_fields=()) -> object with .rows (.fields)
Loader = Callable[..., Any]
GROUP_BY_PROMPT = "prompt"
CLEAN_REPORT = "data_clean.json"


@dataclass
class DataContext:
    """What cleaning needs from the stage that loads the data."""

    where: str = "data"
    """Config path of the data block, for messages."""
    heldout: list[tuple[str, str | None]] = field(default_factory=list)
    """Prompt sources the stage evaluates on: training rows must not contain them."""
    report_dir: Path | None = None
    """Where ``data_clean.json`` goes (the main process only)."""
    tokenizer: Callable[[], Any] | None = None
    """Builds the tokenizer when ``clean.length_unit`` is ``tokens``."""


def train_eval_rows(
    spec: DataSpec, load: Loader, seed: int, context: DataContext | None = None
) -> tuple[list[dict], list[dict]]:
    """Load and validate the training rows and the held-out rows a spec names.

    Held-out rows come from ``eval_source`` (or ``eval_split`` of the same source); without
    either, ``eval_size`` rows are split off the shuffled training rows (seeded), by
    ``stratify_by``/``group_by`` when set. Every row of both sets is validated before any
    training starts. With ``clean``, both sets are cleaned, then training rows that share text
    with the held-out rows or the stage's held-out prompts are dropped.
    """
    context = context or DataContext()
    wanted = tuple(
        dict.fromkeys(f for f in (spec.stratify_by, spec.group_by) if f and f != GROUP_BY_PROMPT)
    )
    extra = {"keep_fields": wanted} if wanted else {}
    data = load(spec.source, spec.split, spec.on_bad_rows, spec.max_bad_fraction, **extra)
    train, fields = list(data.rows), list(data.fields) if wanted else [{} for _ in data.rows]
    cleaning = _Cleaning(spec.clean, spec.source, context) if spec.clean else None
    if cleaning:
        train, fields = cleaning.rows(train, fields, "train")
    if spec.eval_source is not None or spec.eval_split is not None:
        source = spec.eval_source or spec.source
        held = list(load(source, spec.eval_split, spec.on_bad_rows, spec.max_bad_fraction).rows)
        if cleaning:
            held, _ = cleaning.rows(held, [{} for _ in held], "eval")
    elif spec.stratify_by is not None or spec.group_by is not None:
        strata = _values(fields, spec.stratify_by, context.where, "stratify_by")
        groups = (
            [_prompt_key(r) for r in train]
            if spec.group_by == GROUP_BY_PROMPT
            else _values(fields, spec.group_by, context.where, "group_by")
        )
        is_eval = stratified_split(len(train), spec.eval_size, seed, strata, groups)
        held = [r for r, e in zip(train, is_eval, strict=True) if e]
        train = [r for r, e in zip(train, is_eval, strict=True) if not e]
        rng = random.Random(seed)  # as the plain split: max_rows/max_eval_rows take a random part
        rng.shuffle(train)
        rng.shuffle(held)
    else:
        rng = random.Random(seed)
        rng.shuffle(train)
        n = _eval_count(len(train), spec.eval_size)
        held, train = train[:n], train[n:]
    if cleaning:
        train = cleaning.decontaminate(train, held)
    if spec.max_rows is not None:
        train = train[: spec.max_rows]
    if spec.max_eval_rows is not None:
        held = held[: spec.max_eval_rows]
    return train, held


def training_rows(spec: DataSpec, load: Loader, context: DataContext | None = None) -> list[dict]:
    """Every row as a training row (online RL prompts: nothing is split off), cleaned with
    ``clean`` (decontaminated against the stage's held-out prompts) and capped by ``max_rows``."""
    context = context or DataContext()
    for key in ("stratify_by", "group_by"):
        if getattr(spec, key) is not None:
            raise UserError(f"{context.where}.{key}: this stage splits no held-out rows off")
    rows = list(load(spec.source, spec.split, spec.on_bad_rows, spec.max_bad_fraction).rows)
    if spec.clean:
        cleaning = _Cleaning(spec.clean, spec.source, context)
        rows, _ = cleaning.rows(rows, [{} for _ in rows], "train")
        rows = cleaning.decontaminate(rows, [])
    return rows if spec.max_rows is None else rows[: spec.max_rows]


def _eval_count(total: int, eval_size: int | float) -> int:
    n = eval_size if isinstance(eval_size, int) else round(total * eval_size)
    return max(0, min(n, total - 1))


def _values(fields: list[dict], name: str | None, where: str, key: str) -> list[str] | None:
    if name is None:
        return None
    missing = [i for i, f in enumerate(fields) if f.get(name) in (None, "")]
    if missing:
        raise UserError(
            f"{where}.{key}: {len(missing)} of {len(fields)} rows have no {name!r} field (first: "
            f"row {missing[0]}); give every row one, or stratify by another field"
        )
    return [
        v if isinstance(v, str) else json.dumps(v, sort_keys=True)
        for v in (f[name] for f in fields)
    ]


def _prompt_key(row: dict) -> str:
    """The prompt a normalized row answers: a pair's or prompt row's ``prompt``, a conversation's
    turns before its last assistant turn, or a plain-text row's text."""
    if "prompt" in row:
        return prompt_id(row["prompt"])
    if "messages" in row:
        messages = row["messages"]
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=0)
        return prompt_id(messages[:last])
    return hashlib.sha256(row["text"].encode("utf-8")).hexdigest()[:16]


def stratified_split(
    n_rows: int,
    eval_size: int | float,
    seed: int,
    strata: Sequence[str] | None = None,
    groups: Sequence[str] | None = None,
) -> list[bool]:
    """Which rows go to the held-out set: ``eval_size`` rows in all, each stratum's share the
    same as in the data, and every row of a group on one side.

    Each stratum's quota is its share of the held-out rows (largest remainders, so quotas sum to
    the total). Its groups, shuffled with ``seed``, fill the quota greedily; then one more group
    is added if that brings the count closer to the stratum's exact share. With groups of at most
    two rows every stratum lands within one row of its exact share; bigger groups can overshoot
    by up to their size less one. A group spanning strata counts under its most common one.
    """
    strata = list(strata) if strata is not None else [""] * n_rows
    groups = list(groups) if groups is not None else [str(i) for i in range(n_rows)]
    members: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    by_stratum: dict[str, list[str]] = defaultdict(list)
    for g, rows in members.items():  # first-seen order: deterministic before the shuffle
        by_stratum[Counter(strata[i] for i in rows).most_common(1)[0][0]].append(g)
    total = _eval_count(n_rows, eval_size)
    sizes = {s: sum(len(members[g]) for g in gs) for s, gs in by_stratum.items()}
    exact = {s: n * total / n_rows for s, n in sizes.items()}
    quota = {s: int(q) for s, q in exact.items()}
    by_remainder = sorted(exact, key=lambda s: (-(exact[s] - quota[s]), s))
    for s in by_remainder[: total - sum(quota.values())]:
        quota[s] += 1
    rng = random.Random(seed)
    is_eval = [False] * n_rows
    for s in sorted(by_stratum):
        order = list(by_stratum[s])
        rng.shuffle(order)
        taken, rest = 0, []
        for g in order:
            if taken + len(members[g]) <= quota[s]:
                taken += len(members[g])
                for i in members[g]:
                    is_eval[i] = True
            else:
                rest.append(g)
        if rest:
            g = min(rest, key=lambda g: len(members[g]))
            if abs(taken + len(members[g]) - exact[s]) < abs(taken - exact[s]):
                for i in members[g]:
                    is_eval[i] = True
    return is_eval


class _Cleaning:
    """A stage's ``data.clean``: one report over both passes, written when the stage's data is
    ready."""

    def __init__(self, spec: CleanSpec, source: str, context: DataContext) -> None:
        self.spec, self.context = spec, context
        self.report = CleanReport(source, "stage data", spec.model_dump(mode="json"))
        self.count = word_count
        if spec.length_unit == "tokens" and (spec.min_length or spec.max_length):
            if context.tokenizer is None:
                raise UserError(f"{context.where}.clean.length_unit: tokens needs a tokenizer")
            self.count = token_counter(context.tokenizer())

    def rows(self, rows: list[dict], fields: list[dict], name: str):
        kept, index = clean_rows(rows, self.spec, self.report, self.count, name)
        return kept, [fields[i] for i in index]

    def decontaminate(self, train: list[dict], held: list[dict]) -> list[dict]:
        sources = [eval_source(s) for s in self.spec.decontaminate] + self.context.heldout
        held_texts = (text for row in held for _, text in turns(row))
        index = decontaminator(self.spec, sources, held_texts)
        train = decontaminate(train, self.spec, self.report, index)
        self._write()
        return train

    def _write(self) -> None:
        removed = {r: c.count for r, c in self.report.removed.items() if c.count}
        logger.info(
            "%s.clean: %d rows in, %d kept; removed %s",
            self.context.where,
            self.report.rows_in,
            self.report.rows_out,
            removed or "none",
        )
        if self.context.report_dir is not None:
            self.context.report_dir.mkdir(parents=True, exist_ok=True)
            self.report.write(self.context.report_dir / CLEAN_REPORT)
