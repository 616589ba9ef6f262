import json
from collections import Counter

import pytest

from alignkit.data.preference import load_preference, normalize_preference_row, to_trl_dataset
from alignkit.data.prompts import load_prompts, prompt_id
from alignkit.errors import DataError


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


HH = "\n\nHuman: q\n\nAssistant: "


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def pair(prompt, chosen, rejected, margin=None):
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "margin": margin}


def test_explicit_prompt_strings(tmp_path):
    data = load_preference(
        write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    )
    assert data.rows == [pair([user("q")], [bot("a")], [bot("b")])]
    assert data.formats == Counter(explicit=1) and data.total == 1


def test_builtin_preference_is_explicit():
    data = load_preference("builtin:preference", "test")
    assert data.formats == Counter(explicit=data.total) and data.problems == []


def test_conversational_message_lists(tmp_path):
    prompt = [{"role": "system", "content": "s"}, user("q")]
    row = {"prompt": prompt, "chosen": [bot("a")], "rejected": [bot("b")]}
    data = load_preference(write_jsonl(tmp_path / "d.jsonl", [row]))
    assert data.rows == [pair(prompt, [bot("a")], [bot("b")])]
    assert data.formats == Counter(conversational=1)


def test_implicit_prompt_takes_the_longest_shared_prefix_of_whole_turns(tmp_path):
    shared = [user("q1"), bot("a1"), user("q2")]
    rows = [
        {"chosen": [user("q"), bot("good")], "rejected": [user("q"), bot("bad")]},
        {"chosen": shared + [bot("yes")], "rejected": shared + [bot("no"), user("q3"), bot("x")]},
    ]
    data = load_preference(write_jsonl(tmp_path / "d.jsonl", rows))
    assert data.rows[0] == pair([user("q")], [bot("good")], [bot("bad")])
    assert data.rows[1] == pair(shared, [bot("yes")], [bot("no"), user("q3"), bot("x")])
    assert data.formats == Counter(implicit=2)


def test_hh_rlhf_multi_turn_transcripts(tmp_path):
    shared = "\n\nHuman: What is tea?\n\nAssistant: A drink.\n\nAssistant: Hot.\n\nHuman: Green?"
    row = {
        "chosen": shared + "\n\nAssistant: Yes, green tea exists.\n\nIt is from China.",
        "rejected": shared + "\n\nAssistant: No.",
    }
    data = load_preference(write_jsonl(tmp_path / "d.jsonl", [row]))
    prompt = [user("What is tea?"), bot("A drink."), bot("Hot."), user("Green?")]
    chosen = [bot("Yes, green tea exists.\n\nIt is from China.")]  # "\n\n" without a marker
    assert data.rows == [pair(prompt, chosen, [bot("No.")])]
    assert data.formats == Counter(hh_rlhf=1)


def test_ultrafeedback_strips_the_prompt_turn_and_keeps_the_score_margin(tmp_path):
    row = {
        "prompt": "Name a fruit",
        "prompt_id": "abc",
        "chosen": [user("Name a fruit"), bot("Apple")],
        "rejected": [user("Name a fruit"), bot("Rock")],
        "messages": [user("Name a fruit"), bot("Apple")],
        "score_chosen": 8.5,
        "score_rejected": 3,
    }
    data = load_preference(write_jsonl(tmp_path / "d.jsonl", [row]))
    assert data.rows == [pair([user("Name a fruit")], [bot("Apple")], [bot("Rock")], margin=5.5)]
    assert data.formats == Counter(ultrafeedback=1)
    dataset = to_trl_dataset(data)
    assert dataset.column_names == ["prompt", "chosen", "rejected", "margin"]
    assert dataset[0]["margin"] == 5.5 and dataset[0]["chosen"] == [bot("Apple")]


def test_margin_column_is_kept_and_csv_numbers_are_read(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,chosen,rejected,margin\nq,a,b,0.5\nq2,c,d,2\n")
    data = load_preference(str(path))
    assert [row["margin"] for row in data.rows] == [0.5, 2.0]


def test_dataset_has_margin_only_when_every_row_has_one(tmp_path):
    rows = [
        {"prompt": "q", "chosen": "a", "rejected": "b", "margin": 1},
        {"prompt": "q", "chosen": "a", "rejected": "c"},
    ]
    dataset = to_trl_dataset(load_preference(write_jsonl(tmp_path / "d.jsonl", rows)))
    assert dataset.column_names == ["prompt", "chosen", "rejected"]
    assert dataset[1]["prompt"] == [user("q")] and dataset[1]["rejected"] == [bot("c")]


def test_formats_are_detected_per_row(tmp_path):
    rows = [
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"},
        {"chosen": [user("q"), bot("a")], "rejected": [user("q"), bot("b")]},
    ]
    data = load_preference(write_jsonl(tmp_path / "d.jsonl", rows))
    assert data.formats == Counter(explicit=1, hh_rlhf=1, implicit=1)
    assert all(row == pair([user("q")], [bot("a")], [bot("b")]) for row in data.rows)


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"prompt": "q", "rejected": "b"}, "missing 'chosen'"),
        ({"prompt": "q", "chosen": "a", "rejected": None}, "missing 'rejected'"),
        ({"prompt": "q", "chosen": "a", "rejected": "  "}, "empty 'rejected'"),
        ({"prompt": "q", "chosen": [], "rejected": [bot("b")]}, "empty 'chosen'"),
        ({"prompt": "q", "chosen": "a", "rejected": "a"}, "chosen is identical to rejected"),
        ({"chosen": [user("q"), bot("a")], "rejected": [user("q"), bot("a")]}, "chosen is identical to rejected"),
        ({"prompt": "q", "chosen": [bot("a")], "rejected": [{"role": "critic", "content": "b"}]}, "unknown role 'critic' in rejected[0]"),
        ({"prompt": "q", "chosen": [bot(["a"])], "rejected": [bot("b")]}, "non-string content in chosen[0] (got a list)"),
        ({"prompt": "q", "chosen": "a", "rejected": [bot("b")]}, "'chosen' is a string but 'rejected' is a list"),
        ({"prompt": [bot("hi")], "chosen": "a", "rejected": "b"}, "'prompt' must end with a user turn (its last role is 'assistant')"),
        ({"chosen": [user("q"), bot("a")], "rejected": [user("p"), bot("b")]}, "chosen and rejected share no prefix"),
        ({"chosen": [user("q"), bot("a")], "rejected": [user("q")]}, "'rejected' has nothing after the prompt turns it shares"),
        ({"chosen": [user("q"), bot("a"), user("x"), bot("y")], "rejected": [user("q"), bot("a"), user("z"), bot("w")]}, "differ at turn 2, a user turn"),
        ({"chosen": [user("q"), bot("a")], "rejected": [user("q"), bot(" ")]}, "empty assistant content in rejected[1]"),
        ({"chosen": "\n\nHuman: q\n\nHuman: more", "rejected": HH + "b"}, "no assistant turn in the 'chosen' transcript"),
        ({"chosen": "good answer", "rejected": "bad answer"}, "not an HH-RLHF transcript"),
        ({"chosen": HH + "a\n\nHuman: ok\n\nAssistant: c", "rejected": HH + "b"}, "'chosen' differs from the other transcript before its final assistant turn (at turn 1)"),
        ({"prompt": "other", "chosen": [user("q"), bot("a")], "rejected": [user("q"), bot("b")]}, "'prompt' does not match the last user turn"),
        ({"prompt": "q", "chosen": [bot("a")], "rejected": [user("q"), bot("b")]}, "'chosen' starts with role 'assistant' but 'rejected' with 'user'"),
        ({"prompt": "q", "chosen": "a", "rejected": "b", "score_chosen": "high", "score_rejected": 1}, "'score_chosen' is not a number (got 'high')"),
        ({"prompt": "q", "chosen": "a", "rejected": "b", "score_chosen": 2}, "score_chosen and score_rejected must be given together"),
        ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": [1]}, "'margin' is not a number"),
    ],
)  # fmt: skip
def test_bad_rows_are_refused_with_file_line_and_reason(tmp_path, row, reason):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}, row])
    with pytest.raises(DataError) as err:
        load_preference(path)
    assert len(err.value.problems) == 1
    where, message = err.value.problems[0]
    assert where == f"{path}:2" and reason in message
    assert f"{path}:2: " in str(err.value) and "1 of 2 rows are bad" in str(err.value)


def test_normalize_names_the_format():
    assert (
        normalize_preference_row({"prompt": "q", "chosen": "a", "rejected": "b"})[0] == "explicit"
    )


def test_skip_mode_keeps_good_pairs_and_fails_past_the_threshold(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(19)]
    path = write_jsonl(tmp_path / "d.jsonl", [*rows, {"prompt": "q", "chosen": "a"}])
    data = load_preference(path, on_bad_rows="skip", max_bad_fraction=0.05)
    assert len(data.rows) == 19 and data.problems[0][0] == f"{path}:20"
    path = write_jsonl(tmp_path / "e.jsonl", [*rows[:18], "{oops", {"prompt": "q", "chosen": "a"}])
    with pytest.raises(
        DataError, match=r"2 of 20 rows are bad \(10.0%\), more than max_bad_fraction 5.0%"
    ):
        load_preference(path, on_bad_rows="skip", max_bad_fraction=0.05)


def test_prompts_from_several_row_shapes_with_stable_ids(tmp_path):
    rows = [
        {"prompt": "plain"},
        {"prompt": [{"role": "system", "content": "s"}, user("listed")], "id": 7},
        {"messages": [user("m"), bot("ref m")]},
        {"instruction": "Translate", "input": "chat", "output": "cat"},
        {"prompt": "q", "chosen": "good", "rejected": "bad"},
        {"chosen": "\n\nHuman: hh\n\nAssistant: yes", "rejected": "\n\nHuman: hh\n\nAssistant: no"},
        {"prompt": "p", "completion": "c", "reference": "gold", "id": "row-9"},
        {"conversations": [{"from": "human", "value": "sg"}, {"from": "gpt", "value": "r"}]},
        {"prompt": "a", "answer": "42"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    data = load_prompts(path)
    assert [(row["prompt"][-1]["content"], row["reference"]) for row in data.rows] == [
        ("plain", None),
        ("listed", None),
        ("m", "ref m"),
        ("Translate\n\nchat", "cat"),
        ("q", "good"),
        ("hh", "yes"),
        ("p", "gold"),
        ("sg", "r"),
        ("a", "42"),
    ]
    assert data.rows[1]["prompt"][0] == {"role": "system", "content": "s"}
    assert data.formats == Counter(prompt=4, preference=2, messages=1, instruction=1, sharegpt=1)
    ids = [row["id"] for row in data.rows]
    assert ids[1] == "7" and ids[6] == "row-9"
    assert ids[0] == prompt_id([user("plain")]) and len(set(ids)) == len(ids)
    again = load_prompts(write_jsonl(tmp_path / "copy.jsonl", list(reversed(rows))))
    assert [row["id"] for row in reversed(again.rows)] == ids


def test_question_rows_are_prompts_with_their_answer_as_reference(tmp_path):
    rows = [{"question": "2 + 3?", "answer": "5"}, {"problem": "x^2 = 4, x > 0?", "solution": "2"}]
    data = load_prompts(write_jsonl(tmp_path / "qa.jsonl", rows))
    assert [r["prompt"][0]["content"] for r in data.rows] == ["2 + 3?", "x^2 = 4, x > 0?"]
    assert [r["reference"] for r in data.rows] == ["5", "2"]


def test_prompts_refuse_rows_without_a_prompt(tmp_path):
    rows = [
        {"prompt": "ok"},
        {"messages": [bot("only a reply")]},
        {"query": "q"},
        {"prompt": "x", "id": [1]},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_prompts(path)
    assert err.value.problems == [
        (f"{path}:2", "no prompt: the conversation holds only an assistant turn"),
        (
            f"{path}:3",
            "no prompt fields (expected one of prompt, messages, instruction, question, problem, conversations, chosen/rejected); got keys ['query']",
        ),
        (f"{path}:4", "'id' must be a string or an integer, got a list"),
    ]
