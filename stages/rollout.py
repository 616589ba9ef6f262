"""On-policy preference collection: sample a finished policy, rank its samples, write pairs.

InstructGPT's recipe for a reward model that covers what the policy actually writes: take n
samples per prompt from the policy (usually the SFT stage), let a labeller rank them, and train
the reward model on those comparisons beside its offline pairs (``reward_model.mix``). A reward
model that never saw the policy's short, broken or repeated answers scores them at random, and
PPO finds those holes (measured on the builtin task: RM score up 7 points, gold down 0.4).

The labeller is one of
- ``labeller``: reward specs (``gold`` on the builtin task, where it stands in for human
  labellers; a reward_model stage of this run by name; a rule; ``module:function``), or
- ``labels``: a JSONL file of human labels for these rollouts, one row per labelled sample:
  ``{"prompt_id": ..., "sample": k, "reward": float}`` (the ids are in ``rollouts/*.jsonl``).
  Run the stage once without a labeller to get the rollouts, label them, then set ``labels``.

Output: ``rollouts/`` (the rollout job's shards, resumable) and ``preferences.jsonl`` (the
conversational pairs the reward_model and DPO stages read). The generation is the rollout job
(:mod:`alignkit.rollouts.job`) run on the main process. Iterated RLHF is the same parts again:
rollout from the PPO stage → a second reward_model mixing those pairs → PPO again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from alignkit.config import COMPARE_SAMPLES, DataSpec, StageBase
from alignkit.data.fingerprint import data_record
from alignkit.errors import UserError
from alignkit.models import ADAPTER_DIR, FULL_MODEL_DIR, resolve_model_path
from alignkit.pipeline import StageContext, StageResult
from alignkit.rewards.registry import resolve_rewards
from alignkit.rollouts import ModelSource
from alignkit.rollouts.best_of_n import PREFERENCES_FILE, PairMode, write_preferences
from alignkit.rollouts.job import RolloutJobConfig, run_rollout_job
from alignkit.rollouts.shards import read_rollouts
from alignkit.rollouts.types import EngineName, SamplingSpec
from alignkit.stages.common import (
    refuse_unread_data_keys,
    reward_spec_error,
    reward_stage_names,
    stage_reward_spec,
)

ROLLOUTS_DIR = "rollouts"
#: A rollout stage has no trainer checkpoints. This marker tells the runner that an interrupted
#: attempt's partial dir holds shards worth keeping, so a re-run resumes them.
RESUME_MARKER = Path("checkpoints") / "checkpoint-0" / "trainer_state.json"


class RolloutStageConfig(StageBase):
    kind: Literal["rollout"] = "rollout"
    default_parent: ClassVar[bool] = True
    #: sampling knobs live in ``sampling`` (a ``train:`` block is refused, naming them)
    owned_options: ClassVar[dict[str, str]] = {
        key: f"sampling.{key}" for key in SamplingSpec.model_fields
    }

    data: DataSpec
    """Prompts (any prompt source); ``max_rows`` caps how many are sampled."""
    sampling: SamplingSpec = SamplingSpec(n=COMPARE_SAMPLES)
    """n samples per prompt (at least 2 to compare), at the policy's own distribution."""
    labeller: list[str] = []
    """Reward specs that rank the samples (``gold``, a rule, ``module:function``, a reward-model
    stage of this run: ``stage:NAME``, or its bare name when that is no builtin reward;
    ``SPEC*WEIGHT``); their weighted sum is each sample's label."""
    labels: str | None = None
    """JSONL of labels for this stage's rollouts: ``{"prompt_id", "sample", "reward"}`` rows."""
    pairs: PairMode = "best_worst"
    """``best_worst``: one pair per prompt; ``all``: every two samples whose labels differ."""
    min_margin: float = Field(0.0, ge=0)
    """A pair's labels must differ by more than this (ties say nothing)."""
    engine: EngineName = "hf"
    """``hf``: transformers ``generate`` (any device); ``vllm``: the vLLM engine (CUDA, the
    ``vllm`` extra)."""
    batch_size: int = Field(64, ge=1)
    """HF engine: sequences (prompts x samples) per forward."""
    chunk_prompts: int | None = Field(None, ge=1)
    """Prompts per engine call and durable write: an interrupted stage resumes after the last
    whole chunk. Default: 64 (hf), 1024 (vllm)."""

    @model_validator(mode="after")
    def _check_data(self) -> RolloutStageConfig:
        if self.data.clean is not None:
            raise ValueError(
                "data.clean: a rollout stage samples its prompts as given; clean them first "
                "(alignkit data clean IN OUT --kind prompts) and point data.source at OUT"
            )
        refuse_unread_data_keys(self.data, self.kind)  # held-out keys, stratify_by, group_by
        return self

    def uses_stages(self) -> list[str]:
        return reward_stage_names(self.labeller)


def run(cfg: RolloutStageConfig, ctx: StageContext) -> StageResult:
    if ctx.parent is None:
        raise UserError(f"{ctx.where}: a rollout stage samples a policy stage (set `from: sft`)")
    if cfg.sampling.n < 2:
        raise UserError(f"{ctx.where}.sampling.n: compare at least 2 samples per prompt")
    if cfg.labeller and cfg.labels:
        raise UserError(f"{ctx.where}: give labeller or labels, not both")
    where = f"{ctx.where}.labeller"
    labeller = [stage_reward_spec(s, ctx.run_dir, where) for s in cfg.labeller]
    if labeller:
        try:
            resolve_rewards(labeller)  # a bad spec fails before any model loads
        except UserError as e:
            raise reward_spec_error(e, where, ctx.run_dir) from None
    labelled = bool(labeller or cfg.labels)
    outputs = {"rollouts": ROLLOUTS_DIR, **({"preferences": PREFERENCES_FILE} if labelled else {})}
    if not ctx.is_main:  # one process generates (vLLM spreads over GPUs by itself)
        return StageResult(metrics={}, adapter_type="none", outputs=outputs)
    marker = ctx.out_dir / RESUME_MARKER
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("{}")
    out = ctx.out_dir / ROLLOUTS_DIR
    job = RolloutJobConfig(
        stage=str(ctx.parent.dir),
        prompts=cfg.data.source,
        split=cfg.data.split,
        max_prompts=cfg.data.max_rows,
        on_bad_rows=cfg.data.on_bad_rows,
        out=str(out),
        engine=cfg.engine,
        rewards=labeller,
        sampling=cfg.sampling.model_copy(update={"seed": ctx.seed * 1009 + 17}),
        batch_size=cfg.batch_size,
        chunk_prompts=cfg.chunk_prompts,
    )
    summary = run_rollout_job(job, ctx.console, source=_policy_source(ctx))
    rows = list(read_rollouts(out))
    if cfg.labels is not None:
        rows = _join_labels(rows, Path(cfg.labels), f"{ctx.where}.labels")
    metrics: dict[str, float] = {"samples": float(len(rows))}
    prompts = list({r["prompt_id"]: r["prompt"] for r in rows}.values())
    data = [
        data_record("prompts", cfg.data.source, cfg.data.split, prompts),
        data_record("rollouts (written)", ROLLOUTS_DIR, None, rows),
    ]
    if labelled:
        result = write_preferences(ctx.out_dir, rows, cfg.pairs, cfg.min_margin)
        margins = [json.loads(line)["margin"] for line in result.path.open()]
        metrics.update(
            pairs=float(result.pairs),
            prompts_without_pair=float(result.ties),
            mean_label=sum(r["reward"] for r in rows) / max(len(rows), 1),
            mean_margin=sum(margins) / max(len(margins), 1),
            eos_rate=summary["finish_reasons"].get("stop", 0) / max(summary["rows"], 1),
        )
        ctx.console.print(
            f"{result.pairs} preference pairs from {len(rows)} labelled samples "
            f"-> {result.path.name}"
        )
    else:
        ctx.console.print(
            f"[yellow]no labeller[/]: rollouts are in {ctx.run_dir.name}/{ctx.name}/"
            f"{ROLLOUTS_DIR}; label them and set {ctx.where}.labels to make pairs"
        )
    return StageResult(metrics=metrics, adapter_type="none", outputs=outputs, data=data)


def _policy_source(ctx: StageContext) -> ModelSource:
    """The parent stage as a rollout source, on the run's own model spec."""
    parent = ctx.parent.dir
    if (parent / FULL_MODEL_DIR).is_dir():
        return ModelSource(ctx.model, str(parent / FULL_MODEL_DIR), str(parent))
    if not (parent / ADAPTER_DIR).is_dir():
        raise UserError(
            f"{ctx.where}: stage {ctx.parent.name!r} ({ctx.parent.kind}) has no policy to sample"
        )
    return ModelSource(ctx.model, resolve_model_path(ctx.model), str(parent), parent / ADAPTER_DIR)


def _join_labels(rows: list[dict], path: Path, where: str) -> list[dict]:
    """The rollout rows that have a label in ``path``, with ``reward`` set to it."""
    if not path.is_file():
        raise UserError(f"{where}: no such file {path}")
    labels: dict[tuple[str, int], float] = {}
    for i, line in enumerate(path.open(encoding="utf-8"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            labels[(str(row["prompt_id"]), int(row["sample"]))] = float(row["reward"])
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(
                f'{path}:{i}: a label row is {{"prompt_id", "sample", "reward"}} ({e})'
            ) from None
    out = [
        {**r, "reward": labels[(r["prompt_id"], r["sample"])]}
        for r in rows
        if (r["prompt_id"], r["sample"]) in labels
    ]
    if not out:
        raise UserError(
            f"{where}: none of the {len(labels)} labels in {path} matches a rollout of this stage "
            "(prompt_id and sample as in its rollouts/*.jsonl)"
        )
    return out
