"""Steps several stages share that need more than the core (the core imports no other area)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from pydantic import model_validator
from transformers import TrainerCallback

from alignkit.config import BUILTIN_MODEL, DataSpec, HeldoutSpec, Strict
from alignkit.data.fingerprint import data_record
from alignkit.data.prompts import load_prompts
from alignkit.data.replay import replay_rows
from alignkit.data.split import DataContext
from alignkit.errors import UserError
from alignkit.eval.forgetting import forgetting_metrics, general_texts
from alignkit.eval.heldout import evaluate_policy
from alignkit.eval.probe import HealthProbe
from alignkit.handoff import StageOutput, find_stage, run_stages
from alignkit.health import HealthMonitor
from alignkit.models import load_tokenizer, resolve_model_path
from alignkit.rewards.registry import known_names, split_weight
from alignkit.rollouts.types import EngineName
from alignkit.rollouts.vllm import GpuMemoryUtilization, VLLMConfig
from alignkit.training import weights_sharded

#: Flat keys of earlier releases -> their place in the one vLLM settings block.
MOVED_VLLM_KEYS = {
    "gpu_memory_utilization": "gpu_memory_utilization",
    "tensor_parallel_size": "tensor_parallel_size",
    "sleep": "enable_sleep_mode",
    "max_lora_rank": "max_lora_rank",
    "max_model_len": "max_model_len",
}

#: DataSpec keys about held-out rows and how they are split off: a stage that samples prompts
#: reads none of them, or only ``eval_split`` (PPO's health probe); its held-out prompts are
#: ``heldout.prompts``.
HELDOUT_DATA_KEYS = (
    "eval_source", "eval_split", "eval_size", "max_eval_rows", "stratify_by", "group_by",
)  # fmt: skip


def refuse_unread_data_keys(data: DataSpec, kind: str, unread=HELDOUT_DATA_KEYS) -> None:
    """Raise (in a config validator) when ``data`` sets keys a ``kind`` stage never reads."""
    given = [f"data.{k}" for k in unread if k in data.model_fields_set]
    if given:
        raise ValueError(
            f"{', '.join(given)}: not read by a {kind} stage (it samples prompts from "
            "data.source/data.split); held-out prompts go in heldout.prompts and heldout.split"
        )


class ColocatedVLLMConfig(VLLMConfig):
    """:class:`~alignkit.rollouts.vllm.VLLMConfig` for an engine that shares the GPU with
    training: the same settings, a smaller default share of the GPU."""

    gpu_memory_utilization: GpuMemoryUtilization = 0.3
    """vLLM's share of the GPU (weights + KV cache); the rest is left to training."""


class RolloutSpec(Strict):
    """Where an online-RL stage's rollouts come from. ``vllm`` is the same settings block a
    rollout job or a comparison takes (:class:`~alignkit.rollouts.vllm.VLLMConfig`), with a
    smaller default share of the GPU: training needs the rest."""

    engine: EngineName = "hf"
    """``hf``: transformers ``generate`` (any device). ``vllm``: a vLLM engine on the same GPU as
    training (the ``vllm`` extra, CUDA only)."""
    vllm: ColocatedVLLMConfig = ColocatedVLLMConfig()
    """The vLLM engine's settings (read with ``engine: vllm``); ``gpu_memory_utilization``
    defaults to 0.3 here, leaving the rest of the GPU to training."""

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data):
        moved = [k for k in MOVED_VLLM_KEYS if isinstance(data, dict) and k in data]
        if moved:
            raise ValueError(
                "vLLM settings live in the rollout's 'vllm' block (the one rollout jobs and "
                "comparisons take): write "
                + ", ".join(
                    f"rollout.vllm.{MOVED_VLLM_KEYS[k]} instead of rollout.{k}" for k in moved
                )
            )
        return data


def check_vllm(where: str) -> None:
    """Fail before any model loads: rollouts on vLLM need the extra and a CUDA GPU."""
    if importlib.util.find_spec("vllm") is None:
        raise UserError(
            f"{where}.rollout.engine: vllm is not installed; install the extra "
            "(pip install 'alignkit[vllm]', CUDA only) or use engine: hf"
        )
    if not torch.cuda.is_available():
        raise UserError(f"{where}.rollout.engine: vllm needs a CUDA GPU; use engine: hf on CPU")


def data_context(ctx, data: DataSpec, heldout: HeldoutSpec | None = None) -> DataContext:
    """What ``data.clean`` needs from a stage: the prompts its held-out evaluation samples (the
    same default as :func:`heldout_evaluation`), where the report goes, the model's tokenizer."""
    sources = []
    if heldout is not None and heldout.enabled:
        builtin = data.source.startswith("builtin:")
        source = heldout.prompts or ("builtin:prompts" if builtin else None)
        if source is not None:
            sources.append((source, heldout.split))
    return DataContext(
        where=f"{ctx.where}.data",
        heldout=sources,
        report_dir=ctx.out_dir if ctx.is_main else None,
        tokenizer=lambda: load_tokenizer(resolve_model_path(ctx.model)),
    )


def heldout_evaluation(cfg, ctx, policy, reference, tokenizer, reward=None) -> dict[str, float]:
    """Run the stage's held-out evaluation (``cfg.heldout``); the main process's numbers.

    Builtin training data implies the builtin held-out prompts and its gold reward; other data
    is evaluated only when ``heldout.prompts`` names a prompt source. With whole weights on every
    rank (one process, DDP, ZeRO-2) only the main process samples; with sharded weights (ZeRO-3,
    FSDP) every forward is a collective, so every rank samples the same prompts in step.
    """
    if not ctx.is_main and not weights_sharded():
        return {}
    builtin = cfg.data.source.startswith("builtin:")
    if ctx.is_main:
        ctx.console.print("held-out evaluation: sampling the policy and its reference ...")
    metrics = evaluate_policy(
        policy,
        reference,
        tokenizer,
        cfg.heldout,
        default_prompts="builtin:prompts" if builtin else None,
        has_gold=builtin,
        reward=reward,
    )
    return metrics if ctx.is_main else {}


def forgetting_evaluation(cfg, ctx, policy, start, tokenizer) -> tuple[dict[str, float], list]:
    """Forgetting (``cfg.forgetting``): general-text NLL of ``start`` (the policy the stage began
    from) and of ``policy``; returns the main process's metrics and the data record of the texts.
    Every rank calls it when the weights are sharded (each forward is a collective)."""
    spec = cfg.forgetting
    if not spec.enabled:
        return {}, []
    found = general_texts(spec, ctx.model.name == BUILTIN_MODEL, ctx.where)
    if found is None:
        return {}, []
    texts, source = found
    if ctx.is_main:
        ctx.console.print(f"forgetting: NLL of {len(texts)} texts of {source}, before and after")
    metrics = forgetting_metrics(policy, start, tokenizer, texts, spec.max_length)
    if not ctx.is_main:
        return {}, []
    return metrics, [data_record("forgetting", source, spec.split, texts)]


STAGE_PREFIX = "stage:"  # names a stage of this run where a source or reward spec could be
REWARD_STAGE_KINDS = ("reward_model",)


def replay_stages(spec) -> list[str]:
    """The stage a ``replay:`` block names (``stage:NAME``), for ``uses_stages``."""
    if spec is None or not spec.source.startswith(STAGE_PREFIX):
        return []
    return [spec.source.removeprefix(STAGE_PREFIX).strip()]


# --- reward specs that name a reward_model stage of the run (GRPO/RLOO rewards, a rollout
# stage's labeller, an eval stage's rewards: one reading for all three) ---


def reward_stage_name(spec: str) -> str | None:
    """The stage of this run a reward spec names, any ``*WEIGHT`` aside: ``stage:NAME``, or a
    bare name that is no builtin reward (``stage:`` reaches a stage named like one). None for
    any other spec (a builtin, a rule, a path, ``module:function``)."""
    head = split_weight(spec)[0].strip()
    if head.startswith(STAGE_PREFIX):
        return head.removeprefix(STAGE_PREFIX).strip()
    return head if head.isidentifier() and head not in known_names() else None


def reward_stage_names(specs: list[str]) -> list[str]:
    """The stages these reward specs name, for ``uses_stages``."""
    return [name for name in map(reward_stage_name, specs) if name is not None]


def reward_stage(spec: str, run_dir: Path, where: str) -> StageOutput | None:
    """The finished reward_model stage ``spec`` names, or None. ``stage:NAME`` must name one;
    a bare name that names no stage is left to the reward registry, whose error lists the
    builtin rewards (see :func:`reward_stage_hint` for the stages)."""
    name = reward_stage_name(spec)
    prefixed = split_weight(spec)[0].strip().startswith(STAGE_PREFIX)
    if name is None or (not prefixed and StageOutput.read(run_dir / name) is None):
        return None
    return find_stage(run_dir, name, REWARD_STAGE_KINDS, where)  # refuses other kinds


def stage_reward_spec(spec: str, run_dir: Path, where: str) -> str:
    """``spec`` with the reward_model stage it names replaced by that stage's directory, its
    ``*WEIGHT`` kept; any other spec as given."""
    stage = reward_stage(spec, run_dir, where)
    if stage is None:
        return spec
    weighted = split_weight(spec)[0] != spec
    return str(stage.dir) + ("*" + spec.rpartition("*")[2].strip() if weighted else "")


def reward_spec_error(error: UserError, where: str, run_dir: Path) -> UserError:
    """The registry's error about a reward spec, at ``where``, with the reward_model stages of
    the run a bare name could have meant."""
    stages = [s.name for s in run_stages(run_dir, REWARD_STAGE_KINDS)]
    hint = f"; reward_model stages of this run: {', '.join(stages)}" if stages else ""
    return UserError(f"{where}: {str(error).removeprefix('--reward ')}{hint}")


def replay(
    spec, ctx, load, train_rows: int, kinds: tuple[str, ...], hint: str = ""
) -> tuple[list[dict], dict]:
    """The replay rows for a stage with ``train_rows`` rows of its own (see
    :class:`~alignkit.config.ReplaySpec`), and their data record. ``stage:NAME`` replays the
    training data of that finished stage of the run, which must be one of ``kinds``. ``hint``
    follows the error when the source's rows do not fit the stage."""
    source, split = spec.source, spec.split
    if source.startswith(STAGE_PREFIX):
        name = source.removeprefix(STAGE_PREFIX).strip()
        stage = ctx.finished_stage(name, "replay.source", kinds)
        data = (stage.record.get("config") or {}).get("data") or {}
        if "source" not in data:
            raise UserError(f"{ctx.where}.replay.source: stage {name!r} records no data source")
        source, split = data["source"], data.get("split")
    try:
        rows = replay_rows(spec, source, split, load, train_rows, ctx.seed, ctx.where)
    except UserError as e:
        raise UserError(f"{e}\n{hint}" if hint else str(e)) from None
    return rows, data_record("replay", source, split, rows)


def health_monitor(cfg, ctx, policy, reference, tokenizer):
    """The stage's health monitor and probe (see :mod:`alignkit.health`), or ``None`` when
    ``health.enabled`` is false. ``reference`` may be ``None`` (no KL checks then)."""
    spec = cfg.health
    if not spec.enabled:
        return None
    builtin = cfg.data.source.startswith("builtin:")
    source = spec.prompts or cfg.heldout.prompts or ("builtin:prompts" if builtin else None)
    if source is not None:
        split = cfg.heldout.split if spec.prompts is None else None
        rows = load_prompts(source, split).rows
    else:  # the stage's own data: its held-out split when it has one
        data = cfg.data
        rows = load_prompts(data.source, data.eval_split or data.split, "skip", 1.0).rows
    monitor = HealthMonitor(spec, ctx.where, ctx.out_dir, ctx.console, ctx.tracker)
    probe = HealthProbe(
        spec, rows, policy, reference, tokenizer, ctx.out_dir, builtin, ctx.is_main, ctx.tracker
    )
    return HealthCheck(monitor, probe)


class HealthCheck:
    """A monitor and its probe: ``check(step, trained)`` samples, measures and judges."""

    def __init__(self, monitor, probe):
        self.monitor, self.probe = monitor, probe

    def check(self, step: int, trained: dict[str, float]) -> None:
        self.monitor.observe(step, {**self.probe(step), **trained})


# TRL log keys -> health values, per trainer
DPO_LOGS = {"logps/chosen": "chosen_logp", "rewards/accuracies": "accuracy",
            "rewards/margins": "reward"}  # fmt: skip
ONLINE_LOGS = {"reward": "reward"}


def health_callback(check: HealthCheck | None, every: int, log_keys: dict[str, str]):
    """A TRL callback running ``check`` before training and every ``every`` steps, with the
    trainer's latest logged values (renamed by ``log_keys``). ``[]`` without a check."""
    if check is None:
        return []

    class HealthCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if not check.monitor.has_baseline:
                check.check(state.global_step, {})

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % every:
                return
            latest: dict[str, float] = {}
            for entry in state.log_history:
                latest.update({v: entry[k] for k, v in log_keys.items() if k in entry})
            check.check(state.global_step, latest)

    return [HealthCallback()]
