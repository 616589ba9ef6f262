"""Two CPU processes (gloo, torchrun) train one model: SFT and DPO with per-device batch b give
the step-1 loss and grad norm of one process with batch 2b, both ranks end with identical
adapters, and only rank 0 writes the run directory."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from launch import free_port, launch, pipeline  # noqa: E402


def step(root: Path, stage: str, n: int) -> dict:
    rows = [
        json.loads(x) for x in (root / "run" / stage / "metrics.jsonl").read_text().splitlines()
    ]
    logged = [r for r in rows if "loss" in r and r["step"] == n]
    assert len(logged) == 1, rows  # written once: by rank 0 only
    return logged[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    tracked = pipeline(4)
    tracked["run"]["report_to"] = ["tensorboard"]  # only rank 0 may log
    return launch(1, 8, root / "one"), launch(2, 4, root / "two", tracked)


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_two_processes_with_batch_b_match_one_with_batch_2b(runs, stage):
    one, two = runs
    for key in ("loss", "grad_norm"):
        assert step(two, stage, 1)[key] == pytest.approx(step(one, stage, 1)[key], abs=1e-5), key


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_both_ranks_hold_the_same_trained_adapter(runs, stage):
    _, two = runs
    rank0, rank1 = (torch.load(two / f"{stage}-rank{r}.pt") for r in (0, 1))
    assert rank0.keys() == rank1.keys() and rank0
    for name in rank0:
        assert torch.allclose(rank0[name], rank1[name], atol=1e-6), name


def assert_one_model(root: Path, stage: str) -> None:
    """Both ranks ended ``stage`` holding the same trained tensors."""
    rank0, rank1 = (torch.load(root / f"{stage}-rank{r}.pt") for r in (0, 1))
    assert rank0 and rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.allclose(rank0[name], rank1[name], atol=1e-6), (stage, name)


def test_grpo_on_two_processes_trains_one_policy(tmp_path):
    raw = pipeline(8)
    raw["stages"][1] = {
        "name": "grpo", "kind": "grpo", "rewards": ["gold"], "num_generations": 4,
        "max_completion_length": 12, "data": {"source": "builtin:prompts", "max_rows": 64},
        "heldout": {"num_prompts": 8, "samples_per_prompt": 1, "max_new_tokens": 12},
        "health": {"every": 1, "sample_prompts": 2, "max_new_tokens": 12},
        "train": {"max_steps": 2, "per_device_train_batch_size": 8, "learning_rate": 1e-3,
                  "logging_steps": 1, "save_steps": 1},
    }  # fmt: skip
    two = launch(2, 8, tmp_path / "two", raw)
    assert_one_model(two, "grpo")
    step(two, "grpo", 2)  # one metrics row per step: rank 0 wrote
    record = json.loads((two / "run" / "grpo" / "stage.json").read_text())
    assert record["health"]["checks"] == 3 and "gold_reward" in record["metrics"]


def test_rloo_on_two_processes_trains_one_policy(tmp_path):
    raw = pipeline(8)
    raw["stages"][1] = {
        "name": "rloo", "kind": "rloo", "rewards": ["gold"], "num_generations": 4,
        "max_completion_length": 12, "data": {"source": "builtin:prompts", "max_rows": 64},
        "heldout": {"num_prompts": 8, "samples_per_prompt": 1, "max_new_tokens": 12},
        "train": {"max_steps": 2, "per_device_train_batch_size": 8, "learning_rate": 1e-3,
                  "logging_steps": 1, "save_steps": 1},
    }  # fmt: skip
    two = launch(2, 8, tmp_path / "two", raw)
    assert_one_model(two, "rloo")
    step(two, "rloo", 2)
    assert "gold_reward" in json.loads((two / "run" / "rloo" / "stage.json").read_text())["metrics"]


def test_reward_model_and_simpo_on_two_processes_train_one_model_each(tmp_path):
    raw = pipeline(4)
    pref = {"source": "builtin:preference", "max_rows": 64, "eval_split": "test",
            "max_eval_rows": 8}  # fmt: skip
    train = {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-3,
             "logging_steps": 1, "save_steps": 1}  # fmt: skip
    raw["stages"][1:] = [
        {"name": "rm", "kind": "reward_model", "max_length": 64, "data": pref, "train": train},
        {"name": "simpo", "kind": "simpo", "from": "sft", "max_length": 64, "data": pref,
         "train": train, "heldout": {"enabled": False}},
    ]  # fmt: skip
    two = launch(2, 4, tmp_path / "two", raw)
    for stage in ("rm", "simpo"):
        assert_one_model(two, stage)
        step(two, stage, 2)  # one metrics row per step: rank 0 wrote


@pytest.mark.slow  # ~2 min on 2 cores
def test_training_options_on_two_processes(tmp_path):
    """Layer-wise rates and LoRA+ put the same parameters in the same groups on both ranks;
    AdaLoRA (pruning from averaged gradients) and PiSSA (its SVD on every rank) train one
    model on both."""
    raw = pipeline(4)
    sft = raw["stages"][0]
    sft["train"] = {**sft["train"], "max_steps": 6, "save_steps": 3}
    raw["stages"] = [
        {**sft, "name": "full", "adapter": {"type": "full"},
         "layerwise_lr": {"embeddings": 1e-5, "head": 1e-3, "decay": 0.5}},
        {**sft, "name": "loraplus", "adapter": {"type": "lora", "r": 8, "loraplus_ratio": 16}},
        {**sft, "name": "adalora", "adapter": {"type": "adalora", "r": 2, "adalora": {"init_r": 4}}},
        {**sft, "name": "pissa", "adapter": {"type": "lora", "r": 4, "init_lora_weights": "pissa"}},
    ]  # fmt: skip
    two = launch(2, 4, tmp_path / "two", raw)
    for stage in ("adalora", "pissa"):
        assert_one_model(two, stage)
    for stage in ("full", "loraplus"):
        assert_one_model(two, stage)
        rank0, rank1 = (
            json.loads((two / f"{stage}-groups-rank{r}.json").read_text()) for r in (0, 1)
        )
        assert rank0 == rank1 and rank0
    full = json.loads((two / "full-groups-rank0.json").read_text())
    assert full["model.embed_tokens.weight"] == ["embeddings", 1e-5]
    assert full["model.layers.0.mlp.up_proj.weight"] == ["layer.0", pytest.approx(2.5e-4)]
    assert full["model.layers.1.mlp.up_proj.weight"] == ["layer.1", pytest.approx(5e-4)]
    assert full["model.norm.weight"] == ["head", 1e-3]
    lora = json.loads((two / "loraplus-groups-rank0.json").read_text())
    for name, (group, lr) in lora.items():
        assert [group, lr] == (["lora_B", 16 * 3e-3] if "lora_B" in name else ["lora_A", 3e-3])
    adalora = json.loads((two / "run" / "adalora" / "adapter" / "adapter_config.json").read_text())
    assert sum(adalora["rank_pattern"].values()) < 4 * len(adalora["rank_pattern"])  # it pruned


def test_eval_on_two_processes_reports_once_with_one_process_numbers(tmp_path):
    raw = pipeline(8)
    raw["stages"][1] = {"name": "compare", "kind": "eval", "stages": ["sft"], "rewards": ["gold"],
                        "max_prompts": 8, "n": 1, "max_new_tokens": 12}  # fmt: skip
    one = launch(1, 8, tmp_path / "one", raw)
    # the same trained sft (2 processes would train it within float noise, which Adam's first
    # step turns into different weights), then the comparison on 2 processes
    shutil.copytree(one / "run", tmp_path / "two" / "run", ignore=shutil.ignore_patterns("compare"))
    two = launch(2, 8, tmp_path / "two", raw)
    results = [json.loads((r / "run" / "compare" / "results.json").read_text()) for r in (one, two)]
    assert results[0]["models"] == results[1]["models"]  # sampling is per prompt, not per rank
    assert (two / "run" / "compare" / "report.md").is_file()
    assert not list((two / "run").glob(".*.partial"))


def test_every_rank_follows_rank_zeros_plan(tmp_path):
    raw = pipeline(4)
    raw["stages"] = raw["stages"][:1]
    two = launch(2, 4, tmp_path / "two", raw, env={"ALIGNKIT_TEST_SKEW_PLAN": "1"}, timeout=300)
    rank0, rank1 = (torch.load(two / f"sft-rank{r}.pt") for r in (0, 1))  # rank 1 trained too
    for name in rank0:
        assert torch.allclose(rank0[name], rank1[name], atol=1e-6), name


def test_only_rank_zero_wrote_the_run_directory(runs):
    _, two = runs
    run = two / "run"
    assert not list(run.glob(".*.partial"))
    manifest = json.loads((run / "manifest.json").read_text())
    assert [s["status"] for s in manifest["stages"]] == ["complete", "complete"]
    assert manifest["processes"] == {"world_size": 2, "launcher": "torchrun", "engine": "ddp"}
    assert (run / "sft" / "adapter" / "adapter_model.safetensors").is_file()


PPO_WORKER = Path(__file__).with_name("ppo_worker.py")


@pytest.fixture(scope="module")
def ppo_ranks(tmp_path_factory, tiny_pipeline_cfg):
    from rich.console import Console

    from alignkit.config import validate_pipeline
    from alignkit.pipeline import run_pipeline
    from alignkit.stages import REGISTRY, stage_kinds

    root = tmp_path_factory.mktemp("ppo-ddp")
    raw = tiny_pipeline_cfg(root / "run", steps=2)
    raw["stages"][0]["heldout"] = {"enabled": False}
    raw["stages"].append(
        {"name": "rm", "kind": "reward_model", "max_length": 64,
         "data": {"source": "builtin:preference", "max_rows": 64, "eval_size": 0},
         "train": {"max_steps": 2, "per_device_train_batch_size": 16, "learning_rate": 3e-3}}
    )  # fmt: skip
    run_pipeline(validate_pipeline(raw, stage_kinds()), REGISTRY, root / "run", Console(quiet=True))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", str(PPO_WORKER), str(root / "run"), str(root)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return (
        [json.loads((root / f"rank{r}.json").read_text()) for r in (0, 1)],
        [torch.load(root / f"rank{r}.pt") for r in (0, 1)],
        root,
    )


def test_ppo_ranks_sample_different_prompts_and_end_with_one_policy(ppo_ranks):
    records, tensors, _ = ppo_ranks
    assert records[0]["world"] == records[1]["world"] == 2
    ours, theirs = ({json.dumps(p) for p in r["prompts"]} for r in records)
    assert len(ours) == 8 and ours.isdisjoint(theirs)
    assert tensors[0].keys() == tensors[1].keys() and tensors[0]
    for name in tensors[0]:
        assert torch.allclose(tensors[0][name], tensors[1][name], atol=1e-6), name


def test_ppo_update_averages_policy_and_value_gradients_over_ranks(ppo_ranks):
    """The update back-propagates the policy and the value in separate passes (one pass's
    activations at a time); the gradients the optimizer sees are still the mean of the ranks'."""
    records, _, _ = ppo_ranks
    for r in records:
        assert r["update_grad_rank_spread"] > 0  # the ranks' own gradients differ
        assert r["update_grad_error"] < 1e-5


def test_ppo_whitens_advantages_over_both_ranks(ppo_ranks):
    records, _, _ = ppo_ranks
    adv = [torch.tensor(r["advantages"]) for r in records]
    mask = [torch.tensor(r["mask"]) for r in records]
    values = torch.cat([a[m.bool()] for a, m in zip(adv, mask, strict=True)])
    assert values.mean().abs() < 1e-5 and values.var().sub(1).abs() < 1e-3  # union: 0 and 1
    local = [a[m.bool()].mean().abs() for a, m in zip(adv, mask, strict=True)]
    assert max(local) > 1e-3  # each rank alone is not centred: the statistics were global


def logged_once(stage_dir: Path, tag: str) -> list[int]:
    """Steps of ``tag`` in a stage's TensorBoard files, which one process wrote."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pids = {f.name.split(".")[-2] for f in stage_dir.glob("events.out.tfevents.*")}
    assert len(pids) == 1, pids  # rank 0's only
    events = EventAccumulator(str(stage_dir))
    events.Reload()
    return [e.step for e in events.Scalars(tag)]


def test_only_rank_zero_logs_to_the_trackers(runs, ppo_ranks):
    _, two = runs
    for stage in ("sft", "dpo"):
        assert logged_once(two / "run" / "tracking" / "tensorboard" / stage, "train/loss") == [1, 2]
    ppo = ppo_ranks[2] / "tracking" / "tensorboard" / "ppo"
    assert logged_once(ppo, "train/score_mean") == [1, 2]
