"""Data cleaning: each rule removes its planted rows and nothing else; PII is masked; bad input
is refused without touching the input; memory stays bounded on a generated file."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from alignkit.config import CleanSpec
from alignkit.data.clean import clean_file
from alignkit.data.clean_report import report_path
from alignkit.data.quality import scrub_text
from alignkit.errors import UserError

RNG = random.Random(7)
VOCAB = [f"v{i}q{RNG.randrange(10**6)}" for i in range(5000)]


def _text(n: int, rng: random.Random) -> str:
    return " ".join(rng.choices(VOCAB, k=n))


def _chat(user: str, answer: str) -> dict:
    return {
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    }


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _clean(tmp_path, rows, kind="sft", **settings):
    src = _write(tmp_path / "in.jsonl", rows)
    report = clean_file(str(src), tmp_path / "out.jsonl", kind, CleanSpec(**settings))
    kept = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    return report, kept


def _removed(report) -> dict[str, int]:
    return {rule: c.count for rule, c in report.removed.items() if c.count}


def _distinct(n: int, seed: int, answer_words: int = 40) -> list[dict]:
    rng = random.Random(seed)
    return [_chat(_text(10, rng), _text(answer_words, rng)) for _ in range(n)]


# --- duplicates -------------------------------------------------------------------------------


def _dedup_corpus():
    """12 distinct rows, then known pairs: (kind, index of the row it copies)."""
    rng = random.Random(1)
    base = _distinct(12, seed=2, answer_words=90)
    planted = []

    def user(i):
        return base[i]["messages"][0]["content"]

    def answer(i):
        return base[i]["messages"][1]["content"]

    # exact: the same words with other case and spacing
    planted.append(("exact", _chat(user(2).upper(), "  " + answer(2).replace(" ", "   "))))
    # near: one word appended (Jaccard ~0.99) and one word changed mid-text (~0.93)
    planted.append(("near99", _chat(user(4), answer(4) + " extra")))
    words = answer(6).split()
    words[45] = "changed"
    planted.append(("near93", _chat(user(6), " ".join(words))))
    # related, not a duplicate: the same prompt, half the answer replaced (Jaccard ~0.45)
    half = answer(8).split()[:45] + _text(45, rng).split()
    planted.append(("distinct", _chat(user(8), " ".join(half))))
    return base, planted


def test_dedup_removes_exact_and_near_duplicates_and_keeps_distinct_rows(tmp_path):
    base, planted = _dedup_corpus()
    report, kept = _clean(tmp_path, base + [row for _, row in planted])
    assert _removed(report) == {"exact_duplicate": 1, "near_duplicate": 2}
    assert kept == base + [planted[3][1]]  # every distinct row, first occurrences, in order
    near = report.removed["near_duplicate"].examples
    assert [e["where"].rsplit(":", 1)[1] for e in near] == ["14", "15"]  # JSONL line numbers
    assert "with row 5 read" in near[0]["why"] and "with row 7 read" in near[1]["why"]


def test_near_duplicate_threshold_is_the_users(tmp_path):
    base, planted = _dedup_corpus()
    rows = base + [row for _, row in planted]
    # at 0.97 (precise signatures) the ~0.93 pair stays, the ~0.99 one goes
    report, kept = _clean(tmp_path, rows, near_dup_threshold=0.97, num_perm=256)
    assert _removed(report) == {"exact_duplicate": 1, "near_duplicate": 1}
    assert planted[2][1] in kept and planted[1][1] not in kept
    # off: only the exact copy goes
    report, kept = _clean(tmp_path, rows, near_dup_threshold=None)
    assert _removed(report) == {"exact_duplicate": 1} and len(kept) == len(rows) - 1


# --- decontamination --------------------------------------------------------------------------


def test_decontamination_removes_planted_test_prompts_only(tmp_path):
    rows = _distinct(10, seed=3)
    question = "which river flows through the old town before it reaches the northern sea"
    test = _write(
        tmp_path / "test.jsonl",
        [
            {"prompt": question, "completion": "the long river"},
            {"question": "What is the capital of France", "answer": "Paris"},
        ],
    )
    leaked = _chat(f"Please answer: {question.upper()}?", "no idea")  # 14 words shared
    short = _chat("What is the capital of France?", "Paris, of course.")  # equal to a test prompt
    partial = _chat("the old town before it reaches the coast", "ok then")  # 7 shared words
    longer = _chat("What is the capital of France and of Spain?", "Paris and Madrid.")
    src = _write(tmp_path / "in.jsonl", rows[:5] + [leaked, partial, short, longer] + rows[5:])
    report = clean_file(
        str(src), tmp_path / "out.jsonl", "sft", CleanSpec(decontaminate=[str(test)])
    )
    kept = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert _removed(report) == {"contaminated": 2}
    assert kept == rows[:5] + [partial, longer] + rows[5:]
    assert report.decontamination_texts == 3  # "Paris" is too short to count


# --- filters ----------------------------------------------------------------------------------


def test_each_filter_removes_its_planted_rows_and_nothing_else(tmp_path):
    clean = _distinct(12, seed=4)
    planted = {
        "empty_turn": [
            _chat(" \n\t ", "fine answer here"),
            {
                "messages": [
                    {"role": "system", "content": ""},
                    *_chat("a real question", "an answer")["messages"],
                ]
            },
        ],  # fmt: skip
        "non_text": [_chat("bell \x07 inside", "text"), _chat("broken \ufffd decode", "text")],
        "length": [_chat("too long", _text(120, random.Random(5))), _chat("hi", "ok")],
        "repeated_ngrams": [_chat("loop", "I am fine I am fine I am fine I am fine I am fine")],
    }
    rows = clean[:6] + [r for rs in planted.values() for r in rs] + clean[6:]
    report, kept = _clean(tmp_path, rows, min_length=5, max_length=100)
    assert _removed(report) == {rule: len(rs) for rule, rs in planted.items()}
    assert kept == clean
    # every rule off (length is off unless bounds are set): every row stays
    off = {"empty_turns": False, "non_text": False, "max_repeated_ngram_share": None}
    report, kept = _clean(tmp_path, rows, **off)
    assert _removed(report) == {} and kept == rows


def test_identical_pairs_are_removed(tmp_path):
    rng = random.Random(6)
    pairs = [
        {"prompt": _text(8, rng), "chosen": _text(20, rng), "rejected": _text(20, rng)}
        for _ in range(6)
    ]
    same = {"prompt": "pick one", "chosen": "The same answer.", "rejected": "The same answer."}
    spaced = {"prompt": "pick two", "chosen": "The  Same answer.", "rejected": "the same answer."}
    report, kept = _clean(tmp_path, pairs[:3] + [same, spaced] + pairs[3:], kind="preference")
    assert _removed(report) == {"identical_pair": 2}
    assert kept == pairs


# --- PII --------------------------------------------------------------------------------------


def test_pii_scrub_masks_planted_values_and_leaves_look_alikes():
    from collections import Counter

    text = (
        "Mail jane.roe+work@mail.example.co.uk, call +1 (415) 555-0132 or 020 7946 0958; "
        "server 192.168.10.254 and fe80::1ff:fe23:4567:890a; keys AKIAIOSFODNN7EXAMPLE, "
        "sk-proj-abcdefghijklmnopqrstuvwx1234, ghp_0123456789abcdefghijABCDEFGHIJ012345, "
        "api_key = 'hunter2hunter2' and Zm9vYmFyQmF6UXV4MTIzNDU2Nzg5MEFCQ0RFRkdI."
    )
    look_alikes = (
        "On 2024-01-15 at 12:30:45 version 1.2.3 scored 3.14159 of 1000000 runs; "
        "commit 3f786850e387550fdab836ed7e6dc881de23001b."
    )
    found = Counter()
    scrubbed = scrub_text(
        text + " " + look_alikes, frozenset({"email", "phone", "ip", "key"}), found
    )
    assert scrubbed == (
        "Mail [EMAIL], call [PHONE] or [PHONE]; server [IP] and [IP]; keys [KEY], [KEY], [KEY], "
        "api_key = '[KEY]' and [KEY]. " + look_alikes
    )
    assert found == {"email": 1, "phone": 2, "ip": 2, "key": 5}
    assert scrub_text(text, frozenset(), Counter()) == text


def test_cleaned_file_keeps_format_and_masks_pii(tmp_path):
    row = {"id": "a1", "category": "chat", **_chat("reach me at bob@example.org", "will do")}
    report, kept = _clean(tmp_path, [row])
    assert kept == [{**row, "messages": [{"role": "user", "content": "reach me at [EMAIL]"},
                                          row["messages"][1]]}]  # fmt: skip
    saved = json.loads(report_path(tmp_path / "out.jsonl").read_text())
    assert saved["scrubbed"]["email"]["count"] == 1 and saved["rows_out"] == 1
    assert "[EMAIL]" in saved["scrubbed"]["email"]["examples"][0]["row"]
    assert (tmp_path / "out.report.md").read_text().startswith("# Data cleaning")


# --- bad input --------------------------------------------------------------------------------


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_bad_input_is_refused_and_the_input_never_changes(tmp_path):
    pairs = [{"prompt": "p", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(5)]
    src = _write(tmp_path / "in.jsonl", pairs)
    before = _digest(src)
    with pytest.raises(UserError, match="is the input"):
        clean_file(str(src), src, "sft", CleanSpec())
    with pytest.raises(UserError, match=r"is --kind sft right\?"):  # pairs read as SFT rows
        clean_file(str(src), tmp_path / "out.jsonl", "sft", CleanSpec())
    assert not (tmp_path / "out.jsonl").exists()
    with pytest.raises(UserError, match=r"\.jsonl or \.parquet"):
        clean_file(str(src), tmp_path / "out.csv", "preference", CleanSpec())
    assert _digest(src) == before


def test_cli_errors_exit_2_with_a_message(tmp_path):
    src = _write(tmp_path / "in.jsonl", [_chat("a question here", "an answer there")])
    before = _digest(src)
    run = subprocess.run(
        [sys.executable, "-m", "alignkit", "data", "clean", str(src), str(tmp_path / "o.jsonl"),
         "--set", "near_dup_treshold=0.9"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 2
    assert "unknown key 'near_dup_treshold'" in run.stderr and "near_dup_threshold" in run.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "alignkit", "data", "clean", str(tmp_path / "nope.jsonl"),
         str(tmp_path / "o.jsonl")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert missing.returncode == 2 and "not found" in missing.stderr
    assert _digest(src) == before and not (tmp_path / "o.jsonl").exists()


# --- memory -----------------------------------------------------------------------------------


def _generated_run(tmp_path, rows: int) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from bench.data_clean import HEADER, clean, generate, table_row

    src = tmp_path / "gen.jsonl"
    planted = generate(src, rows)
    report = clean(src, tmp_path / "gen_out.jsonl", [])
    assert report["removed"]["exact_duplicate"]["count"] == planted["exact"]
    assert report["scrubbed"]["email"]["count"] == planted["pii"]
    # one word changed in 28-80 words: most of them reach Jaccard 0.8
    assert 0.8 * planted["near"] <= report["removed"]["near_duplicate"]["count"] <= planted["near"]
    print(f"\n{HEADER}\n{table_row(rows, report)}")  # the README's table (pytest -s)
    return report


def test_clean_10k_generated_rows_in_bounded_memory(tmp_path):
    report = _generated_run(tmp_path, 10_000)
    assert report["peak_rss_mb"] < 250, report["peak_rss_mb"]


@pytest.mark.slow
def test_clean_1m_generated_rows_in_bounded_memory(tmp_path):
    report = _generated_run(tmp_path, 1_000_000)
    assert report["peak_rss_mb"] < 3072, report["peak_rss_mb"]  # measured: 2569


def test_parquet_output_reads_back_like_the_jsonl_output(tmp_path):
    from alignkit.data.sources import load_rows

    rows = _distinct(5, seed=8) + _distinct(1, seed=8)  # the last row repeats the first
    src = _write(tmp_path / "in.jsonl", rows)
    clean_file(str(src), tmp_path / "out.parquet", "sft", CleanSpec())
    assert [r.data for r in load_rows(str(tmp_path / "out.parquet"))] == rows[:5]


def test_length_in_tokens_uses_the_tokenizer(tmp_path):
    def by_character(text, add_special_tokens):  # a stand-in tokenizer: one token per character
        assert add_special_tokens is False
        return {"input_ids": list(text)}

    rows = [_chat("short one", "tiny reply"), _chat("a question", "a reply of many characters")]
    src = _write(tmp_path / "in.jsonl", rows)
    spec = CleanSpec(length_unit="tokens", max_length=30)
    with pytest.raises(UserError, match="needs --tokenizer"):
        clean_file(str(src), tmp_path / "out.jsonl", "sft", spec)
    report = clean_file(str(src), tmp_path / "out.jsonl", "sft", spec, tokenizer=by_character)
    assert _removed(report) == {"length": 1}  # 10 + 26 characters > 30; 3 + 5 words would pass
    assert "36 tokens > max_length 30" in report.removed["length"].examples[0]["why"]
