import json
import sys
import types

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignkit.data.sources import load_rows
from alignkit.errors import UserError


def write_lines(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_jsonl_rows_keep_exact_line_numbers_and_skip_blank_lines(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [{"text": "a"}, "", "   ", {"text": "b"}])
    rows = load_rows(str(path))
    assert [(r.data, r.where, r.error) for r in rows] == [
        ({"text": "a"}, f"{path}:1", None),
        ({"text": "b"}, f"{path}:4", None),
    ]


def test_jsonl_invalid_json_and_non_objects_become_error_rows(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [{"text": "a"}, '{"text": "b"', "[1, 2]", "7"])
    rows = load_rows(str(path))
    assert rows[0].error is None
    bad = [(r.where, r.data) for r in rows[1:]]
    assert bad == [(f"{path}:2", None), (f"{path}:3", None), (f"{path}:4", None)]
    assert all(r.error.startswith("invalid JSON: ") for r in rows[1:])
    assert "expected an object, got a list" in rows[2].error


def test_jsonl_tolerates_utf8_bom_and_reports_undecodable_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\n{"text": "\xff"}\n')
    rows = load_rows(str(path))
    assert rows[0].data == {"text": "a"}
    assert rows[1].where == f"{path}:2"
    assert "not UTF-8" in rows[1].error


def test_json_array_rows_are_indexed_from_zero(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"text": "a"}, "oops", {"text": "c"}]))
    rows = load_rows(str(path))
    assert [r.where for r in rows] == [f"{path}[row {i}]" for i in range(3)]
    assert rows[1].data is None and "expected an object, got a string" in rows[1].error
    assert rows[2].data == {"text": "c"}


def test_json_file_holding_json_lines_keeps_line_numbers(tmp_path):
    path = write_lines(tmp_path / "d.json", [{"text": "a"}, "not json", {"text": "c"}])
    rows = load_rows(str(path))
    assert [r.where for r in rows] == [f"{path}:{i}" for i in (1, 2, 3)]
    assert rows[1].error.startswith("invalid JSON")


def test_broken_json_array_is_a_user_error(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"text": "a"},')
    with pytest.raises(UserError, match="not valid JSON"):
        load_rows(str(path))


def test_csv_rows_use_file_line_numbers_even_with_multiline_cells(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text(
        'instruction,input,output\n"two\nlines",,x\n\nsay hi,,hi\na,b,c,extra\n',
    )
    rows = load_rows(str(path))
    assert [r.where for r in rows] == [f"{path}:2", f"{path}:5", f"{path}:6"]
    assert rows[0].data == {"instruction": "two\nlines", "input": "", "output": "x"}
    assert rows[1].data == {"instruction": "say hi", "input": "", "output": "hi"}
    assert rows[2].data is None and "4 cells but 3 columns" in rows[2].error


def test_parquet_rows_keep_nested_messages(tmp_path):
    path = tmp_path / "d.parquet"
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    pq.write_table(pa.Table.from_pylist([{"messages": messages}, {"messages": None}]), path)
    rows = load_rows(str(path))
    assert [r.where for r in rows] == [f"{path}[row 0]", f"{path}[row 1]"]
    assert rows[0].data == {"messages": messages}
    assert rows[1].data == {"messages": None}


@pytest.mark.parametrize("source", ["missing.jsonl", "sub/dir/x.parquet", "./data", "~/x.csv"])
def test_missing_local_file_names_it_and_lists_accepted_sources(tmp_path, source, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets, "load_dataset", _fail_if_called)
    with pytest.raises(UserError) as err:
        load_rows(source)
    assert source in str(err.value)
    assert "not found" in str(err.value) and "builtin:NAME" in str(err.value)


def test_unknown_extension_is_a_user_error(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("hello\n")
    with pytest.raises(UserError, match=r"unknown file type '\.txt'"):
        load_rows(str(path))


def test_directory_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="is a directory"):
        load_rows(str(tmp_path))


def test_hub_name_loads_with_datasets_and_default_split(monkeypatch):
    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_list([{"text": "a"}, {"text": "b"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows = load_rows("org/name")
    load_rows("openai/gsm8k:main", "test")  # owner/name:config
    assert calls == [("org/name", None, "train"), ("openai/gsm8k", "main", "test")]
    assert [(r.data, r.where) for r in rows] == [
        ({"text": "a"}, "hub:org/name[train] row 0"),
        ({"text": "b"}, "hub:org/name[train] row 1"),
    ]


def test_hub_failure_is_a_user_error_with_cause_and_hint(monkeypatch):
    def fake_load_dataset(name, config, split):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(UserError) as err:
        load_rows("org/name", split="test")
    message = str(err.value)
    for part in ("'org/name'", "'test'", "ConnectionError: offline", "local file"):
        assert part in message


def test_builtin_source_calls_load_builtin_with_name_and_split(monkeypatch):
    calls = []

    def fake_load_builtin(name, split):
        calls.append((name, split))
        return [{"text": "x"}, {"text": "y"}]

    module = types.ModuleType("alignkit.builtin")
    module.load_builtin = fake_load_builtin
    monkeypatch.setitem(sys.modules, "alignkit.builtin", module)
    rows = load_rows("builtin:sft", split="eval")
    assert calls == [("sft", "eval")]
    assert [r.where for r in rows] == ["builtin:sft[eval] row 0", "builtin:sft[eval] row 1"]
    assert rows[1].data == {"text": "y"}


def _fail_if_called(*args, **kwargs):
    raise AssertionError("a path-like source must not be sent to the Hub")
