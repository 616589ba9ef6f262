"""Replay against forgetting: rows of an earlier or general source mixed into a stage's training
rows (:class:`~alignkit.config.ReplaySpec`), the replay buffer of the fine-tuning guides."""

from __future__ import annotations

import random

from alignkit.config import ReplaySpec
from alignkit.data.split import Loader
from alignkit.errors import DataError, UserError


def replay_count(train_rows: int, fraction: float) -> int:
    """Replay rows to add to ``train_rows`` so that they are ``fraction`` of the mix."""
    return round(train_rows * fraction / (1 - fraction))


def replay_rows(
    spec: ReplaySpec,
    source: str,
    split: str | None,
    load: Loader,
    train_rows: int,
    seed: int,
    where: str,
) -> list[dict]:
    """``replay_count(train_rows, spec.fraction)`` rows of ``source`` (``spec.source``, or the
    data of the stage it names), drawn in a seeded order, without replacement while they last."""
    try:
        rows = list(load(source, split).rows)
    except (DataError, UserError) as e:
        raise UserError(f"{where}.replay.source: {e}") from None
    if not rows:
        raise UserError(f"{where}.replay.source: {source} has no rows")
    rng = random.Random(seed)
    n = replay_count(train_rows, spec.fraction)
    picked: list[dict] = []
    while len(picked) < n:
        picked += rng.sample(rows, min(len(rows), n - len(picked)))
    return picked
