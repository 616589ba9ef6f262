import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignkit.data.sft import RowError, load_sft, normalize_sft_row, to_trl_dataset
from alignkit.errors import DataError


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def chat(user, assistant, system=None):
    turns = [{"role": "system", "content": system}] if system else []
    return turns + [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def test_openai_messages(tmp_path):
    row = {"messages": chat("hi", "hello", system="be brief"), "id": 7}
    data = load_sft(write_jsonl(tmp_path / "d.jsonl", [row]))
    assert data.rows == [{"messages": chat("hi", "hello", system="be brief")}]
    assert data.formats == Counter(messages=1) and data.kind == "messages"


def test_sharegpt_conversations(tmp_path):
    turns = [
        {"from": "system", "value": "sys"},
        {"from": "human", "value": "q1"},
        {"from": "gpt", "value": "a1"},
        {"from": "user", "value": "q2"},
        {"from": "chatgpt", "value": "a2"},
    ]
    data = load_sft(write_jsonl(tmp_path / "d.jsonl", [{"conversations": turns}]))
    roles = [m["role"] for m in data.rows[0]["messages"]]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    assert data.rows[0]["messages"][4]["content"] == "a2"
    assert data.formats == Counter(sharegpt=1)


def test_alpaca_with_and_without_input(tmp_path):
    rows = [
        {"instruction": "Translate", "input": "chat", "output": "cat"},
        {"instruction": "Say hi", "input": "", "output": "hi"},
        {"instruction": "Count", "output": "1 2 3"},
    ]
    data = load_sft(write_jsonl(tmp_path / "d.jsonl", rows))
    assert data.rows[0] == {"messages": chat("Translate\n\nchat", "cat")}
    assert data.rows[1] == {"messages": chat("Say hi", "hi")}
    assert data.rows[2] == {"messages": chat("Count", "1 2 3")}
    assert data.formats == Counter(alpaca=3)


def test_prompt_completion_strings_and_message_lists(tmp_path):
    rows = [
        {"prompt": "2+2?", "completion": "4"},
        {
            "prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
            "completion": [{"role": "assistant", "content": "a"}],
        },
    ]
    data = load_sft(write_jsonl(tmp_path / "d.jsonl", rows))
    assert data.rows[0] == {"messages": chat("2+2?", "4")}
    assert data.rows[1] == {"messages": chat("q", "a", system="s")}
    assert data.formats == Counter(prompt_completion=2)


def test_plain_text(tmp_path):
    data = load_sft(write_jsonl(tmp_path / "d.jsonl", [{"text": "once"}, {"text": "twice"}]))
    assert data.rows == [{"text": "once"}, {"text": "twice"}]
    assert data.kind == "text"
    dataset = to_trl_dataset(data)
    assert dataset.column_names == ["text"] and dataset["text"] == ["once", "twice"]


def test_json_array_file(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"messages": chat("a", "b")}, {"prompt": "c", "completion": "d"}]))
    data = load_sft(str(path))
    assert data.rows == [{"messages": chat("a", "b")}, {"messages": chat("c", "d")}]


def test_csv_file_with_alpaca_columns(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('instruction,input,output\nAdd,"1, 2",3\nGreet,,hello\n')
    data = load_sft(str(path))
    assert data.rows == [
        {"messages": chat("Add\n\n1, 2", "3")},
        {"messages": chat("Greet", "hello")},
    ]


def test_parquet_file_with_mixed_formats_filled_with_nulls(tmp_path):
    path = tmp_path / "d.parquet"
    rows = [
        {"messages": chat("a", "b"), "conversations": None},
        {
            "messages": None,
            "conversations": [{"from": "human", "value": "c"}, {"from": "gpt", "value": "d"}],
        },
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    data = load_sft(str(path))
    assert data.rows == [{"messages": chat("a", "b")}, {"messages": chat("c", "d")}]
    assert data.formats == Counter(messages=1, sharegpt=1)


def test_detection_is_per_row_not_from_the_first_row(tmp_path):
    rows = [
        {"messages": chat("a", "b")},
        {"conversations": [{"from": "human", "value": "c"}, {"from": "gpt", "value": "d"}]},
        {"messages": chat("e", "f")},
    ]
    data = load_sft(write_jsonl(tmp_path / "d.jsonl", rows))
    assert data.formats == Counter(messages=2, sharegpt=1)
    assert data.rows[1] == {"messages": chat("c", "d")}
    dataset = to_trl_dataset(data)
    assert dataset.column_names == ["messages"]
    assert dataset[1]["messages"] == chat("c", "d")


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"question": "q", "answer": "a"}, "no recognized SFT fields"),
        ({"prompt": "q", "chosen": "a", "rejected": "b"}, "looks like preference data"),
        ({"messages": []}, "empty conversation"),
        ({"messages": "hi"}, "'messages' must be a list of messages, got a string"),
        ({"messages": chat("a", "b") + [{"role": "tool", "content": "x"}]}, "unknown role 'tool' in messages[2]"),
        ({"messages": [{"role": "user", "content": ["x"]}]}, "non-string content in messages[0]"),
        ({"messages": [{"role": "user", "content": "q"}]}, "conversation without an assistant turn"),
        ({"messages": chat("a", "b") + [{"role": "user", "content": "c"}]}, "is not the assistant's (it is 'user')"),
        ({"messages": chat("a", "  ")}, "empty assistant content in messages[1]"),
        ({"conversations": [{"from": "bing", "value": "x"}]}, "unknown speaker 'bing' in conversations[0]"),
        ({"instruction": "do it", "output": ""}, "empty output"),
        ({"instruction": "do it", "input": ""}, "has 'instruction' but no 'output'"),
        ({"prompt": "q", "completion": ""}, "empty completion"),
        ({"text": "   "}, "empty text"),
    ],
)  # fmt: skip
def test_bad_rows_get_a_reason(row, reason):
    with pytest.raises(RowError) as err:
        normalize_sft_row(row)
    assert reason in str(err.value)


def test_unrecognized_row_lists_expected_fields_and_got_keys():
    with pytest.raises(RowError) as err:
        normalize_sft_row({"question": "q", "answer": "a"})
    assert "expected one of messages, conversations" in str(err.value)
    assert "got keys ['answer', 'question']" in str(err.value)


def bad_file(tmp_path, n_good, bad_lines):
    rows = [{"text": f"row {i}"} for i in range(n_good)]
    for line_no, raw in sorted(bad_lines.items()):
        rows.insert(line_no - 1, raw)
    return write_jsonl(tmp_path / "d.jsonl", rows)


def test_error_mode_raises_listing_file_line_and_reason(tmp_path):
    path = bad_file(tmp_path, 5, {2: '{"text": ', 4: {"text": ""}})
    with pytest.raises(DataError) as err:
        load_sft(path)
    message = str(err.value)
    assert f"{path}:2: invalid JSON" in message
    assert f"{path}:4: empty text" in message
    assert "2 of 7 rows are bad" in message and "on_bad_rows: skip" in message
    assert [where for where, _ in err.value.problems] == [f"{path}:2", f"{path}:4"]


def test_error_mode_lists_ten_problems_and_counts_the_rest(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": ""}] * 13)
    with pytest.raises(DataError) as err:
        load_sft(path)
    assert f"{path}:10: empty text" in str(err.value)
    assert f"{path}:11:" not in str(err.value)
    assert "... and 3 more" in str(err.value)


def test_skip_mode_keeps_good_rows_and_records_problems(tmp_path):
    path = bad_file(tmp_path, 39, {7: {"messages": "x"}})
    data = load_sft(path, on_bad_rows="skip", max_bad_fraction=0.05)
    assert len(data.rows) == 39 and data.total == 40
    assert data.problems == [(f"{path}:7", "'messages' must be a list of messages, got a string")]


def test_skip_mode_fails_past_the_threshold(tmp_path):
    path = bad_file(tmp_path, 18, {1: "nope", 5: "nope"})
    with pytest.raises(DataError) as err:
        load_sft(path, on_bad_rows="skip", max_bad_fraction=0.05)
    assert "2 of 20 rows are bad (10.0%)" in str(err.value)
    assert "max_bad_fraction 5.0%" in str(err.value)
    assert load_sft(path, on_bad_rows="skip", max_bad_fraction=0.1).total == 20


def test_zero_good_rows_is_an_error_even_when_all_bad_rows_are_allowed(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": ""}])
    with pytest.raises(DataError, match="no usable rows"):
        load_sft(path, on_bad_rows="skip", max_bad_fraction=1.0)


def test_empty_file_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no rows found"):
        load_sft(write_jsonl(tmp_path / "d.jsonl", []))


def test_mixing_plain_text_and_chat_rows_is_an_error_naming_examples(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": chat("a", "b")}, {"text": "plain"}])
    with pytest.raises(DataError) as err:
        load_sft(path)
    message = str(err.value)
    assert f"plain-text rows (e.g. {path}:2)" in message
    assert f"conversation rows (e.g. {path}:1)" in message
