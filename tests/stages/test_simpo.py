"""SimPO and ORPO (reference-free, TRL experimental trainers) continue the SFT adapter."""

import json

import pytest
import torch
from rich.console import Console

from alignkit.config import ModelSpec, validate_pipeline
from alignkit.models import load_stage_model
from alignkit.pipeline import run_pipeline
from alignkit.stages import REGISTRY, stage_kinds


@pytest.mark.parametrize("kind", ["simpo", "orpo"])
def test_reference_free_stage_trains_from_sft(tmp_path, tiny_pipeline_cfg, kind):
    raw = tiny_pipeline_cfg(tmp_path, steps=2)
    pref = {
        "source": "builtin:preference",
        "eval_split": "test",
        "max_rows": 32,
        "max_eval_rows": 16,
    }
    raw["stages"].append(
        {"name": kind, "kind": kind, "data": pref, "max_length": 64,
         "heldout": {"num_prompts": 4, "samples_per_prompt": 1, "max_new_tokens": 8},
         "train": {"max_steps": 3, "per_device_train_batch_size": 8, "learning_rate": 1e-2}}
    )  # fmt: skip
    run_pipeline(validate_pipeline(raw, stage_kinds()), REGISTRY, tmp_path, Console(quiet=True))
    record = json.loads((tmp_path / kind / "stage.json").read_text())
    assert record["parent"] == "sft" and record["metrics"]["global_step"] == 3
    assert "eval_loss" in record["metrics"] and "kl_ref" in record["metrics"]
    enc_ids = torch.tensor([[5, 6, 7, 8]])
    sft, _ = load_stage_model(tmp_path / "sft", ModelSpec())
    tuned, _ = load_stage_model(tmp_path / kind, ModelSpec())
    with torch.no_grad():
        assert (sft(enc_ids).logits - tuned(enc_ids).logits).abs().max() > 1e-4
    assert not (tmp_path / kind / "adapter" / "start").exists()
