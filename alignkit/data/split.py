"""Train/eval rows from a :class:`DataSpec`, shared by every stage that reads a dataset."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from alignkit.config import DataSpec
from alignkit.data.fingerprint import data_record

Loader = Callable[..., Any]  # (source, split, on_bad_rows, max_bad_fraction) -> object with .rows


def train_eval_rows(spec: DataSpec, load: Loader, seed: int) -> tuple[list[dict], list[dict]]:
    """Load and validate the training rows and the held-out rows a spec names.

    Held-out rows come from ``eval_source`` (or ``eval_split`` of the same source); without
    either, ``eval_size`` rows are split off the shuffled training rows (seeded). Every row of
    both sets is validated before any training starts.
    """
    train = list(load(spec.source, spec.split, spec.on_bad_rows, spec.max_bad_fraction).rows)
    if spec.eval_source is not None or spec.eval_split is not None:
        source = spec.eval_source or spec.source
        held = list(load(source, spec.eval_split, spec.on_bad_rows, spec.max_bad_fraction).rows)
    else:
        rng = random.Random(seed)
        rng.shuffle(train)
        n = (
            spec.eval_size
            if isinstance(spec.eval_size, int)
            else round(len(train) * spec.eval_size)
        )
        n = max(0, min(n, len(train) - 1))
        held, train = train[:n], train[n:]
    if spec.max_rows is not None:
        train = train[: spec.max_rows]
    if spec.max_eval_rows is not None:
        held = held[: spec.max_eval_rows]
    return train, held


def data_records(spec: DataSpec, train: list[dict], held: list[dict]) -> list[dict]:
    """The data records (:func:`~alignkit.data.fingerprint.data_record`) of the rows
    :func:`train_eval_rows` returned for ``spec``."""
    records = [data_record("train", spec.source, spec.split, train)]
    if held:
        separate = spec.eval_source is not None or spec.eval_split is not None
        source = spec.eval_source or spec.source
        split = spec.eval_split if separate else spec.split
        records.append(data_record("eval", source, split, held))
    return records
