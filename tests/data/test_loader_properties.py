"""Property-based loader tests: whatever a file holds, loading it either gives rows or fails with
a UserError that names where; never another exception (a traceback for the user)."""

import csv
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignkit.data.preference import load_preference
from alignkit.data.prompts import load_prompts
from alignkit.data.sft import load_sft
from alignkit.errors import UserError

LOADERS = {"sft": load_sft, "preference": load_preference, "prompts": load_prompts}
KEYS = ["messages", "conversations", "role", "content", "from", "value", "instruction", "input",
        "output", "prompt", "completion", "text", "chosen", "rejected", "margin", "question",
        "answer", "score_chosen", "score_rejected", "x"]  # fmt: skip
SETTINGS = settings(max_examples=100, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip

scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["user", "assistant", "human", "gpt"]))  # fmt: skip
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)
    ),
    max_leaves=12,
)
rows = st.lists(st.dictionaries(st.sampled_from(KEYS), values, max_size=4), max_size=5)


def load_or_refuse(kind: str, path) -> None:
    try:
        LOADERS[kind](str(path))
    except UserError as e:
        assert str(e).strip(), "an error must say what is wrong"


@pytest.mark.parametrize("kind", sorted(LOADERS))
@SETTINGS
@given(data=rows)
def test_jsonl_rows_of_any_shape(tmp_path, kind, data):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    load_or_refuse(kind, path)


@pytest.mark.parametrize("kind", sorted(LOADERS))
@SETTINGS
@given(data=st.one_of(values, rows))
def test_json_of_any_shape(tmp_path, kind, data):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(data))
    load_or_refuse(kind, path)


@pytest.mark.parametrize("kind", sorted(LOADERS))
@SETTINGS
@given(raw=st.binary(max_size=200))
def test_any_bytes_in_any_file_type(tmp_path, kind, raw):
    for suffix in (".jsonl", ".json", ".csv", ".parquet"):
        path = tmp_path / f"d{suffix}"
        path.write_bytes(raw)
        load_or_refuse(kind, path)


@pytest.mark.parametrize("kind", sorted(LOADERS))
@SETTINGS
@given(header=st.lists(st.sampled_from(KEYS), min_size=1, max_size=4, unique=True),
       cells=st.lists(st.lists(st.text(max_size=20), max_size=5), max_size=5))  # fmt: skip
def test_csv_of_any_cells(tmp_path, kind, header, cells):
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(cells)
    path = tmp_path / "d.csv"
    path.write_text(buffer.getvalue())
    load_or_refuse(kind, path)


@pytest.mark.parametrize("kind", sorted(LOADERS))
@SETTINGS
@given(columns=st.dictionaries(
    st.sampled_from(KEYS),
    st.one_of(st.lists(st.text(max_size=10), min_size=2, max_size=2),
              st.lists(st.integers(-3, 3), min_size=2, max_size=2),
              st.lists(st.none(), min_size=2, max_size=2)),
    min_size=1, max_size=3))  # fmt: skip
def test_parquet_of_any_columns(tmp_path, kind, columns):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table(columns), path)
    load_or_refuse(kind, path)


HUGE = 3_000_000  # characters in one row: over MAX_ROW_CHARS (2,000,000)


def _write_huge(path, kind: str) -> None:
    text = "word " * (HUGE // 5)
    row = {"sft": {"prompt": "hi", "completion": text},
           "preference": {"prompt": "hi", "chosen": text, "rejected": "no"},
           "prompts": {"prompt": text}}[kind]  # fmt: skip
    if path.suffix == ".jsonl":
        path.write_text(json.dumps(row) + "\n")
    elif path.suffix == ".json":
        path.write_text(json.dumps([row]))
    elif path.suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            writer.writeheader()
            writer.writerow(row)
    else:
        pq.write_table(pa.Table.from_pylist([row]), path)


@pytest.mark.parametrize("kind", sorted(LOADERS))
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_a_huge_row_is_refused_in_bounded_memory(tmp_path, kind, suffix):
    """The 50 MB row that took 15 GB through tokenisation: refused by the loader, which holds
    a few copies of the row at most (Python allocations, traced)."""
    import tracemalloc

    path = tmp_path / f"d{suffix}"
    _write_huge(path, kind)
    tracemalloc.start()
    try:
        with pytest.raises(UserError, match=r"more than the 2,000,000"):
            LOADERS[kind](str(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 12 * HUGE, f"{peak / 1e6:.0f} MB traced to refuse a {HUGE / 1e6:.0f} MB row"
