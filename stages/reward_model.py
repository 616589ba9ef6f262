"""Reward model on TRL's RewardTrainer: LoRA, QLoRA or full fine-tuning.

The model is the base loaded as a sequence classifier with one output. With an adapter, the
score head is trained in full and saved with the adapter (``modules_to_save``), so the saved
stage reloads to the same scores (see :mod:`alignkit.rewards.reward_model`). With
``from_sft: true`` the adapter continues from the SFT stage's adapter instead of a new one.
"""

from __future__ import annotations

import random
from dataclasses import asdict
from pathlib import Path
from typing import ClassVar, Literal

import torch
from datasets import Dataset
from peft import (
    PeftConfig,
    get_peft_model,
    prepare_model_for_kbit_training,
    set_peft_model_state_dict,
)
from pydantic import Field, model_validator
from transformers import AutoModelForSequenceClassification
from trl import RewardConfig, RewardTrainer

from alignkit.config import AdapterSpec, DataSpec, EvaluatedTrainerOptions, StageBase, Strict
from alignkit.data.fingerprint import data_record
from alignkit.data.preference import load_preference
from alignkit.data.split import data_records, train_eval_rows
from alignkit.errors import UserError
from alignkit.handoff import ADAPTER_DIR
from alignkit.models import (
    attach_adapter,
    count_parameters,
    load_base,
    load_tokenizer,
    resolve_model_path,
    torch_dtype,
)
from alignkit.pipeline import StageContext, StageResult
from alignkit.rewards.reward_model import RewardModelScorer
from alignkit.rewards.sanity import probe_reward_model
from alignkit.rollouts.best_of_n import PREFERENCES_FILE
from alignkit.rundir import write_json_atomic
from alignkit.stages.common import data_context
from alignkit.training import (
    early_stopping_record,
    make_trl_trainer,
    save_trained,
    snapshot_adapter,
    stage_trl_args,
    train_and_evaluate,
    weights_sharded,
)

#: Names classification heads go by in transformers models.
HEAD_NAMES = ("score", "classifier")
PROBE_FILE = "rm_probe.json"


class MixSpec(Strict):
    """More preference pairs mixed into a reward model's training data."""

    stage: str | None = None
    """A finished ``rollout`` stage of this run (its on-policy pairs)."""
    source: str | None = None
    """Or any preference source (file, Hub dataset, builtin)."""
    split: str | None = "train"
    """Split of a Hub or builtin ``source``."""
    weight: float = Field(1.0, gt=0)
    """Copies of these rows in the training data: 2 doubles them, 0.5 keeps a seeded half."""
    eval_size: int = Field(128, ge=0)
    """Rows held out to report accuracy on this data alone (``eval_<name>_accuracy``)."""

    @model_validator(mode="after")
    def _one_source(self) -> MixSpec:
        if (self.stage is None) == (self.source is None):
            raise ValueError("give a mix entry either stage (a rollout stage) or source")
        return self

    @property
    def label(self) -> str:
        return self.stage or Path(self.source).stem.replace("-", "_")


class RewardModelStageConfig(StageBase, EvaluatedTrainerOptions):
    kind: Literal["reward_model"] = "reward_model"
    trainer_config: ClassVar[str] = "trl.RewardConfig"

    data: DataSpec
    """Preference pairs (any format the preference loader detects)."""
    adapter: AdapterSpec | None = None
    """Overrides the pipeline's ``adapter`` block for this stage."""
    from_sft: bool = False
    """Continue from the parent (``from:``) SFT stage's adapter instead of the base model."""
    use_margin: bool = False
    """Use each pair's margin (e.g. UltraFeedback score gap) in the loss: -log σ(r_c - r_r - m)."""
    center_rewards: float | None = Field(None, ge=0)
    """Coefficient of the reward-centering term (mean squared reward), e.g. 0.01; off when null."""
    max_length: int = 1024
    """Pairs longer than this (tokens, either side) are dropped from training."""
    mix: list[MixSpec] = []
    """Pairs trained beside ``data``: e.g. ``[{stage: onpolicy}]``, comparisons of the policy's
    own samples, so the RM scores what the policy writes (InstructGPT's recipe)."""
    seed_offset: int = 0
    """Added to the run's seed for this stage (adapter init, data order): a second RM with
    another offset is an ensemble member, e.g. PPO's ``heldout_reward_model``."""
    probe: bool = True
    """After training, score degenerate answers (empty, ".", 1-3 words, fragments, repeats)
    against the held-out chosen answers; recorded as ``rm_probe/*`` (see rewards/sanity.py)."""

    def uses_stages(self) -> list[str]:
        return [m.stage for m in self.mix if m.stage is not None]

    @model_validator(mode="after")
    def _adapter_or_from_sft(self) -> RewardModelStageConfig:
        if self.from_sft and self.adapter is not None:
            raise ValueError(
                "from_sft: true continues the SFT stage's adapter, so 'adapter' would be "
                "ignored; remove one of them"
            )
        return self


def run(cfg: RewardModelStageConfig, ctx: StageContext) -> StageResult:
    seed = ctx.seed + cfg.seed_offset
    torch.manual_seed(seed)
    # 1. data: every row validated before any model is loaded
    train_rows, eval_rows = train_eval_rows(
        cfg.data, load_preference, ctx.seed, data_context(ctx, cfg.data)
    )
    data = data_records(cfg.data, train_rows, eval_rows)
    mixed = [_mix_rows(m, ctx) for m in cfg.mix]
    for spec, (extra, _) in zip(cfg.mix, mixed, strict=True):
        train_rows = train_rows + extra
        data.append(
            data_record(f"mix ({spec.label})", spec.source or spec.stage, spec.split, extra)
        )
    if cfg.from_sft and ctx.parent is None:
        raise UserError(f"{ctx.where}.from_sft: true needs `from: <sft stage>`")

    # 2. model: base as a one-output classifier, with a new adapter or the SFT one continued
    adapter = cfg.adapter or ctx.adapter
    sft_dir = ctx.parent.dir if cfg.from_sft else None
    model, tokenizer = load_reward_model_for_training(ctx.model, adapter, sft_dir)
    saved = snapshot_adapter(model, ctx.model.quantization != "none", torch_dtype(ctx.model))
    trainable, total = count_parameters(model)
    ctx.console.print(
        f"trainable parameters: {trainable:,} of {total:,} ({adapter.type} + score head)"
    )

    # 3. trainer
    train_ds = _dataset(train_rows, cfg.use_margin)
    eval_ds = _dataset(eval_rows, cfg.use_margin) if eval_rows else None
    args = stage_trl_args(
        RewardConfig,
        cfg,
        ctx,
        seed=seed,
        max_length=cfg.max_length,
        center_rewards_coefficient=cfg.center_rewards,
        per_device_eval_batch_size=32,
    )
    trainer = make_trl_trainer(
        RewardTrainer,
        ctx,
        saved,
        options=cfg,
        adapter=adapter,
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
    )

    # 4. train, with held-out pairwise accuracy before and after
    metrics = train_and_evaluate(trainer, ctx, evaluate=eval_ds is not None)
    if eval_ds is not None:
        metrics["heldout_pairwise_accuracy"] = metrics["eval_accuracy"]
    metrics["train_rows"], metrics["eval_rows"] = float(len(train_rows)), float(len(eval_rows))
    for spec, (_, held) in zip(cfg.mix, mixed, strict=True):
        if held:
            prefix = f"eval_{spec.label}"
            found = trainer.evaluate(_dataset(held, cfg.use_margin), metric_key_prefix=prefix)
            # TRL's RewardTrainer logs its accuracy as eval_accuracy whatever the prefix
            metrics[f"{prefix}_accuracy"] = found.get(f"{prefix}_accuracy", found["eval_accuracy"])
    if cfg.probe and eval_rows and (ctx.is_main or weights_sharded()):  # sharded: all join
        metrics.update(_probe(trainer.model, tokenizer, cfg, eval_rows, ctx))

    # 5. save adapter + score head (or the full model) with the tokenizer and scoring settings
    sub = save_trained(trainer, tokenizer, ctx, adapter.type)
    return StageResult(
        metrics=metrics,
        adapter_type=adapter.type,
        outputs={"weights": sub, "max_length": cfg.max_length},
        early_stopping=early_stopping_record(trainer),
        data=data,
    )


def load_reward_model_for_training(spec, adapter: AdapterSpec, sft_dir: Path | None):
    """Base as a sequence classifier (num_labels=1) plus a trainable adapter whose
    ``modules_to_save`` includes the score head; or the whole model for full fine-tuning."""
    tokenizer = load_tokenizer(sft_dir or resolve_model_path(spec), spec)
    model = load_base(spec, tokenizer, model_cls=AutoModelForSequenceClassification, num_labels=1)
    head = next((h for h in HEAD_NAMES if hasattr(model, h)), None)
    if head is None:
        raise UserError(f"{spec.name}: no classification head ({', '.join(HEAD_NAMES)}) found")
    if adapter.type == "full":
        return attach_adapter(model, adapter, spec, task_type="SEQ_CLS"), tokenizer
    if adapter.type != "lora":
        raise UserError(
            f"adapter.type: the reward model supports lora or full, not {adapter.type!r}"
        )
    if adapter.changes_base_weights:
        raise UserError(
            f"adapter.init_lora_weights: {adapter.init_lora_weights} is not supported for the "
            "reward model (its score head is saved beside the adapter unconverted); use default "
            "or gaussian"
        )
    if sft_dir is None:
        with_head = adapter.model_copy(update={"modules_to_save": [*adapter.modules_to_save, head]})
        return attach_adapter(model, with_head, spec, task_type="SEQ_CLS"), tokenizer
    # continue the SFT adapter: same LoRA weights, re-targeted at the classifier, head added
    from safetensors.torch import load_file

    config = PeftConfig.from_pretrained(str(sft_dir / ADAPTER_DIR))
    config.task_type = "SEQ_CLS"
    config.inference_mode = False
    config.modules_to_save = sorted({*(config.modules_to_save or []), head})
    state = load_file(str(sft_dir / ADAPTER_DIR / "adapter_model.safetensors"))
    for pname, p in getattr(model, head).named_parameters():  # the new head starts as initialised
        state[f"base_model.model.{head}.{pname}"] = p.detach().clone()
    if spec.quantization != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, config)
    result = set_peft_model_state_dict(model, state)
    if result.unexpected_keys:
        raise UserError(
            f"{sft_dir / ADAPTER_DIR} does not fit the reward model: {result.unexpected_keys[:3]}"
        )
    return model, tokenizer


def _mix_rows(spec: MixSpec, ctx: StageContext) -> tuple[list[dict], list[dict]]:
    """(training rows with ``weight`` applied, held-out rows) of one mix entry."""
    if spec.stage is not None:
        stage = ctx.finished_stage(spec.stage, "mix.stage", ("rollout",))
        path = stage.dir / PREFERENCES_FILE
        if not path.is_file():
            raise UserError(
                f"{ctx.where}.mix: rollout stage {spec.stage!r} wrote no pairs (it has no "
                "labeller or labels)"
            )
        rows = load_preference(str(path)).rows
    else:
        rows = load_preference(spec.source, spec.split).rows
    if not rows:
        raise UserError(f"{ctx.where}.mix: {spec.label!r} has no preference pairs")
    rng = random.Random(f"{ctx.seed}:{spec.label}")
    rows = rng.sample(rows, len(rows))
    held = rows[: min(spec.eval_size, len(rows) // 5)]
    train = rows[len(held) :]
    whole, frac = divmod(spec.weight, 1.0)
    weighted = train * int(whole) + train[: round(frac * len(train))]
    ctx.console.print(f"mix {spec.label}: {len(weighted)} training pairs, {len(held)} held out")
    return weighted, held


def _probe(model, tokenizer, cfg, eval_rows: list[dict], ctx: StageContext) -> dict[str, float]:
    """The RM sanity probe on the trained model; warns about flagged categories."""
    scorer = RewardModelScorer(model, tokenizer, max_length=cfg.max_length)
    result = probe_reward_model(scorer, eval_rows[:128], seed=ctx.seed)
    model.train()
    if not ctx.is_main:
        return {}
    write_json_atomic(ctx.out_dir / PROBE_FILE, {**asdict(result), "flagged": result.flagged})
    for category in result.flagged:
        best = result.examples[category][0]
        ctx.console.print(
            f"[bold yellow]RM probe warning[/] {ctx.where}: {category} answers score "
            f"{result.means[category]:.3g} on average, above the held-out chosen answers' "
            f"{result.chosen_mean:.3g} (e.g. {best[0]!r}: {best[1]:.3g}); a policy trained on "
            "this RM will drift there. Mix comparisons of the policy's own samples into its "
            "data (a rollout stage in mix)."
        )
    return result.metrics()


def _dataset(rows: list[dict], use_margin: bool):
    keep = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]
    if use_margin:
        missing = sum(r.get("margin") is None for r in rows)
        if missing:
            raise UserError(f"use_margin: true but {missing} of {len(rows)} pairs have no margin")
        for k, r in zip(keep, rows, strict=True):
            k["margin"] = float(r["margin"])
    return Dataset.from_list(keep)
