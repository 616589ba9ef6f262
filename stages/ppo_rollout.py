"""PPO's rollout side: which prompts a rank samples at a step, the engine that samples them (the
live policy on HF, or vLLM handed the policy adapter before each step) and the padded batch
the update reads."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from alignkit.models import ADAPTER_DIR, resolve_model_path
from alignkit.rollouts import make_engine
from alignkit.rollouts.source import ModelSource
from alignkit.rollouts.types import RolloutBatch, SamplingSpec
from alignkit.stages.ppo_model import POLICY

ROLLOUT_ADAPTER = "rollout-adapter"  # the policy as the vLLM engine last received it


class PolicyRollouts:
    """Samples the policy as it is now: HF generates with the live adapter; vLLM first gets a
    copy of it (once per step) in ``<out_dir>/rollout-adapter`` (one copy per rank)."""

    def __init__(self, cfg, ctx, model, tokenizer, rank: int, world: int):
        self.cfg, self.ctx, self.model, self.rank, self.world = cfg, ctx, model, rank, world
        self.vllm = cfg.rollout.engine == "vllm"
        if self.vllm:  # the run's base and the SFT adapter; the policy adapter comes per step
            parent = ctx.parent.dir
            source = ModelSource(
                ctx.model, resolve_model_path(ctx.model), str(parent), parent / ADAPTER_DIR
            )
            self.engine = make_engine("vllm", source, vllm=cfg.rollout.vllm_config(ctx.seed))
        else:
            self.engine = make_engine(
                "hf", model=model.peft, tokenizer=tokenizer, batch_size=cfg.rollout.batch_size
            )
        self.synced_step: int | None = None  # the policy step the vLLM engine serves

    def generate(self, prompts: list, sampling: SamplingSpec, step: int) -> RolloutBatch:
        """Completions of the policy after ``step`` updates."""
        if not self.vllm:
            return self.engine.generate(prompts, sampling)
        if self.cfg.rollout.vllm.enable_sleep_mode:
            self.engine.wake_up()
        if self.synced_step != step:
            self.engine.update_adapter(self._export_policy(step))
            self.synced_step = step
        batch = self.engine.generate(prompts, sampling)
        if self.cfg.rollout.vllm.enable_sleep_mode:
            self.engine.sleep(level=1)
        return batch

    def close(self) -> None:
        """Remove the adapter copies handed to vLLM (they are not part of the stage output)."""
        shutil.rmtree(self.ctx.out_dir / ROLLOUT_ADAPTER, ignore_errors=True)

    def _export_policy(self, step: int) -> Path:
        """Save the policy adapter (alone) where vLLM reads it; the previous copy is replaced."""
        root = self.ctx.out_dir / ROLLOUT_ADAPTER
        if self.world > 1:  # one engine per rank, each with its own copy
            root = root / f"rank-{self.rank}"
        target = root / f"step-{step}"
        shutil.rmtree(target, ignore_errors=True)
        self.model.peft.save_pretrained(str(target), selected_adapters=[POLICY])
        for old in root.glob("step-*"):
            if old != target:
                shutil.rmtree(old, ignore_errors=True)
        return target


def prompts_for(prompts: list[dict], step: int, per_step: int, rank: int, world: int, seed: int):
    """This rank's prompts of one step: a seeded permutation per pass over the data
    (resume-safe); rank r takes the r-th block of ``per_step`` of the step's
    ``per_step x world`` prompts."""
    n = len(prompts)
    first = (step * world + rank) * per_step
    out = []
    for j in range(first, first + per_step):
        epoch, i = divmod(j, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        out.append(prompts[order[i]]["prompt"])
    return out


def pack(prompt_ids, completion_ids, pad: int, device):
    """``ids, attn, pos`` [B, P+T] (prompts left-padded to P, completions right-padded to T),
    ``cmask`` [B, T] (1 on completion tokens) and ``P``, on ``device``."""
    P = max(len(p) for p in prompt_ids)
    T = max(len(c) for c in completion_ids)
    B = len(completion_ids)
    ids = torch.full((B, P + T), pad, dtype=torch.long)
    attn = torch.zeros((B, P + T), dtype=torch.long)
    cmask = torch.zeros((B, T))
    for b in range(B):
        p, c = prompt_ids[b], completion_ids[b]
        ids[b, P - len(p) : P] = torch.tensor(p)
        ids[b, P : P + len(c)] = torch.tensor(c)
        attn[b, P - len(p) : P + len(c)] = 1
        cmask[b, : len(c)] = 1
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), attn.to(device), pos.to(device), cmask.to(device), P
