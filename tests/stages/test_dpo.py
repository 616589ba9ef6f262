"""The SFT -> DPO handoff: policy and reference both start as the SFT adapter, on one base."""

import math

import pytest
import torch
from rich.console import Console
from trl.trainer.utils import use_adapter

from alignkit.config import AdapterSpec, DataSpec, ModelSpec, validate_pipeline
from alignkit.handoff import StageOutput
from alignkit.models import load_stage_model
from alignkit.pipeline import StageContext, run_pipeline
from alignkit.rundir import RunDir
from alignkit.stages import REGISTRY, stage_kinds
from alignkit.stages.dpo import DPOStageConfig, build_trainer

BATCH = ["Topic: river garden", "Topic: school music the bright calm"]


@pytest.fixture(scope="module", params=["none", "4bit"])
def sft_stage(request, tmp_path_factory, tiny_pipeline_cfg):
    run_dir = tmp_path_factory.mktemp(f"sft-{request.param}")
    raw = tiny_pipeline_cfg(run_dir, quantization=request.param, steps=6)
    run_pipeline(validate_pipeline(raw, stage_kinds()), REGISTRY, run_dir, Console(quiet=True))
    return request.param, RunDir(run_dir)


def same_bits(a, b):
    """Bitwise equality (4-bit weights are packed into float storage, where NaN != NaN)."""
    return torch.equal(a.detach().contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def logits(model, tok):
    enc = tok(BATCH, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits.float()


def test_dpo_starts_at_sft_and_only_the_policy_adapter_moves(sft_stage, tmp_path):
    quantization, rd = sft_stage
    spec = ModelSpec(name="builtin:tiny", quantization=quantization)
    ctx = StageContext(
        name="dpo",
        model=spec,
        adapter=AdapterSpec(r=8, alpha=16),
        seed=0,
        out_dir=tmp_path,
        parent=StageOutput("sft", "sft", rd.stage_dir("sft"), rd.stage_json("sft")),
        resume_from=None,
        console=Console(quiet=True),
    )
    cfg = DPOStageConfig(
        name="dpo",
        data=DataSpec(
            source="builtin:preference", eval_split="test", max_rows=32, max_eval_rows=16
        ),
        max_length=64,
        train={"max_steps": 3, "per_device_train_batch_size": 8, "learning_rate": 1e-3},
    )
    trainer, tok, *_ = build_trainer(cfg, ctx)
    model = trainer.model
    assert set(model.peft_config) == {"default", "ref"}
    model.eval()

    # the reference computes exactly what the saved SFT stage computes, not the base
    sft_model, _ = load_stage_model(rd.stage_dir("sft"), spec)
    sft_logits = logits(sft_model, tok)
    with use_adapter(model, "ref"):
        ref_logits = logits(model, tok)
    with use_adapter(model, None):
        base_logits = logits(model, tok)
    assert (ref_logits - sft_logits).abs().max() < 1e-5
    assert (base_logits - sft_logits).abs().max() > 1e-3
    assert torch.equal(logits(model, tok), ref_logits)  # the policy starts equal too

    # step 0: policy == reference, so the sigmoid loss is ln 2 and the implicit rewards are 0
    before = trainer.evaluate()
    assert abs(before["eval_loss"] - math.log(2)) < 1e-3
    assert before["eval_rewards/chosen"] == 0 and before["eval_rewards/rejected"] == 0

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if ".default." not in n}
    policy = {n: p.detach().clone() for n, p in model.named_parameters() if ".default." in n}
    trainer.train()
    for n, p in model.named_parameters():
        if n in frozen:
            assert same_bits(p, frozen[n]), f"{n} changed (base or ref must stay frozen)"
    moved = [n for n, p in model.named_parameters() if n in policy and not same_bits(p, policy[n])]
    assert any("lora_B" in n for n in moved)
    # the optimizer only ever held the policy adapter
    held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in held}
    assert names and all(".default." in n for n in names)
