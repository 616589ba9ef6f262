"""The PPO loop, read top to bottom: setup (data, model, scoring, optimizer, accelerator,
rollout engine, resume) → per step: rollout → score → advantages → update → log and health →
checkpoint. Rollouts live in :mod:`alignkit.stages.ppo_rollout`, checkpoints in
:mod:`alignkit.stages.ppo_checkpoint`, the maths in :mod:`alignkit.stages.ppo_core`."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from tqdm.auto import tqdm

from alignkit.data.prompts import load_prompts
from alignkit.data.split import training_rows
from alignkit.errors import UserError
from alignkit.finite import NonFiniteError, nonfinite_names, stop_message
from alignkit.handoff import PolicyPair, StageOutput
from alignkit.health import HealthStop
from alignkit.rewards.registry import WeightedReward, resolve_reward, resolve_rewards
from alignkit.rewards.reward_model import RewardModelScorer
from alignkit.rollouts.types import RolloutBatch
from alignkit.stages import ppo_core as core
from alignkit.stages import ppo_update as update
from alignkit.stages.common import data_context, health_monitor
from alignkit.stages.ppo_checkpoint import read_checkpoint, restore_checkpoint, save_checkpoint
from alignkit.stages.ppo_model import (
    HELDOUT_REWARD,
    REWARD,
    VALUE,
    SharedBaseRewardModel,
    build_ppo_model,
)
from alignkit.stages.ppo_rollout import ROLLOUT_ADAPTER, PolicyRollouts, pack, prompts_for
from alignkit.stages.ppo_scores import Scoring

__all__ = ["ROLLOUT_ADAPTER", "PPOTrainer"]


class PPOTrainer:
    # --- setup ------------------------------------------------------------------------------
    def __init__(
        self, cfg, ctx, reward_dirs: dict[str, Path], reward_model_apart: Path | None = None
    ):
        """``reward_dirs``: reward_model stages that run as adapters on PPO's base, by role
        (``reward`` trains, ``heldout_reward`` watches); ``reward_model_apart``: the training
        reward_model stage when it is on another base (loaded on its own).

        Everything the loop needs, built in a fixed order (the seeded RNG draws depend on
        it): accelerator → prompts → model (four adapters) → scoring → optimizer (prepared) →
        rollout engine → health monitor → KL controller → the checkpoint to resume from."""
        self.cfg, self.ctx = cfg, ctx
        # the update's policy and value passes each use part of the trainable parameters
        ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[ddp])
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        torch.manual_seed(ctx.seed)
        self.prompts = self._load_prompts()
        self.model, self.tokenizer = build_ppo_model(
            ctx.model, ctx.parent.dir, cfg.value_adapter, reward_dirs
        )
        self.model.to(self.accelerator.device)
        self.scoring, self.rm_flagged = self._build_scoring(reward_dirs, reward_model_apart)
        optimizer = torch.optim.AdamW(
            [
                {"params": self.model.policy_parameters(), "lr": cfg.learning_rate},
                {"params": self.model.value_parameters(), "lr": cfg.value_learning_rate},
            ]
        )
        # the policy/value forward of the update runs through the wrapper (DDP under torchrun or
        # accelerate launch; the model itself on one process): its gradients are averaged
        self.wrapped, self.optimizer = self.accelerator.prepare(self.model, optimizer)
        self.rollouts = PolicyRollouts(cfg, ctx, self.model, self.tokenizer, self.rank, self.world)
        pair = PolicyPair.of(self.model.peft)
        self.health = health_monitor(cfg, ctx, pair.policy, pair.reference, self.tokenizer)
        self.kl = core.AdaptiveKLController(
            cfg.kl_coef, cfg.kl_target, cfg.kl_horizon, cfg.kl_overshoot_gain
        )
        self.step = 0
        self._recent = None  # a few of the last step's sequences, for the check before a save
        self.last_checkpoint: str | None = None
        if ctx.resume_from is not None:
            self._load(ctx.resume_from)

    def _load_prompts(self) -> list[dict]:
        cfg = self.cfg
        return training_rows(cfg.data, load_prompts, data_context(self.ctx, cfg.data, cfg.heldout))

    def _build_scoring(
        self, reward_dirs: dict[str, Path], reward_model_apart: Path | None
    ) -> tuple[Scoring, float]:
        """The scoring of rollouts and what the training RM's sanity probe flagged
        (rewards/sanity.py), for the health check. The training reward is one weighted sum: the
        run's reward model (the ``reward`` adapter on the shared base, or ``reward_model_apart``,
        a model loaded on its own) and the ``rewards`` functions."""
        cfg = self.cfg
        reward_stages = {name: StageOutput.read(rm_dir) for name, rm_dir in reward_dirs.items()}
        scorers = {
            name: RewardModelScorer(
                SharedBaseRewardModel(self.model, self.tokenizer.pad_token_id, name),
                self.tokenizer,
                max_length=rm.record["outputs"].get("max_length", 1024),
            )
            for name, rm in reward_stages.items()
        }
        rm_name = cfg.reward_model or REWARD
        components = [(rm_name, scorers[REWARD], 1.0)] if REWARD in scorers else []
        if reward_model_apart is not None:
            components.append((rm_name, resolve_reward(str(reward_model_apart))[1], 1.0))
        components += resolve_rewards(cfg.rewards).components
        try:
            reward = WeightedReward(components)  # refuses a reward named twice
        except UserError as e:
            raise UserError(
                f"{self.ctx.where}.rewards: {str(e).removeprefix('--reward: ')}"
            ) from None
        scoring = Scoring(cfg, reward, scorers.get(HELDOUT_REWARD), self._gather)
        flagged = (
            reward_stages[REWARD].record["metrics"].get("rm_probe/flagged", 0.0)
            if REWARD in reward_stages
            else 0.0
        )
        return scoring, flagged

    # --- the loop ---------------------------------------------------------------------------
    def train(self, heldout: Callable[[], dict[str, float]] | None = None) -> dict[str, float]:
        """Run the remaining steps; the mean of the last ten steps' statistics. ``heldout``:
        the stage's held-out evaluation, for a sweep trial's intermediate values."""
        if self.health is not None and not self.health.monitor.has_baseline:
            self._health_check({"rm_flagged": self.rm_flagged})
        bar = tqdm(
            range(self.step, self.cfg.steps),
            initial=self.step,
            total=self.cfg.steps,
            desc="ppo",
            disable=not self.ctx.is_main,
        )
        history: list[dict] = []
        for step in bar:
            self.step = step + 1
            t0 = time.time()
            exp = self._experience(step)
            stats = self._mean_over_ranks({**self._update(exp), **exp.stats})
            self._add_timings(stats, exp, t0)
            if self.cfg.adaptive_kl:  # every rank: the KL of all ranks' samples
                self.kl.update(stats["kl"], len(exp.scores) * self.world)
            history.append(self._log(stats))
            bar.set_postfix(reward=f"{stats['score_mean']:.3f}", kl=f"{stats['kl']:.2f}")
            if self.health is not None and self.step % self.cfg.health.every == 0:
                self._health_check(self._trained(stats))  # before saving
            trial = self.ctx.trial
            if trial is not None and trial.due(self.step):  # may stop a sweep's trial here
                metrics = stats if trial.objective in stats or heldout is None else heldout()
                trial.report(self.step, metrics)
            if self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.steps:
                self._save()
        self.rollouts.close()
        return self._summary(history)

    @torch.no_grad()
    def _experience(self, step: int) -> core.Experience:
        """Rollout → score → log-probs, reference log-probs and values → KL-penalised rewards →
        GAE advantages (whitened over every rank's tokens)."""
        cfg = self.cfg
        prompts = self._prompts_for(step)
        t0 = time.time()
        batch = self._rollout(prompts, step)
        gen_seconds = time.time() - t0
        t1 = time.time()
        ids, attn, pos, cmask, P = pack(
            batch.prompt_ids, batch.completion_ids, self.tokenizer.pad_token_id,
            self.accelerator.device,
        )  # fmt: skip
        self._recent = (ids[:4], attn[:4], pos[:4], P)
        scores_raw = self.scoring.raw(prompts, batch).to(self.accelerator.device)
        scores = self.scoring.shape(scores_raw, batch.finish_reason)
        old_logp, ref_logp, values = update.price(self.model, ids, attn, pos, P, cfg.temperature)
        kl = core.kl_estimate(old_logp, ref_logp, cfg.kl_estimator) * cmask
        rewards = core.token_rewards(scores, kl, cmask, self.kl.value)
        all_sum = self._all_sum if self.world > 1 else None
        if cfg.whiten_rewards:
            rewards = core.masked_whiten(rewards, cmask, shift_mean=False, all_sum=all_sum)
        advantages, returns = core.gae(rewards, values, cmask, cfg.gamma, cfg.lam)
        advantages = core.masked_whiten(advantages, cmask, all_sum=all_sum)
        lengths = cmask.sum(1)
        stats = {
            **self.scoring.heldout(prompts, batch, scores_raw),
            "score_mean": scores_raw.mean().item(),
            "score_std": scores_raw.std().item() if len(scores_raw) > 1 else 0.0,
            "kl": (core.kl_estimate(old_logp, ref_logp, "k1") * cmask).sum(1).mean().item(),
            "kl_coef": self.kl.value,
            "response_length": lengths.float().mean().item(),
            "eos_rate": sum(r == "stop" for r in batch.finish_reason) / len(batch),
            "completion_tokens": float(lengths.sum().item()),
            "train_tokens": float(attn.sum().item()),
            # scoring: the reward, the policy's and the reference's log-probs, values and GAE
            "score_seconds": time.time() - t1,
        }
        return core.Experience(
            ids, attn, pos, cmask, P, old_logp, values, advantages, returns, scores, stats,
            gen_seconds,
        )  # fmt: skip

    def _prompts_for(self, step: int) -> list:
        cfg, ctx = self.cfg, self.ctx
        return prompts_for(
            self.prompts, step, cfg.prompts_per_step, self.rank, self.world, ctx.seed
        )

    def _rollout(self, prompts: list, step: int) -> RolloutBatch:
        """One completion per prompt from the policy, seeded per run, step and rank."""
        sampling = self.cfg.sampling(self.ctx.seed * 100003 + step + 7919 * self.rank)
        return self.rollouts.generate(prompts, sampling, self.step)

    def _update(self, exp: core.Experience) -> dict[str, float]:
        """``ppo_epochs`` passes of clipped policy and value updates over minibatches; each
        micro-batch is one forward through the wrapped model and one backward (gradients are
        averaged across ranks on a minibatch's last micro-batch only)."""
        cfg, acc = self.cfg, self.accelerator
        self.model.train()
        B = exp.ids.shape[0]
        mb = B // cfg.minibatches
        micro = cfg.micro_batch_size or mb
        gen = torch.Generator().manual_seed(self.ctx.seed * 7919 + self.step)
        sums: dict[str, float] = {}
        n = 0
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(B, generator=gen)
            for start in range(0, B, mb):
                idx_mb = order[start : start + mb]
                chunks = [idx_mb[c : c + micro] for c in range(0, len(idx_mb), micro)]
                for k, idx in enumerate(chunks):
                    weight = len(idx) / len(idx_mb)
                    losses = update.backward(
                        acc, self.wrapped, cfg, exp, idx, weight, k == len(chunks) - 1,
                        self._check_finite,
                    )  # fmt: skip
                    for key, val in losses.items():
                        sums[key] = sums.get(key, 0.0) + float(val) * weight
                acc.clip_grad_norm_(self.model.policy_parameters(), cfg.max_grad_norm)
                acc.clip_grad_norm_(self.model.value_parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                n += 1
        stats = {k: v / n for k, v in sums.items()}
        stats["explained_variance"] = core.explained_variance(exp.values, exp.returns, exp.cmask)
        return stats

    # --- log, health, summary ---------------------------------------------------------------
    def _add_timings(self, stats: dict[str, float], exp: core.Experience, t0: float) -> None:
        t_gen = exp.gen_seconds
        stats.update(gen_seconds=t_gen, step_seconds=time.time() - t0)
        stats["gen_tokens_per_s"] = exp.stats["completion_tokens"] / max(t_gen, 1e-9)
        stats["train_tokens_per_s"] = (
            self.cfg.ppo_epochs * exp.stats["train_tokens"] / max(time.time() - t0 - t_gen, 1e-9)
        )

    def _log(self, stats: dict[str, float]) -> dict[str, float]:
        """The step's record, appended to metrics.jsonl and sent to the run's trackers
        (``train/<name>``) by the main process."""
        record = {"step": self.step, **{k: float(v) for k, v in stats.items()}}
        if self.ctx.is_main:
            with self.ctx.metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            self.ctx.tracker.log(stats, self.step)
        return record

    @staticmethod
    def _trained(stats: dict[str, float]) -> dict[str, float]:
        """What the health check compares with its baseline."""
        trained = {"reward": stats["score_mean"]}
        if "heldout_rm_score" in stats:
            trained["heldout_reward"] = stats["heldout_rm_score"]
        return trained

    def _summary(self, history: list[dict]) -> dict[str, float]:
        """Mean of the last ten steps of the whole run (resumes included) and the step."""
        if self.ctx.is_main and self.ctx.metrics_path.exists():
            history = [json.loads(x) for x in self.ctx.metrics_path.read_text().splitlines()]
        last = history[-min(10, len(history)) :] if history else []
        summary = {
            k: sum(r[k] for r in last) / len(last) for k in (last[0] if last else {}) if k != "step"
        }
        summary["global_step"] = float(self.step)
        return summary

    # --- across ranks -----------------------------------------------------------------------
    def _all_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(t.clone(), "sum")

    def _mean_over_ranks(self, stats: dict[str, float]) -> dict[str, float]:
        """Logged statistics as the mean of every rank's (one reduce for all of them)."""
        if self.world == 1:
            return stats
        keys = sorted(stats)
        values = torch.tensor([float(stats[k]) for k in keys], device=self.accelerator.device)
        mean = self.accelerator.reduce(values, "mean")
        return dict(zip(keys, mean.tolist(), strict=True))

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's values of ``t`` (one process: ``t`` itself)."""
        return t if self.world == 1 else self.accelerator.gather(t.to(self.accelerator.device))

    def _health_check(self, trained: dict[str, float]) -> None:
        """Rank 0 probes and judges; a stop it decides stops every rank at the same step."""
        stop: HealthStop | None = None
        if self.ctx.is_main:
            try:
                self.health.check(self.step, trained)
            except HealthStop as e:
                stop = e
        if self.world > 1:
            flag = torch.tensor([1.0 if stop else 0.0], device=self.accelerator.device)
            if self.accelerator.reduce(flag, "sum").item() > 0 and stop is None:
                stop = HealthStop(f"{self.ctx.where}: stopped by a health check (see rank 0)")
        if stop is not None:
            raise stop

    # --- model forwards and finiteness ------------------------------------------------------
    def _check_finite(self, what: str, value: torch.Tensor) -> None:
        if not torch.isfinite(value).all():
            where = self.last_checkpoint or "none yet"
            raise NonFiniteError(
                f"{self.ctx.where}: non-finite {what} at step {self.step}; stopped. Last good "
                f"checkpoint: {where} (kept; a re-run with the same config resumes there). "
                "Lower learning_rate or raise kl_coef."
            )

    @torch.no_grad()
    def _check_weights(self) -> None:
        """Before a checkpoint: the trainable tensors are finite and still give finite logits
        and values on a few of this step's sequences (weights that exploded without yet
        overflowing would make the next step fail, and a resume would start from them)."""
        bad = nonfinite_names((n, p) for n, p in self.model.named_parameters() if p.requires_grad)
        if not bad and self._recent is not None:
            ids, attn, pos, P = self._recent
            self.model.eval()
            logits = self.model.completion_logits(ids, attn, pos, P)
            values = self.model(ids, attn, pos, P, VALUE)
            bad = [n for n, t in (("policy logits", logits), ("values", values))
                   if not torch.isfinite(t).all()]  # fmt: skip
        if bad:
            what = f"non-finite {', '.join(bad)} after the update"
            raise NonFiniteError(
                stop_message(self.ctx.where, what, self.step, self.last_checkpoint)
            )

    # --- checkpoints ------------------------------------------------------------------------
    def _save(self) -> None:
        self._check_weights()  # every rank: the same weights, and a raise must stop them all
        if not self.ctx.is_main:
            return
        self.last_checkpoint = save_checkpoint(
            self.ctx.checkpoint_dir, self.step, self.model, self.optimizer, self.kl,
            self.scoring, self.cfg.keep_checkpoints,
        )  # fmt: skip

    def _load(self, path: Path) -> None:
        state = read_checkpoint(path)  # first: nothing is touched unless it loads safely
        self.step = restore_checkpoint(state, self.model, self.optimizer, self.kl, self.scoring)
        self.last_checkpoint = path.name
