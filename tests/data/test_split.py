"""Held-out rows split off the training rows: stratified by a field, grouped by prompt, and a
stage's ``data.clean`` (dedup before the split, decontamination after it)."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
from pydantic import ValidationError

from alignkit.config import DataSpec
from alignkit.data.preference import load_preference
from alignkit.data.split import DataContext, stratified_split, train_eval_rows
from alignkit.errors import UserError


def _grouped_strata(seed: int):
    """Rows of 3 strata (sizes ~55/30/15%) in groups of 1 or 2 rows (a prompt with 1-2 pairs)."""
    rng = random.Random(seed)
    strata, groups = [], []
    for g in range(rng.randint(80, 160)):
        stratum = rng.choices(["en", "de", "fr"], weights=[55, 30, 15])[0]
        for _ in range(rng.choice([1, 2])):
            strata.append(stratum)
            groups.append(f"p{g}")
    return strata, groups


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("eval_size", [0.1, 0.25, 17])
def test_every_stratum_keeps_its_share_within_one_row_and_no_group_is_split(seed, eval_size):
    strata, groups = _grouped_strata(seed)
    is_eval = stratified_split(len(strata), eval_size, seed, strata, groups)
    n = len(strata)
    total = eval_size if isinstance(eval_size, int) else round(n * eval_size)
    sizes, held = Counter(strata), Counter(s for s, e in zip(strata, is_eval, strict=True) if e)
    for stratum, size in sizes.items():
        assert abs(held[stratum] - size * total / n) <= 1, (stratum, held, sizes)
    sides = {}
    for g, e in zip(groups, is_eval, strict=True):
        assert sides.setdefault(g, e) == e, f"group {g} on both sides"
    assert stratified_split(n, eval_size, seed, strata, groups) == is_eval  # deterministic


def test_single_rows_hit_the_quota_exactly():
    strata = ["a"] * 70 + ["b"] * 20 + ["c"] * 10
    is_eval = stratified_split(100, 0.2, 0, strata)
    assert Counter(s for s, e in zip(strata, is_eval, strict=True) if e) == {
        "a": 14,
        "b": 4,
        "c": 2,
    }


def test_two_row_groups_land_on_the_side_nearest_the_share():
    # stratum a: 28 prompts with 2 rows each, exact share 11.2 of 20 held-out rows: 10 is 1.2
    # rows off, so a 6th prompt goes in (12, 0.8 off); stratum b: single rows, 9 (of 8.8)
    strata = ["a"] * 56 + ["b"] * 44
    groups = [f"a{i // 2}" for i in range(56)] + [f"b{i}" for i in range(44)]
    is_eval = stratified_split(100, 0.2, 0, strata, groups)
    assert Counter(s for s, e in zip(strata, is_eval, strict=True) if e) == {"a": 12, "b": 9}


def _pairs_file(tmp_path, n_prompts=60, seed=0):
    rng = random.Random(seed)
    rows = []
    for p in range(n_prompts):
        category = ["math", "code", "chat"][p % 3] if p % 5 else "chat"
        for k in range(rng.choice([1, 2])):
            rows.append({
                "prompt": f"question number {p} about {category}",
                "chosen": f"a good answer {p} {k} " + " ".join(rng.choices("abcdefgh", k=12)),
                "rejected": f"a poor answer {p} {k} " + " ".join(rng.choices("abcdefgh", k=12)),
                "category": category,
            })  # fmt: skip
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def test_stage_split_by_category_and_prompt(tmp_path):
    path, rows = _pairs_file(tmp_path)
    spec = DataSpec(source=str(path), eval_size=0.2, stratify_by="category", group_by="prompt")
    train, held = train_eval_rows(spec, load_preference, seed=3)
    assert len(train) + len(held) == len(rows)
    prompt = {r["prompt"][0]["content"] for r in held}
    assert not prompt & {r["prompt"][0]["content"] for r in train}  # no prompt on both sides
    share = Counter(r["category"] for r in rows)
    held_share = Counter(p.rsplit(" ", 1)[1] for r in held for p in [r["prompt"][0]["content"]])
    for category, n in share.items():
        assert abs(held_share[category] - n * round(len(rows) * 0.2) / len(rows)) <= 1
    # without a field or grouping: the seeded slice of the shuffled rows, as before
    plain = DataSpec(source=str(path), eval_size=0.2)
    shuffled = list(load_preference(str(path)).rows)
    random.Random(3).shuffle(shuffled)
    n = round(len(rows) * 0.2)
    assert train_eval_rows(plain, load_preference, 3) == (shuffled[n:], shuffled[:n])


def test_missing_stratum_field_and_given_eval_set_are_refused(tmp_path):
    path, _ = _pairs_file(tmp_path)
    with pytest.raises(UserError, match="no 'language' field"):
        train_eval_rows(DataSpec(source=str(path), stratify_by="language"), load_preference, 0)
    with pytest.raises(ValidationError, match="stratify_by shapes the held-out rows"):
        DataSpec(source=str(path), eval_source=str(path), stratify_by="category")


def test_stage_clean_dedups_then_drops_training_rows_that_leak_heldout_prompts(tmp_path):
    path, rows = _pairs_file(tmp_path)
    leak = "which river flows through the old town before it reaches the sea"
    extra = [rows[0], {**rows[1], "prompt": f"Q: {leak}"}]  # an exact copy and a leaked prompt
    path.write_text(path.read_text() + "".join(json.dumps(r) + "\n" for r in extra))
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(json.dumps({"prompt": leak}) + "\n")
    spec = DataSpec(source=str(path), eval_size=0.2, group_by="prompt", clean={})
    context = DataContext(heldout=[(str(heldout), None)], report_dir=tmp_path / "stage")
    train, held = train_eval_rows(spec, load_preference, 0, context)
    assert len(train) + len(held) == len(rows)  # both planted rows are gone
    assert all(leak not in r["prompt"][0]["content"] for r in train)
    report = json.loads((tmp_path / "stage" / "data_clean.json").read_text())
    assert report["removed"]["exact_duplicate"]["count"] == 1
    assert report["removed"]["contaminated"]["count"] == 1
    assert report["rows_in"] == len(rows) + 2 and report["rows_out"] == len(rows)
