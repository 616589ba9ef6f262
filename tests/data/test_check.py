import json
import os
import subprocess
import sys
from collections import Counter

import pytest
from rich.console import Console

from alignkit.data.check import (
    check_preference,
    check_prompts,
    check_sft,
    length_percentiles,
    print_report,
)
from alignkit.data.sft import load_sft
from alignkit.errors import UserError


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def chat(user, assistant, system=None):
    turns = [{"role": "system", "content": system}] if system else []
    return turns + [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


class WordTokenizer:
    """One token per word, plus one per turn for the role marker; refuses system turns."""

    def __call__(self, text):
        return {"input_ids": text.split()}

    def apply_chat_template(self, messages, tokenize, return_dict):
        assert tokenize and not return_dict
        if any(m["role"] == "system" for m in messages):
            raise ValueError("System role not supported")
        return [tok for m in messages for tok in [f"<{m['role']}>", *m["content"].split()]]


def test_length_percentiles_are_nearest_rank():
    assert length_percentiles(list(range(100, 0, -1))) == {
        "p50": 50,
        "p90": 90,
        "p99": 99,
        "max": 100,
    }
    assert length_percentiles([7]) == {"p50": 7, "p90": 7, "p99": 7, "max": 7}
    assert length_percentiles([1, 2, 3, 4]) == {"p50": 2, "p90": 4, "p99": 4, "max": 4}
    assert length_percentiles([]) == {}


def test_check_reports_counts_formats_and_problems_without_raising(tmp_path):
    rows = [
        {"messages": chat("a", "b")},
        "{broken",
        {"conversations": [{"from": "human", "value": "c"}, {"from": "gpt", "value": "d"}]},
        {"instruction": "i", "output": ""},
        {"instruction": "i", "output": "o"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    report = check_sft(path)
    assert (report.total, report.good, report.bad) == (5, 3, 2)
    assert report.formats == Counter(messages=1, sharegpt=1, alpaca=1)
    assert [where for where, _ in report.problems] == [f"{path}:2", f"{path}:4"]
    assert report.problems[1][1] == "empty output"
    assert report.notes == []


def test_check_without_tokenizer_uses_character_lengths(tmp_path):
    rows = [{"messages": chat("x" * n, "y" * n)} for n in range(1, 11)]
    report = check_sft(write_jsonl(tmp_path / "d.jsonl", rows))
    assert report.length_unit == "characters"
    assert report.lengths == {"p50": 10, "p90": 18, "p99": 20, "max": 20}


def test_check_with_tokenizer_counts_chat_template_tokens(tmp_path):
    rows = [{"messages": chat("one two", "three")}, {"messages": chat("a b c d e", "f g h")}]
    report = check_sft(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer=WordTokenizer())
    assert report.length_unit == "tokens"
    # 2 role markers + 3 words, and 2 role markers + 8 words
    assert report.lengths == {"p50": 5, "p90": 10, "p99": 10, "max": 10}


def test_check_with_tokenizer_on_text_rows(tmp_path):
    rows = [{"text": "a b c"}, {"text": "a"}, {"text": "a b c d e f g"}]
    report = check_sft(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer=WordTokenizer())
    assert report.lengths == {"p50": 3, "p90": 7, "p99": 7, "max": 7}


def test_rows_the_chat_template_rejects_are_problems(tmp_path):
    rows = [{"messages": chat("q", "a")}, {"messages": chat("q", "a", system="s")}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    report = check_sft(path, tokenizer=WordTokenizer())
    assert report.good == 1
    assert report.problems == [
        (f"{path}:2", "chat template failed: ValueError: System role not supported")
    ]
    assert report.lengths["max"] == 4


def test_check_refuses_mixed_text_and_chat_as_run_does_but_still_reports(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "t"}, {"messages": chat("a", "b")}])
    report = check_sft(path)
    assert report.good == 2
    assert report.refusal is not None and f"e.g. {path}:1" in report.refusal
    with pytest.raises(UserError, match="mixes plain-text rows"):
        load_sft(str(path))


def test_check_refuses_an_empty_file_or_blank_lines_as_run_does(tmp_path):
    for text in ("", "\n\n  \n"):
        path = tmp_path / "e.jsonl"
        path.write_text(text)
        assert check_sft(str(path)).refusal == "no rows found"
        with pytest.raises(UserError, match="no rows found"):
            load_sft(str(path))


def test_check_still_raises_for_an_unreadable_source(tmp_path):
    with pytest.raises(UserError, match="not found"):
        check_sft(str(tmp_path / "nope.jsonl"))


def test_print_report_shows_summary_and_first_twenty_problems(tmp_path):
    rows = [{"text": "ok"}] + [{"text": ""}] * 25
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    console = Console(record=True, width=300)
    print_report(check_sft(path), console)
    out = console.export_text()
    assert "formats" in out and "text 1" in out
    assert "length p99 (characters)" in out
    assert "problems (25):" in out
    assert f"{path}:21: empty text" in out
    assert f"{path}:22: empty text" not in out
    assert "... and 5 more" in out


def pref(prompt, chosen, rejected):
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def test_check_preference_reports_formats_lengths_and_length_bias(tmp_path):
    rows = [
        pref("q", "long answer", "no"),  # 1 + 11 vs 1 + 2
        pref("q", "yes", "longer one"),
        {
            "chosen": "\n\nHuman: hi\n\nAssistant: hello",
            "rejected": "\n\nHuman: hi\n\nAssistant: yo",
        },
        {"prompt": "q", "chosen": "same", "rejected": "same"},
        pref("qq", "abcd", "abc"),
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    report = check_preference(path)
    assert (report.kind, report.total, report.good) == ("preference", 5, 4)
    assert report.formats == Counter(explicit=3, hh_rlhf=1)
    assert report.problems == [(f"{path}:4", "chosen is identical to rejected")]
    assert report.length_unit == "characters"
    assert report.lengths["prompt+chosen max"] == 12 and report.lengths["prompt+rejected max"] == 11
    assert report.lengths["prompt+chosen p50"] == 6
    assert report.length_bias == 0.75
    assert len(report.notes) == 1 and "longer than rejected in 75.0% of pairs" in report.notes[0]


def test_check_preference_counts_template_tokens_and_records_template_failures(tmp_path):
    rows = [
        pref("a b", "c d e", "f"),
        pref([{"role": "system", "content": "s"}, {"role": "user", "content": "q"}], "x", "y"),
        pref("a", "b", "c d"),
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    report = check_preference(path, tokenizer=WordTokenizer())
    assert report.length_unit == "tokens"
    assert report.problems == [
        (f"{path}:2", "chat template failed: ValueError: System role not supported")
    ]
    assert report.lengths["prompt+chosen max"] == 7  # 2 role markers + 5 words
    assert report.lengths["prompt+rejected max"] == 5
    assert report.length_bias == 0.5 and report.notes == []


def test_check_prompts_notes_references_and_repeated_ids(tmp_path):
    rows = [{"prompt": "a"}, {"prompt": "bb", "reference": "r"}, {"prompt": "a"}, {"text": "x"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    report = check_prompts(path)
    assert (report.good, report.lengths["max"]) == (3, 2)
    assert report.problems[0][0] == f"{path}:4"
    assert report.notes[0] == "1 of 3 prompts have a reference answer"
    assert f"{path}:3 repeats id" in report.notes[1] and f"of {path}:1" in report.notes[1]


def alignkit(*args):
    env = {**os.environ, "COLUMNS": "400"}  # keep rich from wrapping long paths
    command = [sys.executable, "-m", "alignkit", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env)


def test_cli_data_check_preference_prints_length_bias_and_exit_code(tmp_path):
    clean = write_jsonl(tmp_path / "clean.jsonl", [pref("q", "longer", "no"), pref("q", "a", "b")])
    proc = alignkit("data", "check", clean, "--kind", "preference")
    assert proc.returncode == 0, proc.stderr
    assert "length bias" in proc.stdout and "chosen longer in 50.0% of pairs" in proc.stdout
    bad = write_jsonl(tmp_path / "bad.jsonl", [pref("q", "longer", "no"), {"chosen": "x"}])
    proc = alignkit("data", "check", bad, "--kind", "preference")
    assert proc.returncode == 2, proc.stderr
    assert "chosen longer in 100.0% of pairs" in proc.stdout
    assert f"{bad}:2: missing 'rejected'" in proc.stdout
