"""The CLI as a user runs it: skip, re-run, resume after a kill, bad data, status."""

import json
import os
import signal
import subprocess
import sys
import time

import yaml


def alignkit(*args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "alignkit", *map(str, args)], capture_output=True, text=True, **kw
    )


def test_rerun_skips_and_changed_config_reruns(tmp_path, tiny_pipeline_cfg):
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump(tiny_pipeline_cfg(tmp_path / "run", steps=2)))
    first = alignkit("run", cfg)
    assert first.returncode == 0, first.stderr
    second = alignkit("run", cfg)
    assert (
        second.returncode == 0 and "skip" in second.stdout and "config unchanged" in second.stdout
    )
    assert "sft complete" not in second.stdout
    third = alignkit("run", cfg, "--set", "stages.sft.train.learning_rate=1e-3")
    assert third.returncode == 0, third.stderr
    assert "rerun" in third.stdout and "config changed" in third.stdout
    rec = json.loads((tmp_path / "run" / "sft" / "stage.json").read_text())
    assert rec["config"]["train"]["learning_rate"] == 1e-3

    status = alignkit("status", tmp_path / "run", "--json")
    manifest = json.loads(status.stdout)
    assert manifest["stages"][0]["status"] == "complete"
    assert "heldout_nll" in manifest["stages"][0]["metrics"]
    table = alignkit("status", tmp_path / "run")
    assert "complete" in table.stdout and "nll" in table.stdout


def test_killed_stage_resumes_from_last_checkpoint(tmp_path, tiny_pipeline_cfg):
    raw = tiny_pipeline_cfg(tmp_path / "run", steps=200)
    raw["stages"][0]["train"]["save_steps"] = 4
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    partial = tmp_path / "run" / ".sft.partial" / "checkpoints"
    proc = subprocess.Popen(
        [sys.executable, "-m", "alignkit", "run", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline and not (partial / "checkpoint-8" / "trainer_state.json").exists():
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(partial.glob("checkpoint-*")), "no checkpoint was written before the deadline"
    assert not (tmp_path / "run" / "sft" / "stage.json").exists()

    again = alignkit("run", cfg)
    assert again.returncode == 0, again.stderr
    assert "resume" in again.stdout and "resuming from checkpoint-" in again.stdout
    rec = json.loads((tmp_path / "run" / "sft" / "stage.json").read_text())
    assert rec["metrics"]["global_step"] == 200
    assert rec["resumed_from"].startswith("checkpoint-") and rec["resumed_from"] != "checkpoint-4"
    # both attempts' logs are kept: the first one's early steps and the resumed one's last step
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "sft" / "metrics.jsonl").open()]
    assert 1 in steps and 200 in steps


def test_bad_rows_exit_2_with_file_and_line_before_training(tmp_path):
    data = tmp_path / "bad.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    bad = {"messages": [{"role": "wizard", "content": "hi"}]}
    data.write_text("\n".join(json.dumps(r) for r in [good, bad, good]) + "\n")
    proc = alignkit("sft", "--data", data, "--run-dir", tmp_path / "run")
    assert proc.returncode == 2
    assert f"{data}:2" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "sft").exists()
    check = alignkit("data", "check", data, "--kind", "sft")
    assert check.returncode == 2 and f"{data}:2" in check.stdout


def test_chained_pipeline_skips_then_reruns_downstream_of_a_changed_sft(
    tmp_path, tiny_pipeline_cfg
):
    raw = tiny_pipeline_cfg(tmp_path / "run", steps=2)
    pref = {
        "source": "builtin:preference",
        "eval_split": "test",
        "max_rows": 32,
        "max_eval_rows": 16,
    }
    small = {"max_steps": 2, "per_device_train_batch_size": 8}
    raw["stages"] += [
        {
            "name": "rm",
            "kind": "reward_model",
            "from": "sft",
            "from_sft": True,
            "data": pref,
            "max_length": 64,
            "train": small,
        },
        {"name": "rm_base", "kind": "reward_model", "data": pref, "max_length": 64, "train": small},
        {"name": "dpo", "kind": "dpo", "data": pref, "max_length": 64, "train": small},
    ]
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    first = alignkit("run", cfg)
    assert first.returncode == 0, first.stderr
    manifest = json.loads(alignkit("status", tmp_path / "run", "--json").stdout)
    assert [(s["name"], s["parent"], s["status"]) for s in manifest["stages"]] == [
        ("sft", None, "complete"),
        ("rm", "sft", "complete"),
        ("rm_base", None, "complete"),
        ("dpo", "sft", "complete"),
    ]
    dpo = json.loads((tmp_path / "run" / "dpo" / "stage.json").read_text())
    assert dpo["parent"] == "sft" and "eval_rewards/accuracies" in dpo["metrics"]

    again = alignkit("run", cfg)
    assert again.returncode == 0 and again.stdout.count("config unchanged") == 4

    changed = alignkit("run", cfg, "--set", "stages.sft.train.learning_rate=1e-3")
    assert changed.returncode == 0, changed.stderr
    plan = changed.stdout.split("stage times")[0]  # the plan, not the table of stage times
    rows = {
        line.split()[0]: line
        for line in plan.splitlines()
        if line.strip()[:3] in ("sft", "rm ", "rm_", "dpo")
    }
    assert "config changed" in rows["sft"]
    assert (
        "upstream stage 'sft' re-runs" in rows["rm"]
        and "upstream stage 'sft' re-runs" in rows["dpo"]
    )
    assert "config unchanged" in rows["rm_base"]
