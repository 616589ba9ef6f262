"""The PPO loop: rollouts → scores → KL → GAE → clipped updates, with checkpoints and resume."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from alignkit.finite import NonFiniteError, nonfinite_names, stop_message
from alignkit.rundir import STAGE_FILE
from alignkit.stages import ppo_core as core
from alignkit.stages.ppo_model import (
    HELDOUT_REWARD,
    REFERENCE,
    REWARD,
    VALUE,
    SharedBaseRewardModel,
    build_ppo_model,
)


class RunningMoments:
    """Mean and std of every score seen so far (Chan et al.'s parallel update)."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def update(self, xs: torch.Tensor) -> None:
        n, mean, var = (
            len(xs),
            xs.mean().item(),
            xs.var(unbiased=False).item() if len(xs) > 1 else 0.0,
        )
        total = self.count + n
        delta = mean - self.mean
        self.var = (self.var * self.count + var * n + delta**2 * self.count * n / total) / total
        self.mean += delta * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 1e-8))


ROLLOUT_ADAPTER = "rollout-adapter"  # the policy as the vLLM engine last received it


def make_vllm_engine(cfg, ctx):
    """A vLLM engine on the run's base and tokenizer; the policy adapter arrives per step."""
    from alignkit.models import ADAPTER_DIR, resolve_model_path
    from alignkit.rollouts.source import ModelSource
    from alignkit.rollouts.vllm import VLLMConfig, VLLMEngine

    rollout, parent = cfg.rollout, ctx.parent.dir
    source = ModelSource(
        ctx.model, resolve_model_path(ctx.model), str(parent), parent / ADAPTER_DIR
    )
    config = VLLMConfig(
        gpu_memory_utilization=rollout.gpu_memory_utilization,
        tensor_parallel_size=rollout.tensor_parallel_size,
        enable_sleep_mode=rollout.sleep,
        max_lora_rank=rollout.max_lora_rank,
        max_model_len=rollout.max_model_len,
        seed=ctx.seed,
    )
    return VLLMEngine(source, config)


class PPOTrainer:
    def __init__(self, cfg, ctx, reward_dirs: dict[str, Path]):
        from accelerate import Accelerator

        from alignkit.data.prompts import load_prompts
        from alignkit.rewards.registry import resolve_rewards
        from alignkit.rewards.reward_model import RewardModelScorer
        from alignkit.rollouts.hf import HFEngine

        self.cfg, self.ctx = cfg, ctx
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        torch.manual_seed(ctx.seed)
        data = cfg.data
        self.prompts = load_prompts(
            data.source, data.split, data.on_bad_rows, data.max_bad_fraction
        ).rows
        if data.max_rows is not None:
            self.prompts = self.prompts[: data.max_rows]
        self.model, self.tokenizer = build_ppo_model(
            ctx.model, ctx.parent.dir, cfg.value_adapter, reward_dirs
        )
        self.model.to(self.accelerator.device)
        scorers = {
            name: RewardModelScorer(
                SharedBaseRewardModel(self.model, self.tokenizer.pad_token_id, name),
                self.tokenizer,
                max_length=json.loads((rm_dir / STAGE_FILE).read_text())["outputs"].get(
                    "max_length", 1024
                ),
            )
            for name, rm_dir in reward_dirs.items()
        }
        self.scorer = scorers.get(REWARD)
        # what the training RM's sanity probe found (rewards/sanity.py), for the health check
        self.rm_flagged = (
            json.loads((reward_dirs[REWARD] / STAGE_FILE).read_text())["metrics"].get(
                "rm_probe/flagged", 0.0
            )
            if REWARD in reward_dirs
            else 0.0
        )
        self.heldout_scorer = scorers.get(HELDOUT_REWARD)
        self.heldout_stats, self.proxy_stats = RunningMoments(), RunningMoments()
        self.reward_fn = resolve_rewards(cfg.rewards) if cfg.rewards else None
        self.optimizer = torch.optim.AdamW(
            [
                {"params": self.model.policy_parameters(), "lr": cfg.learning_rate},
                {"params": self.model.value_parameters(), "lr": cfg.value_learning_rate},
            ]
        )
        if cfg.rollout.engine == "vllm":
            self.engine = make_vllm_engine(cfg, ctx)
        else:
            self.engine = HFEngine(
                self.model.peft, self.tokenizer, batch_size=cfg.rollout.batch_size
            )
        self.synced_step: int | None = None  # the policy step the vLLM engine serves
        from alignkit.eval.views import AdapterView
        from alignkit.stages.common import health_monitor

        peft = self.model.peft
        self.health = health_monitor(
            cfg, ctx, AdapterView(peft, "default"), AdapterView(peft, REFERENCE), self.tokenizer
        )
        self.kl = core.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        self.score_stats = RunningMoments()
        self.step = 0
        self._recent = None
        self.last_checkpoint: str | None = None
        if ctx.resume_from is not None:
            self._load(ctx.resume_from)

    # --- the loop ---------------------------------------------------------------------------
    def train(self) -> dict[str, float]:
        history: list[dict] = []
        if self.health is not None and not self.health.monitor.has_baseline:
            self.health.check(self.step, {"rm_flagged": self.rm_flagged})
        bar = tqdm(
            range(self.step, self.cfg.steps), initial=self.step, total=self.cfg.steps, desc="ppo"
        )
        for step in bar:
            self.step = step + 1
            t0 = time.time()
            exp = self._experience(step)
            t_gen = exp.pop("gen_seconds")
            stats = self._update(exp)
            stats.update(exp["stats"], gen_seconds=t_gen, step_seconds=time.time() - t0)
            stats["gen_tokens_per_s"] = exp["stats"]["completion_tokens"] / max(t_gen, 1e-9)
            stats["train_tokens_per_s"] = (
                self.cfg.ppo_epochs
                * exp["stats"]["train_tokens"]
                / max(time.time() - t0 - t_gen, 1e-9)
            )
            if self.cfg.adaptive_kl:
                self.kl.update(stats["kl"], len(exp["scores"]))
            record = {"step": self.step, **{k: float(v) for k, v in stats.items()}}
            history.append(record)
            if self.ctx.is_main:
                with self.ctx.metrics_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            bar.set_postfix(reward=f"{stats['score_mean']:.3f}", kl=f"{stats['kl']:.2f}")
            if self.health is not None and self.step % self.cfg.health.every == 0:
                trained = {"reward": stats["score_mean"]}
                if "heldout_rm_score" in stats:
                    trained["heldout_reward"] = stats["heldout_rm_score"]
                self.health.check(self.step, trained)  # before saving
            if self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.steps:
                self._save()
        shutil.rmtree(self.ctx.out_dir / ROLLOUT_ADAPTER, ignore_errors=True)
        if self.ctx.is_main and self.ctx.metrics_path.exists():  # the whole run, resumes included
            history = [json.loads(x) for x in self.ctx.metrics_path.read_text().splitlines()]
        last = history[-min(10, len(history)) :] if history else []
        summary = {
            k: sum(r[k] for r in last) / len(last) for k in (last[0] if last else {}) if k != "step"
        }
        summary["global_step"] = float(self.step)
        return summary

    @torch.no_grad()
    def _experience(self, step: int) -> dict:
        from alignkit.rollouts.types import SamplingConfig

        cfg, model = self.cfg, self.model
        prompts = self._prompts_for(step)
        t0 = time.time()
        sampling = SamplingConfig(
            n=1, temperature=cfg.temperature, top_k=0, top_p=1.0,
            max_new_tokens=cfg.max_new_tokens, seed=self.ctx.seed * 100003 + step,
        )  # fmt: skip
        batch = self._generate(prompts, sampling)
        gen_seconds = time.time() - t0
        ids, attn, pos, cmask, P = self._pack(batch.prompt_ids, batch.completion_ids)
        self._recent = (ids[:4], attn[:4], pos[:4], P)  # for the check before a checkpoint
        scores_raw = self._scores(prompts, batch)
        scores = self._shape_scores(scores_raw, batch.finish_reason)
        model.eval()
        old_logp = self._logprobs(model.logits(ids, attn, pos), ids, P)
        with model.role(REFERENCE):
            ref_logp = self._logprobs(model.logits(ids, attn, pos), ids, P)
        values = self._values(ids, attn, pos, P)
        kl = core.kl_estimate(old_logp, ref_logp, cfg.kl_estimator) * cmask
        rewards = core.token_rewards(scores, kl, cmask, self.kl.value)
        if cfg.whiten_rewards:
            rewards = core.masked_whiten(rewards, cmask, shift_mean=False)
        advantages, returns = core.gae(rewards, values, cmask, cfg.gamma, cfg.lam)
        advantages = core.masked_whiten(advantages, cmask)
        lengths = cmask.sum(1)
        stats = {
            **self._heldout_scores(prompts, batch, scores_raw),
            "score_mean": scores_raw.mean().item(),
            "score_std": scores_raw.std().item() if len(scores_raw) > 1 else 0.0,
            "kl": (core.kl_estimate(old_logp, ref_logp, "k1") * cmask).sum(1).mean().item(),
            "kl_coef": self.kl.value,
            "response_length": lengths.float().mean().item(),
            "eos_rate": sum(r == "stop" for r in batch.finish_reason) / len(batch),
            "completion_tokens": float(lengths.sum().item()),
            "train_tokens": float(attn.sum().item()),
        }
        return {
            "ids": ids, "attn": attn, "pos": pos, "cmask": cmask, "P": P, "old_logp": old_logp,
            "values": values, "advantages": advantages, "returns": returns, "scores": scores,
            "stats": stats, "gen_seconds": gen_seconds,
        }  # fmt: skip

    def _update(self, exp: dict) -> dict[str, float]:
        cfg, model, acc = self.cfg, self.model, self.accelerator
        model.train()
        B, P = exp["ids"].shape[0], exp["P"]
        mb = B // cfg.minibatches
        micro = cfg.micro_batch_size or mb
        gen = torch.Generator().manual_seed(self.ctx.seed * 7919 + self.step)
        sums: dict[str, float] = {}
        n = 0
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(B, generator=gen)
            for start in range(0, B, mb):
                idx_mb = order[start : start + mb]
                for c in range(0, len(idx_mb), micro):
                    idx = idx_mb[c : c + micro]
                    frac = len(idx) / len(idx_mb)
                    ids, attn, pos, cmask = (exp[k][idx] for k in ("ids", "attn", "pos", "cmask"))
                    logits = model.logits(ids, attn, pos)
                    logp = self._logprobs(logits, ids, P)
                    pl = core.policy_loss(
                        logp, exp["old_logp"][idx], exp["advantages"][idx], cmask, cfg.clip_range
                    )
                    entropy = core.masked_mean(
                        core.entropy_from_logits(self._completion(logits, P, ids)), cmask
                    )
                    loss = pl.loss - cfg.entropy_coef * entropy
                    self._check_finite("policy loss", loss)
                    acc.backward(loss * frac)  # before switching adapters (see ppo_model)
                    with model.role(VALUE):
                        v = self._values(ids, attn, pos, P)
                        vl, vclip = core.value_loss(
                            v, exp["values"][idx], exp["returns"][idx], cmask, cfg.value_clip_range
                        )
                        self._check_finite("value loss", vl)
                        acc.backward(cfg.vf_coef * vl * frac)
                    for k, val in (("policy_loss", pl.loss), ("clip_fraction", pl.clip_fraction),
                                   ("approx_kl", pl.approx_kl), ("entropy", entropy),
                                   ("value_loss", vl), ("value_clip_fraction", vclip)):  # fmt: skip
                        sums[k] = sums.get(k, 0.0) + float(val.detach()) * frac
                torch.nn.utils.clip_grad_norm_(model.policy_parameters(), cfg.max_grad_norm)
                torch.nn.utils.clip_grad_norm_(model.value_parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                n += 1
        stats = {k: v / n for k, v in sums.items()}
        stats["explained_variance"] = core.explained_variance(
            exp["values"], exp["returns"], exp["cmask"]
        )
        return stats

    # --- pieces -----------------------------------------------------------------------------
    def _generate(self, prompts, sampling):
        """HF generates with the live policy; vLLM first gets the policy adapter as of now."""
        if self.cfg.rollout.engine != "vllm":
            return self.engine.generate(prompts, sampling)
        if self.cfg.rollout.sleep:
            self.engine.wake_up()
        if self.synced_step != self.step:
            self.engine.update_adapter(self._export_policy())
            self.synced_step = self.step
        batch = self.engine.generate(prompts, sampling)
        if self.cfg.rollout.sleep:
            self.engine.sleep(level=1)
        return batch

    def _export_policy(self) -> Path:
        """Save the policy adapter (alone) where vLLM reads it; the previous copy is replaced."""
        root = self.ctx.out_dir / ROLLOUT_ADAPTER
        target = root / f"step-{self.step}"
        shutil.rmtree(target, ignore_errors=True)
        self.model.peft.save_pretrained(str(target), selected_adapters=["default"])
        for old in root.glob("step-*"):
            if old != target:
                shutil.rmtree(old, ignore_errors=True)
        return target

    def _prompts_for(self, step: int) -> list:
        """Prompts of one step: a seeded permutation per pass over the data (resume-safe)."""
        k, n = self.cfg.prompts_per_step, len(self.prompts)
        out = []
        for j in range(step * k, (step + 1) * k):
            epoch, i = divmod(j, n)
            order = torch.randperm(
                n, generator=torch.Generator().manual_seed(self.ctx.seed + epoch)
            )
            out.append(self.prompts[order[i]]["prompt"])
        return out

    def _pack(self, prompt_ids, completion_ids):
        """[B, P+T] ids: prompts left-padded to P, completions right-padded to T."""
        pad = self.tokenizer.pad_token_id
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
        dev = self.accelerator.device
        return ids.to(dev), attn.to(dev), pos.to(dev), cmask.to(dev), P

    def _completion(self, logits, P, ids):
        T = ids.shape[1] - P
        return logits[:, P - 1 : P - 1 + T].float() / self.cfg.temperature

    def _logprobs(self, logits, ids, P):
        lp = torch.log_softmax(self._completion(logits, P, ids), dim=-1)
        return lp.gather(-1, ids[:, P:].unsqueeze(-1)).squeeze(-1)

    def _values(self, ids, attn, pos, P):
        switch = self.model.peft.active_adapter != VALUE
        with self.model.role(VALUE) if switch else nullcontext():
            hidden = self.model.hidden(ids, attn, pos)
        T = ids.shape[1] - P
        return self.model.value_head(hidden[:, P - 1 : P - 1 + T].float()).squeeze(-1)

    def _scores(self, prompts, batch) -> torch.Tensor:
        """Raw scores of the rollouts as generated: a truncated answer is scored truncated."""
        texts, meta = batch.completion_text, {"finish_reason": batch.finish_reason}
        total = torch.zeros(len(texts))
        if self.scorer is not None:
            total += torch.tensor(self.scorer(prompts, texts, **meta), dtype=torch.float)
        if self.reward_fn is not None:
            total += torch.tensor(self.reward_fn(prompts, texts, **meta), dtype=torch.float)
        return total.to(self.accelerator.device)

    def _heldout_scores(self, prompts, batch, scores_raw: torch.Tensor) -> dict[str, float]:
        """What the held-out RM says of these rollouts, each RM's scores in units of its own
        first step (the starting policy): ``heldout_rm_score`` (its mean), ``proxy_score``
        (the training score's mean in the same units) and ``rm_disagreement`` (mean absolute
        difference per sample: grows when the policy writes what the two RMs never learned)."""
        if self.heldout_scorer is None:
            return {}
        held = torch.tensor(
            self.heldout_scorer(prompts, batch.completion_text, finish_reason=batch.finish_reason)
        )
        proxy = scores_raw.detach().cpu().float()
        for stats, values in ((self.heldout_stats, held), (self.proxy_stats, proxy)):
            if stats.count == 0:
                stats.update(values)
        z_held = (held - self.heldout_stats.mean) / self.heldout_stats.std
        z_proxy = (proxy - self.proxy_stats.mean) / self.proxy_stats.std
        return {
            "heldout_rm_score": z_held.mean().item(),
            "proxy_score": z_proxy.mean().item(),
            "rm_disagreement": (z_proxy - z_held).abs().mean().item(),
        }

    def _shape_scores(self, raw: torch.Tensor, finish_reason: list[str]) -> torch.Tensor:
        """Normalise (fixed or running statistics), clip, then subtract the missing-EOS penalty."""
        cfg, stats = self.cfg, self.score_stats
        if cfg.normalize_scores == "running" or (
            cfg.normalize_scores == "fixed" and stats.count == 0
        ):
            stats.update(raw.cpu())
        scores = raw if cfg.normalize_scores == "none" else (raw - stats.mean) / stats.std
        if cfg.score_clip is not None:
            scores = scores.clamp(-cfg.score_clip, cfg.score_clip)
        cut = torch.tensor([r == "length" for r in finish_reason], dtype=scores.dtype)
        return scores - cfg.eos_penalty * cut.to(scores.device)

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
            logits = self.model.logits(ids, attn, pos)
            values = self._values(ids, attn, pos, P)
            bad = [n for n, t in (("policy logits", logits), ("values", values))
                   if not torch.isfinite(t).all()]  # fmt: skip
        if bad:
            what = f"non-finite {', '.join(bad)} after the update"
            raise NonFiniteError(
                stop_message(self.ctx.where, what, self.step, self.last_checkpoint)
            )

    # --- checkpoints ------------------------------------------------------------------------
    def _save(self) -> None:
        from peft import get_peft_model_state_dict

        self._check_weights()  # every rank: the same weights, and a raise must stop them all
        if not self.ctx.is_main:
            return
        root = self.ctx.checkpoint_dir
        final = root / f"checkpoint-{self.step}"
        tmp = root / f".checkpoint-{self.step}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        peft = self.model.peft
        state = {
            "policy": get_peft_model_state_dict(peft, adapter_name="default"),
            "value": get_peft_model_state_dict(peft, adapter_name=VALUE),
            "value_head": self.model.value_head.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "kl_coef": self.kl.value,
            "score_stats": vars(self.score_stats),
            "heldout_stats": vars(self.heldout_stats),
            "proxy_stats": vars(self.proxy_stats),
            "torch_rng": torch.get_rng_state(),
            "step": self.step,
        }
        torch.save(state, tmp / "state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({"global_step": self.step}))
        os.replace(tmp, final)
        self.last_checkpoint = final.name
        kept = sorted(root.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        for old in kept[: -self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def _load(self, path: Path) -> None:
        from peft import set_peft_model_state_dict

        # tensors, numbers and dicts only: a crafted checkpoint cannot run code on resume
        state = torch.load(path / "state.pt", weights_only=True)
        set_peft_model_state_dict(self.model.peft, state["policy"], adapter_name="default")
        set_peft_model_state_dict(self.model.peft, state["value"], adapter_name=VALUE)
        self.model.value_head.load_state_dict(state["value_head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.kl.value = state["kl_coef"]
        vars(self.score_stats).update(state["score_stats"])
        vars(self.heldout_stats).update(state.get("heldout_stats", {}))
        vars(self.proxy_stats).update(state.get("proxy_stats", {}))
        torch.set_rng_state(state["torch_rng"])
        self.step = state["step"]
        self.last_checkpoint = path.name
