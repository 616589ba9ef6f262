"""The rollout stage: on-policy pairs labelled by a reward, mixed into a reward model, resumable."""

import json

import pytest
from rich.console import Console

from alignkit.config import validate_pipeline
from alignkit.errors import UserError
from alignkit.pipeline import run_pipeline
from alignkit.rewards.sanity import probe_reward_model
from alignkit.rollouts.best_of_n import preference_pairs
from alignkit.rundir import RunDir
from alignkit.stages import REGISTRY, stage_kinds

ROLLOUT = {
    "name": "onpolicy",
    "kind": "rollout",
    "from": "sft",
    "data": {"source": "builtin:prompts", "max_rows": 12},
    "sampling": {"n": 3, "max_new_tokens": 12},
    "labeller": ["gold"],
}
RM = {
    "name": "rm",
    "kind": "reward_model",
    "data": {"source": "builtin:preference", "eval_split": "test", "max_rows": 64,
             "max_eval_rows": 16},
    "mix": [{"stage": "onpolicy", "weight": 2, "eval_size": 2}],
    "max_length": 64,
    "train": {"max_steps": 2, "per_device_train_batch_size": 8, "learning_rate": 3e-3},
}  # fmt: skip


def run(raw, root):
    cfg = validate_pipeline(raw, stage_kinds())
    return run_pipeline(cfg, REGISTRY, root, Console(quiet=True))


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_pipeline_cfg):
    root = tmp_path_factory.mktemp("rollout")
    raw = tiny_pipeline_cfg(root, steps=2)
    raw["stages"][0]["heldout"] = {"enabled": False}
    raw["stages"] += [ROLLOUT, RM]
    run(raw, root)
    return raw, root


def test_onpolicy_pairs_are_written_and_feed_the_reward_model(finished):
    raw, root = finished
    rd = RunDir(root)
    pairs = [json.loads(x) for x in (root / "onpolicy" / "preferences.jsonl").open()]
    record = rd.stage_json("onpolicy")
    assert record["metrics"]["pairs"] == len(pairs) > 0
    rollouts = [json.loads(x) for f in (root / "onpolicy" / "rollouts").glob("*.jsonl")
                for x in f.open()]  # fmt: skip
    assert len(rollouts) == 12 * 3 and all("gold" in r["rewards"] for r in rollouts)
    assert all(p["chosen_reward"] > p["rejected_reward"] for p in pairs)
    rm = rd.stage_json("rm")["metrics"]
    # 64 builtin rows + the on-policy pairs minus 2 held out, twice (weight 2)
    assert rm["train_rows"] == 64 + 2 * (len(pairs) - 2)
    assert 0 <= rm["eval_onpolicy_accuracy"] <= 1
    assert "rm_probe/period_mean" in rm and "rm_probe/flagged" in rm
    assert (root / "rm" / "rm_probe.json").is_file()


def test_a_rerun_skips_and_a_changed_rollout_reruns_the_reward_model(finished):
    raw, root = finished
    decisions = run(raw, root)
    assert [d.action for d in decisions] == ["skip", "skip", "skip"]
    changed = json.loads(json.dumps(raw))
    changed["stages"][1]["pairs"] = "all"
    cfg = validate_pipeline(changed, stage_kinds())
    from alignkit.pipeline import plan

    assert [d.action for d in plan(cfg, RunDir(root))] == ["skip", "rerun", "rerun"]


def test_an_interrupted_rollout_stage_resumes_its_shards(tmp_path, tiny_pipeline_cfg, monkeypatch):
    from alignkit.rollouts import job as job_module

    raw = tiny_pipeline_cfg(tmp_path, steps=2)
    raw["stages"][0]["heldout"] = {"enabled": False}
    raw["stages"].append({**ROLLOUT, "data": {"source": "builtin:prompts", "max_rows": 6}})
    real = job_module._generate_chunk
    calls = []

    def dies_after_first_chunk(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(job_module, "_generate_chunk", dies_after_first_chunk)
    raw["stages"][1]["chunk_prompts"] = 3  # a durable write every 3 prompts
    with pytest.raises(KeyboardInterrupt):
        run(raw, tmp_path)
    partial = tmp_path / ".onpolicy.partial" / "rollouts"
    assert sum(1 for f in partial.glob("*.jsonl") for _ in f.open()) == 3 * 3
    monkeypatch.setattr(job_module, "_generate_chunk", real)
    decisions = run(raw, tmp_path)
    assert decisions[1].action == "resume"
    rows = [json.loads(x) for f in (tmp_path / "onpolicy" / "rollouts").glob("*.jsonl")
            for x in f.open()]  # fmt: skip
    assert len(rows) == 6 * 3 and len({(r["prompt_id"], r["sample"]) for r in rows}) == 18


def test_human_labels_from_a_file_make_the_pairs(finished, tmp_path):
    raw, root = finished
    rollouts = [json.loads(x) for f in (root / "onpolicy" / "rollouts").glob("*.jsonl")
                for x in f.open()]  # fmt: skip
    labels = tmp_path / "labels.jsonl"
    with labels.open("w") as f:  # a "labeller" preferring longer answers, for two prompts
        for r in rollouts[:6]:
            row = {"prompt_id": r["prompt_id"], "sample": r["sample"],
                   "reward": len(r["completion"])}  # fmt: skip
            f.write(json.dumps(row) + "\n")
    relabel = json.loads(json.dumps(raw))
    relabel["stages"][1] = {**ROLLOUT, "labeller": [], "labels": str(labels)}
    run(relabel, root)
    pairs = [json.loads(x) for x in (root / "onpolicy" / "preferences.jsonl").open()]
    assert 1 <= len(pairs) <= 2
    assert all(len(p["chosen"][0]["content"]) > len(p["rejected"][0]["content"]) for p in pairs)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt_id": "x"}\n')
    relabel["stages"][1]["labels"] = str(bad)
    with pytest.raises(UserError, match=r"bad.jsonl:1: a label row is"):
        run(relabel, root)


def test_all_pairs_mode_and_margin():
    rows = [{"prompt_id": "p", "sample": k, "prompt": [], "completion": c, "reward": r}
            for k, (c, r) in enumerate([("a", 1.0), ("b", 0.5), ("c", 0.45)])]  # fmt: skip
    best, _ = preference_pairs(rows)
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in best] == [("a", "c")]
    every, _ = preference_pairs(rows, "all", min_margin=0.1)
    assert {(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in every} == {
        ("a", "b"),
        ("a", "c"),
    }


def test_the_rm_probe_flags_a_reward_model_that_prefers_degenerate_answers():
    rows = [{"prompt": "Topic: river", "chosen": "the river is lovely and calm ."}] * 8

    def likes_dots(prompts, completions):
        return [5.0 if c.strip() in ("", ".") else 1.0 for c in completions]

    result = probe_reward_model(likes_dots, rows, per_category=4)
    assert set(result.flagged) == {"empty", "period"}
    assert result.metrics()["rm_probe/flagged"] == 2.0

    def sensible(prompts, completions):
        return [len(c.split()) / 10 for c in completions]

    assert probe_reward_model(sensible, rows, per_category=4).flagged == ["repeated"]
