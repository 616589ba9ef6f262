"""GRPO on TRL's GRPOTrainer; also runs RLOO (TRL's RLOOTrainer, config in :mod:`.rloo`).

Both sample ``num_generations`` completions per prompt, score them with the reward functions of
:mod:`alignkit.rewards` and push the policy towards the better ones of each group; they differ
only in TRL's trainer and config class (advantages, and where ``beta`` enters), so one run
function serves both.

Handoff: with a parent SFT stage the policy is the SFT adapter loaded trainable (no
``peft_config``), and TRL adds a frozen copy of it as the "ref" adapter on the same base weights
(GRPO when ``beta != 0``, RLOO always; read in TRL 1.16's ``__init__``), so the KL is measured
against the SFT policy, not the pre-SFT base. Only the trained adapter is saved.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import torch
from datasets import Dataset
from pydantic import Field, model_validator
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from alignkit.config import (
    AdapterSpec,
    DataSpec,
    ForgettingSpec,
    HeldoutSpec,
    MaxNewTokens,
    PolicyTemperature,
    SamplingSpec,
    StageBase,
    TrainerOptions,
)
from alignkit.data.fingerprint import data_record
from alignkit.data.prompts import load_prompts
from alignkit.data.split import training_rows
from alignkit.errors import UserError
from alignkit.handoff import PolicyPair
from alignkit.health import HealthSpec
from alignkit.pipeline import StageContext, StageResult
from alignkit.rewards.registry import WeightedReward, resolve_reward, split_weight
from alignkit.rewards.reward_model import RewardModelScorer
from alignkit.stages import policy
from alignkit.stages.common import (
    ONLINE_LOGS,
    RolloutSpec,
    check_vllm,
    data_context,
    refuse_unread_data_keys,
    reward_spec_error,
    reward_stage,
    reward_stage_names,
)
from alignkit.training import make_trl_trainer, stage_trl_args

#: The vLLM settings TRL's colocated engine takes: ours -> GRPOConfig's (the others of the
#: ``rollout.vllm`` block belong to our own engine and are refused here).
TRL_VLLM = {
    "gpu_memory_utilization": "vllm_gpu_memory_utilization",
    "tensor_parallel_size": "vllm_tensor_parallel_size",
    "enable_sleep_mode": "vllm_enable_sleep_mode",
    "max_model_len": "vllm_max_model_length",
}
#: Trainer options this stage sets from fields named otherwise; ``train.<key>`` may not set them
#: (nor any option named like a field: ``beta``, ``num_generations``, ``temperature``, ...).
OWNED_OPTIONS = {
    "reward_weights": "rewards (write 'gold*0.5')",
    "use_vllm": "rollout.engine",
    "vllm_mode": "rollout.engine",
    **{theirs: f"rollout.vllm.{ours}" for ours, theirs in TRL_VLLM.items()},
}


class OnlineRLConfig(StageBase, TrainerOptions):
    """Fields GRPO and RLOO share. Batch sizes count completions, not prompts: every device
    step holds whole groups of ``num_generations`` (default ``per_device_train_batch_size``:
    one group)."""

    is_policy: ClassVar[bool] = True
    default_parent: ClassVar[bool] = True
    owned_options: ClassVar[dict[str, str]] = OWNED_OPTIONS

    data: DataSpec
    """Prompts (any format :func:`alignkit.data.prompts.load_prompts` detects), e.g.
    ``builtin:prompts``. Other row fields (``reference``, ``id``) reach the reward functions."""
    rewards: list[str] = Field(min_length=1)
    """Reward specs, summed with optional weights: ``gold``, a rule, ``module:function``, a
    reward-model directory, or a reward-model stage of this run (``stage:NAME``, or its bare
    name when that is no builtin reward), e.g. ``[rm, "length*0.1"]``."""
    adapter: AdapterSpec | None = None
    """Adapter for a stage without a parent (a parent's adapter is continued)."""
    beta: float = Field(0.04, ge=0)
    """KL coefficient towards the reference (the parent policy). TRL's GRPO default 0 drops the
    reference altogether (no KL term, no "ref" adapter, nothing holds the policy near SFT);
    0.04 is the GRPO paper's value. It is a light leash: raise it for a smaller KL."""
    num_generations: int = Field(8, ge=2)
    """Completions sampled per prompt (the group the advantages are computed within)."""
    max_completion_length: MaxNewTokens = 256
    """New tokens per completion; longer ones are cut (and count as not finished)."""
    temperature: PolicyTemperature = 1.0
    """Sampling temperature; top-k and top-p are off (on-policy samples, unbiased KL)."""
    rollout: RolloutSpec = RolloutSpec()
    """Where completions are sampled: the policy itself (``hf``) or vLLM colocated with it."""
    heldout: HeldoutSpec = HeldoutSpec()
    """Sample the trained policy and its reference on held-out prompts (gold reward, the
    configured reward unless ``heldout.rewards`` names others, KL)."""
    health: HealthSpec = HealthSpec()
    """Training health checks (KL, length, repetition, invalid words, reward vs gold)."""
    forgetting: ForgettingSpec = ForgettingSpec()
    """Measure forgetting: general-text NLL before and after the stage."""

    def uses_stages(self) -> list[str]:
        """The reward_model stages the rewards name: they run first, their hashes join ours."""
        return reward_stage_names(self.rewards)

    @model_validator(mode="after")
    def _check(self) -> OnlineRLConfig:
        refuse_unread_data_keys(self.data, self.kind)
        not_trl = sorted(set(self.rollout.vllm.model_fields_set) - set(TRL_VLLM))
        if not_trl:
            raise ValueError(
                f"rollout.vllm: TRL's colocated vLLM engine takes only {', '.join(TRL_VLLM)}; "
                f"remove {', '.join(not_trl)}"
            )
        return self


class GRPOStageConfig(OnlineRLConfig):
    """Group-relative advantages; the KL (k3 estimator, per token) is a term of the loss."""

    kind: Literal["grpo"] = "grpo"
    trainer_config: ClassVar[str] = "trl.GRPOConfig"


def run(cfg: OnlineRLConfig, ctx: StageContext) -> StageResult:
    # a tuple when a test wraps the build step to look at the handoff
    built = policy.PolicyTrainer._make(build_trainer(cfg, ctx))
    return policy.finish(cfg, ctx, built, policy.train(cfg, ctx, built))


def build_trainer(cfg: OnlineRLConfig, ctx: StageContext):
    """Prompts, rewards, policy (+ "ref" adapter) and the TRL trainer. Separate from :func:`run`
    so tests can inspect the handoff."""
    config_cls, trainer_cls = {
        "grpo": (GRPOConfig, GRPOTrainer),
        "rloo": (RLOOConfig, RLOOTrainer),
    }[cfg.kind]
    torch.manual_seed(ctx.seed)

    # 1. prompts and reward functions first: a bad row or reward name stops before any model loads
    rows = training_rows(cfg.data, load_prompts, data_context(ctx, cfg.data, cfg.heldout))
    if not rows:
        raise UserError(f"{ctx.where}.data: no prompts")
    # the run dir: ctx.out_dir is the stage's partial dir inside it
    reward = reward_functions(cfg.rewards, ctx.out_dir.parent, ctx.where)
    reward_funcs = [NamedReward(name, fn) for name, fn, _ in reward.components]
    weights = [weight for _, _, weight in reward.components]
    if cfg.rollout.engine == "vllm":
        check_vllm(ctx.where)

    # 2. policy: the parent's adapter, trainable (TRL copies it into the frozen "ref" adapter)
    model, tokenizer, adapter, saved = policy.start_policy(cfg, ctx, cfg.kind)
    ctx.console.print(f"reward: {reward.__name__}")

    # 3. trainer
    vllm = cfg.rollout.engine == "vllm"
    on_policy = SamplingSpec.policy(
        cfg.num_generations, cfg.temperature, cfg.max_completion_length, ctx.seed
    )
    try:
        args = stage_trl_args(
            config_cls,
            cfg,
            ctx,
            beta=cfg.beta,
            num_generations=cfg.num_generations,
            per_device_train_batch_size=cfg.num_generations,
            max_completion_length=cfg.max_completion_length,
            temperature=on_policy.temperature,
            top_k=on_policy.top_k,  # HF generate samples top-50 unless told otherwise: not the policy
            top_p=on_policy.top_p,
            reward_weights=weights,
            disable_dropout=True,  # sampling and training forwards must agree for the ratios
            use_vllm=vllm,
            vllm_mode="colocate",
            **{theirs: getattr(cfg.rollout.vllm, ours) for ours, theirs in TRL_VLLM.items()},
        )
    except UserError as e:
        if "num_generations" not in str(e):
            raise
        raise UserError(
            f"{e}\n(train.per_device_train_batch_size and generation_batch_size count "
            f"completions: make the batch a multiple of num_generations={cfg.num_generations})"
        ) from None
    trainer = make_trl_trainer(
        trainer_cls,
        ctx,
        saved,
        options=cfg,
        adapter=adapter,
        model=model,
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=_dataset(rows),
        processing_class=tokenizer,
    )
    _move_reward_models(reward, trainer.accelerator.device)
    # GRPO at beta 0 holds no reference: the held-out evaluation then loads the parent policy
    pair = PolicyPair.of(trainer.model, trainer.ref_model)
    counts = {"train_prompts": float(len(rows))}
    return policy.PolicyTrainer(
        trainer,
        tokenizer,
        pair,
        adapter.type,
        counts,
        health_logs=ONLINE_LOGS,
        heldout_reward=reward,
        data=(data_record("train", cfg.data.source, cfg.data.split, rows),),
    )


def reward_functions(specs: list[str], run_dir: Path, where: str):
    """The weighted reward the specs name (a :class:`WeightedReward`; TRL gets its components
    and weights, logs each as ``rewards/<name>/mean`` and optimises the sum, ``reward``). A
    reward-model stage of this run is named by its stage name (``stage:rm``, or ``rm`` when
    that is no builtin reward) and found in ``run_dir``."""
    components = []
    for i, item in enumerate(specs):
        # split here as the registry does: the spec alone says whether it names a stage
        spec, weight = split_weight(item)
        stage = reward_stage(spec, run_dir, f"{where}.rewards[{i}]: {item!r}")
        try:
            name, fn = resolve_reward(str(stage.dir) if stage else spec)
        except UserError as e:
            raise reward_spec_error(e, f"{where}.rewards[{i}]", run_dir) from None
        components.append((stage.name if stage else name, fn, weight))
    try:
        return WeightedReward(components)  # refuses a reward named twice
    except UserError as e:
        raise UserError(f"{where}.rewards: {str(e).removeprefix('--reward: ')}") from None


class NamedReward:
    """A reward function under the name TRL logs it by (TRL names a ``functools.partial`` by
    the function it wraps, so two rules or two reward models would share a name)."""

    def __init__(self, name: str, fn):
        self.__name__ = name
        self.fn = fn

    def __call__(self, prompts, completions, **meta) -> list[float | None]:
        return self.fn(prompts=prompts, completions=completions, **meta)


def _move_reward_models(reward, device) -> None:
    """A reward model loads on the CPU; score on the policy's device (a quantized one is there)."""
    for _, fn, _ in reward.components:
        if isinstance(fn, RewardModelScorer) and next(fn.model.parameters()).device != device:
            fn.model.to(device)


def _dataset(rows: list[dict]):
    return Dataset.from_list(
        [{"prompt": r["prompt"], "reference": r["reference"], "id": r["id"]} for r in rows]
    )
