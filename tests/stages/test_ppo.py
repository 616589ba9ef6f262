"""PPO on one base: the four adapters, what moves, reward parity, checkpoints, NaN stop."""

import pytest
import torch
from rich.console import Console

from alignkit.config import AdapterSpec, ModelSpec, validate_pipeline
from alignkit.errors import UserError
from alignkit.models import load_stage_model
from alignkit.pipeline import ParentOutput, StageContext, run_pipeline
from alignkit.rewards.reward_model import RewardModelScorer
from alignkit.rundir import RunDir
from alignkit.stages import REGISTRY, stage_kinds
from alignkit.stages import ppo_core as core
from alignkit.stages.ppo import PPOStageConfig
from alignkit.stages.ppo_loop import PPOTrainer
from alignkit.stages.ppo_model import REFERENCE, REWARD

PROMPTS = ["Topic: river garden", "Topic: school music"]
COMPLETIONS = ["the river is bright and lovely .", "sad awful music"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_pipeline_cfg):
    root = tmp_path_factory.mktemp("ppo")
    raw = tiny_pipeline_cfg(root, steps=4)
    pref = {"source": "builtin:preference", "max_rows": 64, "eval_size": 0}
    raw["stages"].append(
        {"name": "rm", "kind": "reward_model", "data": pref, "max_length": 64,
         "train": {"max_steps": 4, "per_device_train_batch_size": 16, "learning_rate": 3e-3}}
    )  # fmt: skip
    run_pipeline(validate_pipeline(raw, stage_kinds()), REGISTRY, root, Console(quiet=True))
    return RunDir(root)


def make(rd, out_dir, resume=None, spec=None, **over):
    fields = {
        "name": "ppo",
        "data": {"source": "builtin:prompts", "max_rows": 64},
        "reward_model": "rm",
        "rewards": ["gold"],
        "steps": 2,
        "prompts_per_step": 8,
        "minibatches": 2,
        "ppo_epochs": 1,
        "max_new_tokens": 12,
        "checkpoint_every": 1,
        "value_adapter": AdapterSpec(r=4, alpha=8),
    }
    cfg = PPOStageConfig(**{**fields, **over})
    ctx = StageContext(
        name="ppo", model=spec or ModelSpec(), adapter=AdapterSpec(), seed=0, out_dir=out_dir,
        parent=ParentOutput("sft", "sft", rd.stage_dir("sft"), rd.stage_json("sft")),
        resume_from=resume, console=Console(quiet=True),
    )  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    return PPOTrainer(cfg, ctx, rd.stage_dir("rm"))


def test_ppo_adapters_start_right_and_only_policy_and_value_move(run_dir, tmp_path):
    trainer = make(run_dir, tmp_path / "ppo")
    model = trainer.model
    assert set(model.peft.peft_config) == {"default", "ref", "value", "reward"}
    tok = trainer.tokenizer
    enc = tok(["alpha beta", "river garden bright"], return_tensors="pt", padding=True)
    sft, _ = load_stage_model(run_dir.stage_dir("sft"), ModelSpec())
    with torch.no_grad():
        want = sft(**enc).logits
        with model.role(REFERENCE):
            assert (model.peft(**enc).logits - want).abs().max() < 1e-5
        assert (model.peft(**enc).logits - want).abs().max() < 1e-5  # policy starts at SFT too
    # the reward adapter on the shared base scores like the standalone reward model
    alone = RewardModelScorer.from_path(run_dir.stage_dir("rm"))(PROMPTS, COMPLETIONS)
    shared = trainer.scorer(PROMPTS, COMPLETIONS)
    assert max(abs(a - b) for a, b in zip(alone, shared, strict=True)) < 1e-4

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    metrics = trainer.train()
    assert metrics["global_step"] == 2 and {
        "kl",
        "score_mean",
        "value_loss",
        "clip_fraction",
    } <= set(metrics)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(".default." in n and "lora_B" in n for n in changed)
    assert any(".value." in n for n in changed) and "value_head.weight" in changed
    assert not [
        n for n in changed if f".{REFERENCE}." in n or f".{REWARD}." in n or "base_layer" in n
    ]
    held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    names = [n for n, p in model.named_parameters() if id(p) in held]
    assert names and all(
        ".default." in n or ".value." in n or n.startswith("value_head") for n in names
    )
    assert (tmp_path / "ppo" / "checkpoints" / "checkpoint-2" / "state.pt").exists()
    assert len((tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()) == 2


def test_ppo_resumes_from_its_checkpoint_to_the_same_next_step(run_dir, tmp_path):
    straight = make(run_dir, tmp_path / "straight", steps=3)
    straight.train()
    first = make(run_dir, tmp_path / "ppo")
    first.train()
    saved = {n: p.detach().clone() for n, p in first.model.named_parameters() if ".default." in n}
    ckpt = tmp_path / "ppo" / "checkpoints" / "checkpoint-2"
    again = make(run_dir, tmp_path / "ppo", resume=ckpt, steps=3)
    assert again.step == 2
    for n, p in again.model.named_parameters():
        if n in saved:
            assert torch.equal(p, saved[n])
    assert again.train()["global_step"] == 3
    import json

    def step3(path):
        rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
        return next(r for r in rows if r["step"] == 3)

    a, b = step3(tmp_path / "straight"), step3(tmp_path / "ppo")
    for key in ("policy_loss", "value_loss", "score_mean", "kl"):
        assert abs(a[key] - b[key]) < 1e-5, key


def test_ppo_step_runs_on_a_4bit_base(run_dir, tmp_path):
    trainer = make(run_dir, tmp_path / "ppo", spec=ModelSpec(quantization="4bit"), steps=1)
    base = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "base_layer" in n}
    assert trainer.train()["global_step"] == 1
    for n, p in trainer.model.named_parameters():
        if n in base:
            assert torch.equal(p.view(torch.uint8), base[n].view(torch.uint8)), n


def test_non_finite_loss_stops_with_the_step_named(run_dir, tmp_path, monkeypatch):
    trainer = make(run_dir, tmp_path / "ppo", steps=3)
    real = core.policy_loss

    def poisoned(*args, **kw):
        out = real(*args, **kw)
        if trainer.step == 2:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(core, "policy_loss", poisoned)
    with pytest.raises(UserError, match=r"non-finite policy loss at step 2.*checkpoint-1"):
        trainer.train()
    assert (tmp_path / "ppo" / "checkpoints" / "checkpoint-1").exists()


def test_vllm_rollouts_get_the_policy_adapter_after_every_update(run_dir, tmp_path, monkeypatch):
    """The vLLM path without a GPU: a stand-in engine checks that what it was handed last is
    exactly the policy it is asked to sample from (vLLM itself runs in the `vllm` tests)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    from alignkit.rollouts.hf import HFEngine
    from alignkit.stages import ppo_loop

    seen = []

    class StandIn:
        def __init__(self, source, config):
            assert source.adapter_dir == run_dir.stage_dir("sft") / "adapter"
            assert config.gpu_memory_utilization == 0.3
            self.adapter = None

        def update_adapter(self, adapter_dir):
            self.adapter = load_file(adapter_dir / "adapter_model.safetensors")
            seen.append(adapter_dir.name)

        def generate(self, prompts, sampling):
            live = get_peft_model_state_dict(trainer.model.peft, adapter_name="default")
            assert self.adapter.keys() == live.keys()
            assert all(torch.equal(self.adapter[k], live[k]) for k in live)
            return HFEngine(trainer.model.peft, trainer.tokenizer).generate(prompts, sampling)

    monkeypatch.setattr("alignkit.rollouts.vllm.VLLMEngine", StandIn)
    trainer = make(run_dir, tmp_path / "ppo", steps=3, rollout={"engine": "vllm"})
    assert trainer.train()["global_step"] == 3
    assert seen == ["step-1", "step-2", "step-3"]  # a fresh copy for each step's rollouts
    assert not (tmp_path / "ppo" / ppo_loop.ROLLOUT_ADAPTER).exists()  # not left in the stage
