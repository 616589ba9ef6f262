"""PPO on one frozen base with policy, reference, value and reward adapters.

Hand-written: TRL no longer ships a PPO trainer, and the alternatives hold four model copies.
One step: sample completions from the policy (rollout engine) → score them (the reward adapter
and/or reward functions, minus a penalty for no EOS) → per-token KL to the reference → GAE →
whitened advantages → ``ppo_epochs`` × minibatches of clipped policy and value updates. The
algorithm's tensor maths lives in :mod:`alignkit.stages.ppo_core`, the model in
:mod:`alignkit.stages.ppo_model`, the loop's bookkeeping in :mod:`alignkit.stages.ppo_loop`.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from alignkit.config import (
    AdapterSpec,
    DataSpec,
    ForgettingSpec,
    HeldoutSpec,
    MaxNewTokens,
    PolicyTemperature,
    SamplingSpec,
    StageBase,
)
from alignkit.data.fingerprint import data_record
from alignkit.errors import UserError
from alignkit.handoff import ADAPTER_DIR, PolicyPair
from alignkit.health import HealthSpec
from alignkit.models import save_stage_model
from alignkit.pipeline import StageContext, StageResult
from alignkit.rollouts.vllm import VLLMConfig
from alignkit.stages.common import (
    HELDOUT_DATA_KEYS,
    RolloutSpec,
    check_vllm,
    forgetting_evaluation,
    heldout_evaluation,
    refuse_unread_data_keys,
)
from alignkit.stages.ppo_loop import PPOTrainer
from alignkit.stages.ppo_model import HELDOUT_REWARD, REWARD

#: Health defaults when a reward model scores (a user's explicit setting wins): a hacked RM is
#: first seen as answers shrinking or filling with broken words.
RM_HEALTH = {"every": 10, "length_ratio": 1.5, "max_invalid": 0.1}


class PPORolloutSpec(RolloutSpec):
    """``vllm``: the engine receives the policy adapter before every step's rollouts, and
    ``vllm.enable_sleep_mode`` releases its GPU memory between rollouts (sleep level 1)."""

    batch_size: int = 64
    """HF engine: prompts per generate call."""

    @model_validator(mode="after")
    def _engine_seed(self) -> PPORolloutSpec:
        if "seed" in self.vllm.model_fields_set:
            raise ValueError(
                "vllm.seed: PPO seeds its vLLM engine from the run's seed (run.seed); remove it"
            )
        return self

    def vllm_config(self, seed: int) -> VLLMConfig:
        """The vLLM engine's settings, seeded by the run."""
        return self.vllm.model_copy(update={"seed": seed})


#: TRL-style trainer options (as in a ``train:`` block, or TRL's old PPOConfig) -> our field.
TRL_NAMES = {
    "max_steps": "steps",
    "total_episodes": "steps",
    "per_device_train_batch_size": "prompts_per_step",
    "num_mini_batches": "minibatches",
    "num_ppo_epochs": "ppo_epochs",
    "gradient_accumulation_steps": "micro_batch_size",
    "cliprange": "clip_range",
    "cliprange_value": "value_clip_range",
    "response_length": "max_new_tokens",
    "max_completion_length": "max_new_tokens",
    "save_steps": "checkpoint_every",
    "save_total_limit": "keep_checkpoints",
    "seed": "run.seed (the pipeline's seed)",
}


class PPOStageConfig(StageBase):
    """Our PPO: every knob is a field here. There is no TRL trainer for a ``train:`` block to
    reach, so one is refused, naming the field to use (``train.max_steps`` -> ``steps``)."""

    kind: Literal["ppo"] = "ppo"
    is_policy: ClassVar[bool] = True
    default_parent: ClassVar[bool] = True
    owned_options: ClassVar[dict[str, str]] = TRL_NAMES

    data: DataSpec
    """Prompts (any prompt source: prompt/messages/instruction rows, or preference/SFT rows)."""
    reward_model: str | None = None
    """Name of a reward_model stage of this run; on the same base it runs as a fourth adapter."""
    heldout_reward_model: str | None = None
    """A second reward_model stage PPO never trains on (another seed, or other data): every
    rollout is scored by it too (``heldout_rm_score``, normalised like the training score), and
    the health check ``reward_vs_heldout_rm`` trips when the training RM's score rises while this
    one falls: reward hacking seen without any gold reward."""
    rewards: list[str] = []
    """Reward specs added to the RM score: ``gold``, a rule, ``module:function``, ``spec*weight``."""
    normalize_scores: Literal["fixed", "running", "none"] = "fixed"
    """``fixed`` (default): scores minus the mean, over the std, of the first step's scores
    (the starting policy's samples), frozen from then on: the reward stays one fixed function,
    so the value head has a stationary target and a better answer scores the same at step 80
    as at step 1. ``running``: mean/std of every score so far (a moving target: the same answer
    scores lower as the policy improves). ``none``: raw scores. Normalise RM scores (their scale
    is arbitrary) before choosing kl_coef, score_clip and missing_eos_penalty. ``true``/``false``
    read as fixed/none."""
    score_clip: float | None = Field(5.0, gt=0)
    """Clip (normalised) scores to [-score_clip, score_clip]: one outlier score cannot dominate
    a batch's advantages. null: no clipping."""
    missing_eos_penalty: float | None = Field(None, ge=0)
    """Subtracted (after normalisation and clipping) from a completion that hit max_new_tokens
    without EOS. Default: 1.0 (one starting std) when a reward model scores, else 0: an RM reads
    a cut-off answer as if it were finished unless this says otherwise."""
    steps: int = Field(100, gt=0)
    """PPO steps: each samples ``prompts_per_step`` prompts, scores them and updates."""
    prompts_per_step: int = Field(64, gt=0)
    """Prompts sampled per step (per process under ``accelerate launch``), one completion each."""
    minibatches: int = Field(4, gt=0)
    """Minibatches each step's samples are split into per epoch (must divide prompts_per_step)."""
    ppo_epochs: int = Field(4, gt=0)
    """Passes over each step's samples (with fresh minibatch shuffles)."""
    micro_batch_size: int | None = None
    """Split each minibatch into chunks this size (gradient accumulation); default: no split."""
    learning_rate: float = Field(3e-4, gt=0)
    """AdamW learning rate of the policy adapter."""
    value_learning_rate: float = Field(1e-3, gt=0)
    """AdamW learning rate of the value adapter and value head."""
    kl_coef: float = Field(0.05, ge=0)
    """Per-token KL penalty coefficient towards the reference (the starting policy); the
    starting value when ``adaptive_kl`` is on."""
    adaptive_kl: bool = False
    """Move ``kl_coef`` towards ``kl_target`` (the adaptive controller of Ziegler et al.)."""
    kl_target: float = Field(1.5, gt=0)
    """Adaptive KL: target KL to the reference per sequence (nats)."""
    kl_horizon: int = Field(640, gt=0)
    """Adaptive KL: samples over which the coefficient may move by ±20%."""
    kl_overshoot_gain: float = Field(4.0, ge=1)
    """Adaptive KL: how many times faster the coefficient rises when KL is above the target
    than it falls when below (the target is a budget; 1 is the classic symmetric controller)."""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """Per-token KL estimate in the penalty: ``k1`` (log-ratio, unbiased, noisy) or ``k3``
    (never negative)."""
    gamma: float = Field(1.0, ge=0, le=1)
    """GAE discount over completion tokens (1: none, the score is given at the last token)."""
    lam: float = Field(0.95, ge=0, le=1)
    """GAE λ: bias (0, one-step TD) against variance (1, Monte Carlo returns)."""
    clip_range: float = Field(0.2, gt=0)
    """PPO's clip on the policy ratio (the surrogate is flat outside 1 ± clip_range)."""
    value_clip_range: float = Field(0.2, gt=0)
    """Clip on how far a value prediction may move from the rollout's in one update."""
    vf_coef: float = Field(0.1, ge=0)
    """Weight of the value loss in the summed loss."""
    entropy_coef: float = Field(0.0, ge=0)
    """Weight of an entropy bonus (0: none; the KL penalty already keeps the policy spread)."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient norm clip, applied to the policy and the value parameters separately."""
    whiten_rewards: bool = False
    """Scale per-token rewards to unit variance (not shifted) before GAE; advantages are always
    whitened."""
    max_new_tokens: MaxNewTokens = 40
    """New tokens per completion; a completion cut here has no EOS (see missing_eos_penalty)."""
    temperature: PolicyTemperature = 1.0
    """Sampling temperature; top-k and top-p are off (on-policy samples), and the training
    log-probs use the same temperature."""
    checkpoint_every: int = Field(20, gt=0)
    """Save a resumable checkpoint every this many steps (and at the last)."""
    keep_checkpoints: int = Field(2, gt=0)
    """Checkpoints kept; older ones are deleted."""
    value_adapter: AdapterSpec = AdapterSpec()
    """The value model's adapter on the shared base (its head is trained in full)."""
    rollout: PPORolloutSpec = PPORolloutSpec()
    """Where rollouts come from: the HF engine on the policy itself, or vLLM."""
    heldout: HeldoutSpec = HeldoutSpec()
    """Sample the trained policy and its reference on held-out prompts (gold reward, the
    training reward unless ``heldout.rewards`` names others, KL)."""
    health: HealthSpec = HealthSpec()
    """Training health checks (KL, length, repetition, invalid words, reward vs gold or vs the
    held-out reward model); with a learned reward the defaults tighten (``RM_HEALTH``)."""
    forgetting: ForgettingSpec = ForgettingSpec()
    """Measure forgetting: general-text NLL of the reference (the starting policy) and the
    trained policy."""

    @model_validator(mode="after")
    def _data_keys(self) -> PPOStageConfig:
        # eval_split is read: without other health prompts, the probe samples that split
        unread = [k for k in HELDOUT_DATA_KEYS if k != "eval_split"]
        refuse_unread_data_keys(self.data, self.kind, unread)
        return self

    @field_validator("normalize_scores", mode="before")
    @classmethod
    def _bool_normalization(cls, v):
        return {True: "fixed", False: "none"}.get(v, v) if isinstance(v, bool) else v

    def uses_stages(self) -> list[str]:
        return [s for s in (self.reward_model, self.heldout_reward_model) if s]

    def sampling(self, seed: int) -> SamplingSpec:
        """One completion per prompt from the policy's own distribution."""
        return SamplingSpec.policy(1, self.temperature, self.max_new_tokens, seed)

    @property
    def eos_penalty(self) -> float:
        if self.missing_eos_penalty is not None:
            return self.missing_eos_penalty
        return 1.0 if self.reward_model or any(Path(r).is_dir() for r in self.rewards) else 0.0


def _heldout(cfg, ctx, trainer) -> dict[str, float]:
    """Held-out metrics; the reward is the one PPO trained on (RM adapter and/or functions)."""
    pair = PolicyPair.of(trainer.model.peft)
    custom = None if cfg.heldout.rewards else trainer.scoring.reward
    return heldout_evaluation(cfg, ctx, pair.policy, pair.reference, trainer.tokenizer, custom)


def _forgetting(cfg, ctx, trainer) -> tuple[dict[str, float], list[dict]]:
    """Forgetting against the reference (the starting policy), and the texts' data record."""
    if not ctx.is_main:
        return {}, []
    pair = PolicyPair.of(trainer.model.peft)
    return forgetting_evaluation(cfg, ctx, pair.policy, pair.reference, trainer.tokenizer)


def run(cfg: PPOStageConfig, ctx: StageContext) -> StageResult:
    ctx.require_policy_parent("ppo", required=True)
    if cfg.reward_model is None and not cfg.rewards:
        raise UserError(f"{ctx.where}: give reward_model (a reward_model stage) and/or rewards")
    if cfg.prompts_per_step % cfg.minibatches:
        raise UserError(f"{ctx.where}: prompts_per_step must be divisible by minibatches")
    if cfg.rollout.engine == "vllm":
        check_vllm(ctx.where)
    reward_dirs: dict[str, Path] = {}
    reward_model_apart: Path | None = None
    for name, key in ((cfg.reward_model, REWARD), (cfg.heldout_reward_model, HELDOUT_REWARD)):
        if name is None:
            continue
        field = "reward_model" if key == REWARD else "heldout_reward_model"
        rm = ctx.finished_stage(name, field, ("reward_model",))
        if rm.base.name == ctx.model.name and rm.adapter_type == "lora":
            reward_dirs[key] = rm.dir  # an adapter on PPO's own base
        elif key == REWARD:  # another base (or fully fine-tuned): loaded on its own
            reward_model_apart = rm.dir
        else:
            raise UserError(
                f"{ctx.where}.heldout_reward_model: {name!r} must be a LoRA reward model on "
                "the run's base model"
            )
    if cfg.reward_model or any(Path(r).is_dir() for r in cfg.rewards):
        # a learned reward has blind spots: watch length and invalid words closer, and more often
        tighter = {k: v for k, v in RM_HEALTH.items() if k not in cfg.health.model_fields_set}
        cfg = cfg.model_copy(update={"health": cfg.health.model_copy(update=tighter)})
    trainer = PPOTrainer(cfg, ctx, reward_dirs, reward_model_apart)
    metrics = trainer.train(heldout=lambda: _heldout(cfg, ctx, trainer))
    metrics.update(_heldout(cfg, ctx, trainer))
    forgetting, forgetting_texts = _forgetting(cfg, ctx, trainer)
    metrics.update(forgetting)
    if ctx.is_main:
        save_stage_model(trainer.model.peft, trainer.tokenizer, ctx.out_dir)
    data = cfg.data
    used = [data_record("train", data.source, data.split, trainer.prompts), *forgetting_texts]
    return StageResult(
        metrics=metrics, adapter_type="lora", outputs={"weights": ADAPTER_DIR}, data=used
    )
