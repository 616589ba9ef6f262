"""A new policy stage kind on a TRL trainer is one file and one registry line: this KTO stage
(TRL's KTOTrainer on unpaired good/bad answers) writes only its config and its build step, and
gets the parent check, held-out evaluation, health checks, forgetting, the model card and saving
from stages/policy.py and the pipeline."""

import json
from typing import ClassVar, Literal

import torch
from datasets import Dataset
from rich.console import Console
from trl import KTOConfig, KTOTrainer

from alignkit.config import ModelSpec
from alignkit.config import validate_pipeline as validate
from alignkit.data.preference import load_preference
from alignkit.data.split import train_eval_rows
from alignkit.handoff import ADAPTER_DIR, REFERENCE_ADAPTER, PolicyPair
from alignkit.health import HealthSpec
from alignkit.models import load_stage_model
from alignkit.pipeline import StageContext, StageKind, StageResult, run_pipeline
from alignkit.rundir import STAGE_FILE
from alignkit.stages import REGISTRY, policy
from alignkit.stages.common import data_context
from alignkit.training import make_trl_trainer, stage_trl_args


# --- the new stage: what would be stages/kto.py ------------------------------------------------
class KTOStageConfig(policy.PreferenceStageConfig):
    kind: Literal["kto"] = "kto"
    trainer_config: ClassVar[str] = "trl.KTOConfig"

    health: HealthSpec = HealthSpec()
    """Training health checks (KL, length, repetition, reward vs gold)."""


def run(cfg: KTOStageConfig, ctx: StageContext) -> StageResult:
    torch.manual_seed(ctx.seed)
    context = data_context(ctx, cfg.data, cfg.heldout)
    train_rows, eval_rows = train_eval_rows(cfg.data, load_preference, ctx.seed, context)
    model, tokenizer, adapter, saved = policy.start_policy(cfg, ctx, "kto")
    args = stage_trl_args(
        KTOConfig, cfg, ctx, beta=cfg.beta, max_length=cfg.max_length, per_device_eval_batch_size=16
    )
    trainer = make_trl_trainer(
        KTOTrainer, ctx, saved, options=cfg, adapter=adapter, model=model, args=args,
        processing_class=tokenizer,
        train_dataset=unpaired(train_rows), eval_dataset=unpaired(eval_rows),
    )  # fmt: skip
    pair = PolicyPair.of(trainer.model, trainer.ref_model, base_is_reference=True)
    counts = {"train_rows": float(len(train_rows)), "eval_rows": float(len(eval_rows))}
    built = policy.PolicyTrainer(
        trainer, tokenizer, pair, adapter.type, counts, bool(eval_rows), health_logs={}
    )
    return policy.finish(cfg, ctx, built, policy.train(cfg, ctx, built))


def unpaired(rows: list[dict]) -> Dataset:
    good = [{"prompt": r["prompt"], "completion": r["chosen"], "label": True} for r in rows]
    bad = [{"prompt": r["prompt"], "completion": r["rejected"], "label": False} for r in rows]
    return Dataset.from_list([x for pair in zip(good, bad, strict=True) for x in pair])


# --- the one registry line ---------------------------------------------------------------------
WITH_KTO = {**REGISTRY, "kto": StageKind(KTOStageConfig, run)}


def test_a_new_policy_stage_gets_heldout_health_and_saving_from_the_core(
    tmp_path, tiny_pipeline_cfg
):
    raw = tiny_pipeline_cfg(tmp_path, steps=2)
    raw["stages"].append({
        "name": "kto", "kind": "kto",
        "data": {"source": "builtin:preference", "eval_split": "test", "max_rows": 32,
                 "max_eval_rows": 8},
        "max_length": 64,
        "heldout": {"num_prompts": 4, "samples_per_prompt": 1, "max_new_tokens": 8},
        "health": {"every": 2, "sample_prompts": 2, "max_new_tokens": 8},
        "train": {"max_steps": 2, "per_device_train_batch_size": 8, "learning_rate": 1e-2,
                  "logging_steps": 1},
    })  # fmt: skip
    kinds = {kind: entry.config_cls for kind, entry in WITH_KTO.items()}
    run_pipeline(validate(raw, kinds), WITH_KTO, tmp_path, Console(quiet=True))

    record = json.loads((tmp_path / "kto" / STAGE_FILE).read_text())
    assert record["parent"] == "sft" and record["is_policy"] is True
    metrics = record["metrics"]
    assert metrics["global_step"] == 2 and metrics["train_rows"] == 32
    assert "before_eval_loss" in metrics and "eval_loss" in metrics  # evaluated before and after
    assert {"kl_ref", "gold_reward", "gold_reward_ref", "heldout_prompts"} <= metrics.keys()
    assert record["health"]["checks"] == 2  # before training and at step 2
    # forgetting measured from the SFT policy it started from; a card names the parent
    sft_record = json.loads((tmp_path / "sft" / STAGE_FILE).read_text())
    before = sft_record["metrics"]["forgetting_nll_after"]
    assert abs(metrics["forgetting_nll_before"] - before) < 1e-5
    assert "**Parent stage:** `sft`" in (tmp_path / "kto" / ADAPTER_DIR / "README.md").read_text()
    # the policy adapter alone is saved, moved away from the SFT stage it started from
    saved = tmp_path / "kto" / ADAPTER_DIR
    assert (saved / "adapter_config.json").is_file() and not (saved / REFERENCE_ADAPTER).exists()
    ids = torch.tensor([[5, 6, 7, 8]])
    sft, _ = load_stage_model(tmp_path / "sft", ModelSpec())
    kto, _ = load_stage_model(tmp_path / "kto", ModelSpec())
    with torch.no_grad():
        assert (sft(ids).logits - kto(ids).logits).abs().max() > 1e-4
