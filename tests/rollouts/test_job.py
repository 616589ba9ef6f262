"""The rollout job as a user runs it: end to end, killed and resumed, best-of-n, bad input."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from alignkit.builtin.task import gold_score
from alignkit.errors import UserError
from alignkit.rollouts.job import job_config, run_rollout_job
from alignkit.rollouts.shards import read_rollouts, shard_paths

BASE = ["--model", "builtin:tiny", "--prompts", "builtin:prompts", "--max-new-tokens", "16"]


def alignkit(*args, **kw):
    cmd = [sys.executable, "-m", "alignkit", "rollout", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def keys(rows):
    return Counter((r["prompt_id"], r["sample"]) for r in rows)


def run_job(out, **options):
    defaults = dict(model="builtin:tiny", prompts="builtin:prompts", split="test", n=2)
    return run_rollout_job(job_config(out=out, max_new_tokens=16, **{**defaults, **options}))


def test_end_to_end_with_gold_reward(tmp_path):
    out = tmp_path / "out"
    done = alignkit(
        *BASE, "--split", "test", "--max-prompts", 6, "--n", 3, "--out", out, "--reward", "gold"
    )
    assert done.returncode == 0, done.stderr
    assert "tok/s" in done.stdout or "tok/s" in done.stderr
    rows = read_rollouts(out)
    assert len(rows) == 18 and set(keys(rows).values()) == {1}
    for r in rows:
        assert r["finish_reason"] in ("stop", "length") and 0 < r["completion_tokens"] <= 16
        assert r["prompt_tokens"] > 0 and r["prompt"][-1]["role"] == "user"
        assert r["rewards"]["gold"] == pytest.approx(
            gold_score(r["prompt"][-1]["content"], r["completion"])
        )
        assert r["reward"] == r["rewards"]["gold"]
    summary = json.loads((out / "job.json").read_text())["summary"]
    assert summary["rows"] == 18 and summary["mean_rewards"]["gold"] is not None


def test_resume_after_a_kill_loses_and_duplicates_nothing(tmp_path):
    out = tmp_path / "out"
    args = [*BASE, "--split", "train", "--max-prompts", 200, "--n", 2, "--out", out]
    args += ["--reward", "length"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "alignkit", "rollout", *map(str, args), "--chunk-prompts", "2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and len(read_rollouts(out) if out.exists() else []) < 8:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {p.name: p.read_bytes() for p in shard_paths(out)}
    assert before and len(read_rollouts(out)) < 400, "the job finished before it was killed"
    # A torn write on top: half a line at the end of the last shard.
    last = shard_paths(out)[-1]
    last.write_bytes(last.read_bytes() + b'{"prompt_id": "torn", "sam')

    resumed = alignkit(*args, "--chunk-prompts", 32)  # chunking is not part of the job's identity
    assert resumed.returncode == 0, resumed.stderr
    rows = read_rollouts(out)
    assert len(keys(rows)) == 400 and set(keys(rows).values()) == {1}
    for name, content in before.items():  # every complete line written before is untouched
        assert (out / name).read_bytes().startswith(content)


def test_resume_fills_a_prompt_cut_short_by_a_torn_write(tmp_path):
    out = tmp_path / "out"
    run_job(out, max_prompts=4, n=3)
    shard = shard_paths(out)[0]
    lines = shard.read_bytes().split(b"\n")[:-1]
    # the kill came in the middle of the 11th line: prompt 4 has one sample, the second torn
    shard.write_bytes(b"\n".join(lines[:10]) + b"\n" + lines[10][:25])
    assert len(read_rollouts(out)) == 10
    summary = run_job(out, max_prompts=4, n=3)
    rows = read_rollouts(out)
    assert summary["rows_this_run"] == 2 and len(rows) == 12
    assert sorted(keys(rows).values()) == [1] * 12
    assert shard.read_bytes().split(b"\n")[:10] == lines[:10]


def test_best_of_n_preferences_load_in_the_dpo_loader(tmp_path):
    from alignkit.data.preference import load_preference

    out = tmp_path / "out"
    summary = run_job(out, max_prompts=12, n=4, rewards=["gold"], best_of_n=True)
    path = out / "preferences.jsonl"
    data = load_preference(str(path))
    assert len(data.rows) == summary["preferences"]["pairs"] > 0
    assert summary["preferences"]["pairs"] + summary["preferences"]["ties_dropped"] <= 12
    for pair in map(json.loads, path.read_text().splitlines()):
        prompt = pair["prompt"][-1]["content"]
        best = gold_score(prompt, pair["chosen"][0]["content"])
        worst = gold_score(prompt, pair["rejected"][0]["content"])
        assert best > worst and pair["margin"] == pytest.approx(best - worst)
    # each pair is the best and the worst of its prompt's (non-empty) samples
    by_prompt = {}
    for r in read_rollouts(out):
        if r["completion"].strip():  # an empty answer is no DPO row (best_of_n.py)
            by_prompt.setdefault(r["prompt_id"], []).append(r["reward"])
    for pair in map(json.loads, path.read_text().splitlines()):
        assert pair["chosen_reward"] == max(by_prompt[pair["prompt_id"]])
        assert pair["rejected_reward"] == min(by_prompt[pair["prompt_id"]])


def test_a_stage_rolls_out_with_its_adapter(tmp_path, lora_stage):
    base = run_job(tmp_path / "base", max_prompts=4)
    tuned = run_job(tmp_path / "tuned", model=None, stage=str(lora_stage), max_prompts=4)
    assert base["rows"] == tuned["rows"] == 8
    texts = lambda d: [r["completion"] for r in read_rollouts(d)]  # noqa: E731
    assert texts(tmp_path / "base") != texts(tmp_path / "tuned")  # same seed, other weights


def test_bad_prompt_row_is_refused_with_file_and_line(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Topic: river"}\n{"promt": "Topic: lake"}\n')
    done = alignkit("--model", "builtin:tiny", "--prompts", prompts, "--out", tmp_path / "out")
    assert done.returncode == 2
    assert f"{prompts}:2" in done.stderr
    assert not (tmp_path / "out").exists()


def test_bad_options_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="did you mean 'gold'"):
        run_job(tmp_path / "a", rewards=["gld"])
    with pytest.raises(UserError, match="best-of-n needs"):
        run_job(tmp_path / "b", best_of_n=True)
    with pytest.raises(UserError, match="--temperature"):
        job_config(out=tmp_path, prompts="builtin:prompts", model="builtin:tiny", temperature=-1)
    with pytest.raises(UserError, match="either --model"):
        run_job(tmp_path / "c", model=None)
    run_job(tmp_path / "d", max_prompts=2)
    with pytest.raises(UserError, match=r"different job \(sampling"):
        run_job(tmp_path / "d", max_prompts=2, n=3)
