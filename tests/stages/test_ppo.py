"""PPO on one base: the four adapters, what moves, reward parity, checkpoints, NaN stop."""

import dataclasses

import pytest
import torch
from rich.console import Console

from alignkit.config import AdapterSpec, ModelSpec, validate_pipeline
from alignkit.errors import UserError
from alignkit.handoff import StageOutput
from alignkit.models import load_stage_model
from alignkit.pipeline import StageContext, run_pipeline
from alignkit.rewards.gold import gold_reward
from alignkit.rewards.reward_model import RewardModelScorer
from alignkit.rundir import RunDir
from alignkit.stages import REGISTRY, stage_kinds
from alignkit.stages import ppo_core as core
from alignkit.stages import ppo_update as update
from alignkit.stages.ppo import PPOStageConfig
from alignkit.stages.ppo_loop import PPOTrainer
from alignkit.stages.ppo_model import HELDOUT_REWARD, REFERENCE, REWARD

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


def make(rd, out_dir, resume=None, spec=None, heldout=None, reward_dirs=None, apart=None, **over):
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
        parent=StageOutput("sft", "sft", rd.stage_dir("sft"), rd.stage_json("sft")),
        resume_from=resume, console=Console(quiet=True),
    )  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    rms = {REWARD: rd.stage_dir("rm")} if reward_dirs is None else reward_dirs
    return PPOTrainer(cfg, ctx, {**rms, **(heldout or {})}, apart)


def rm_scorer(trainer):
    """The reward-model component of the trainer's training reward."""
    return {name: fn for name, fn, _ in trainer.scoring.reward.components}["rm"]


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
    shared = rm_scorer(trainer)(PROMPTS, COMPLETIONS)
    assert max(abs(a - b) for a, b in zip(alone, shared, strict=True)) < 1e-4
    # the training reward: the RM as one component of a weighted sum with the reward functions
    assert trainer.scoring.reward.names == ["rm", "gold"]
    gold = gold_reward(PROMPTS, COMPLETIONS)
    total = trainer.scoring.reward(PROMPTS, COMPLETIONS)
    assert total == pytest.approx([s + g for s, g in zip(shared, gold, strict=True)], abs=1e-6)

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


def test_a_reward_model_on_another_base_is_one_component_loaded_apart(run_dir, tmp_path):
    """A reward_model stage PPO cannot run as an adapter on its base (another base, or full
    fine-tuning) is loaded on its own and scores as the same component."""
    trainer = make(run_dir, tmp_path / "ppo", reward_dirs={}, apart=run_dir.stage_dir("rm"))
    assert "reward" not in trainer.model.peft.peft_config
    assert trainer.scoring.reward.names == ["rm", "gold"]
    assert isinstance(rm_scorer(trainer).model, torch.nn.Module)
    alone = RewardModelScorer.from_path(run_dir.stage_dir("rm"))(PROMPTS, COMPLETIONS)
    assert rm_scorer(trainer)(PROMPTS, COMPLETIONS) == pytest.approx(alone, abs=1e-6)


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


def test_truncated_answers_are_scored_as_cut_and_penalised(run_dir, tmp_path):
    trainer = make(run_dir, tmp_path / "ppo")
    scorer = rm_scorer(trainer)
    whole = scorer.encode(PROMPTS[0], COMPLETIONS[0])
    cut = scorer.encode(PROMPTS[0], COMPLETIONS[0], truncated=True)
    end = trainer.tokenizer.eos_token_id
    assert end in whole[len(cut) - 1 :] and cut[-1] != end and whole[: len(cut)] == cut
    as_cut = scorer(PROMPTS, COMPLETIONS, finish_reason=["length", "stop"])
    as_whole = scorer(PROMPTS, COMPLETIONS)
    assert as_cut[0] != as_whole[0] and as_cut[1] == as_whole[1]
    # an RM scores: the missing-EOS penalty defaults to one (normalised) unit
    assert trainer.cfg.eos_penalty == 1.0
    raw = torch.tensor([0.5, 0.5])
    shaped = trainer.scoring.shape(raw, ["length", "stop"])
    assert shaped[1] - shaped[0] == pytest.approx(1.0)


def test_scores_are_normalised_once_then_fixed_and_clipped(run_dir, tmp_path):
    trainer = make(run_dir, tmp_path / "ppo", score_clip=2.0, missing_eos_penalty=0.0)
    first = trainer.scoring.shape(torch.tensor([1.0, 3.0, 5.0, 7.0]), ["stop"] * 4)
    assert first.mean().abs() < 1e-6
    mean, std = trainer.scoring.score_stats.mean, trainer.scoring.score_stats.std
    later = trainer.scoring.shape(torch.tensor([4.0, 100.0, -100.0]), ["stop"] * 3)
    assert (trainer.scoring.score_stats.mean, trainer.scoring.score_stats.std) == (
        mean,
        std,
    )  # fixed
    assert later.tolist() == pytest.approx([0.0, 2.0, -2.0])  # clipped to +-score_clip
    running = make(run_dir, tmp_path / "run", normalize_scores="running")
    running.scoring.shape(torch.tensor([1.0, 3.0]), ["stop"] * 2)
    running.scoring.shape(torch.tensor([11.0, 13.0]), ["stop"] * 2)
    assert running.scoring.score_stats.mean == pytest.approx(7.0)
    assert (
        PPOStageConfig.model_validate(
            {"name": "p", "data": {"source": "x"}, "rewards": ["gold"], "normalize_scores": False}
        ).normalize_scores
        == "none"
    )


def test_a_heldout_reward_model_watches_every_rollout(run_dir, tmp_path):
    trainer = make(run_dir, tmp_path / "ppo", heldout={HELDOUT_REWARD: run_dir.stage_dir("rm")})
    assert HELDOUT_REWARD in trainer.model.peft.peft_config
    # the same RM twice: the held-out adapter scores exactly like the training one
    assert trainer.scoring.heldout_scorer(PROMPTS, COMPLETIONS) == pytest.approx(
        rm_scorer(trainer)(PROMPTS, COMPLETIONS), abs=1e-5
    )
    trainer.train()
    rows = (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()
    assert all("heldout_rm_score" in r for r in rows)


def test_no_checkpoint_is_written_from_weights_that_exploded(run_dir, tmp_path):
    from alignkit.finite import NonFiniteError

    trainer = make(run_dir, tmp_path / "ppo", steps=1)
    trainer.train()
    with torch.no_grad():
        trainer.model.policy_parameters()[0].fill_(1e38)  # finite, but the logits overflow
    trainer.step = 5
    with pytest.raises(NonFiniteError, match=r"stages\.ppo: non-finite .* at step 5; stopped"):
        trainer._save()
    assert not (tmp_path / "ppo" / "checkpoints" / "checkpoint-5").exists()


class StopAt:
    """A sweep trial stand-in: records what PPO reports and stops the trial at one step."""

    stage, objective = "ppo", "gold_reward_gain"

    def __init__(self, stop_step: int):
        self.stop_step, self.reported = stop_step, []

    def due(self, step: int) -> bool:
        return True

    def report(self, step, metrics) -> None:
        self.reported.append((step, metrics[self.objective]))
        if step == self.stop_step:
            raise KeyError("pruned")  # any exception: optuna.TrialPruned in a sweep


def test_a_sweep_trial_gets_heldout_values_between_steps_and_can_stop_ppo(run_dir, tmp_path):
    trainer = make(run_dir, tmp_path / "ppo", steps=3, checkpoint_every=1)
    trainer.ctx.trial = StopAt(2)
    calls = []

    def heldout():
        calls.append(trainer.step)
        return {"gold_reward_gain": 0.1 * trainer.step}

    with pytest.raises(KeyError, match="pruned"):
        trainer.train(heldout=heldout)
    assert trainer.ctx.trial.reported == [(1, 0.1), (2, 0.2)] and calls == [1, 2]
    checkpoints = sorted(p.name for p in (tmp_path / "ppo" / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-1"]  # stopped before the pruned step's checkpoint


def test_the_update_skips_padding_columns_and_gets_the_same_gradients(run_dir, tmp_path):
    """A micro-batch is cut after its longest completion: same losses and gradients as over
    the step's full width, fewer columns through the model."""
    trainer = make(run_dir, tmp_path / "ppo", prompts_per_step=8, max_new_tokens=24)
    exp = trainer._experience(0)
    lengths = exp.cmask.sum(1)
    idx = torch.argsort(lengths)[:4]  # the four shortest completions
    assert int(lengths[idx].max()) < exp.cmask.shape[1], "needs completions of unequal length"
    ids = exp.rows(idx)[0]
    assert ids.shape[1] == exp.P + int(lengths[idx].max())

    full = dataclasses.replace(exp)
    full.rows = lambda i: tuple(
        t[i] for t in (exp.ids, exp.attn, exp.pos, exp.cmask, exp.old_logp, exp.values,
                       exp.advantages, exp.returns)
    )  # fmt: skip
    grads, losses = [], []
    for e in (exp, full):
        trainer.optimizer.zero_grad(set_to_none=True)
        parts = update.backward(
            trainer.accelerator, trainer.wrapped, trainer.cfg, e, idx, 1.0, True,
            lambda *a: None,
        )  # fmt: skip
        losses.append(parts)
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters()
                      if p.grad is not None})  # fmt: skip
    assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-6)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], rtol=1e-4, atol=1e-6), name
