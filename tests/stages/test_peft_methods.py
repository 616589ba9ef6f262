"""AdaLoRA and the LoRA initialisations that change the base (PiSSA, OLoRA): each trains in SFT,
reloads on the original base to the trained model, and hands off to DPO, whose policy and
reference start equal (step-0 implicit rewards exactly 0)."""

import json
import math

import pytest
import torch

import alignkit.models as models
from alignkit.config import ModelSpec, validate_pipeline
from alignkit.errors import UserError
from alignkit.pipeline import run_pipeline
from alignkit.stages import REGISTRY, stage_kinds

BATCH = ["Topic: river garden\nText: the calm", "Topic: school music\nText:"]
ADAPTERS = {
    "adalora": {"type": "adalora", "r": 4, "adalora": {"init_r": 8, "tinit": 0.2, "tfinal": 0.3}},
    "pissa": {"type": "lora", "r": 8, "alpha": 16, "init_lora_weights": "pissa"},
    "olora": {"type": "lora", "r": 8, "alpha": 16, "init_lora_weights": "olora"},
}


def logits_of(model, tokenizer):
    enc = tokenizer(BATCH, return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        return model(**enc).logits.float()


def sft_then_dpo(run_dir, adapter: dict, tiny_pipeline_cfg) -> dict:
    raw = tiny_pipeline_cfg(run_dir, steps=10)
    raw["adapter"] = adapter
    raw["stages"][0]["heldout"] = {"enabled": False}
    raw["stages"][0]["train"]["learning_rate"] = 2e-2
    raw["stages"].append(
        {"name": "dpo", "kind": "dpo", "max_length": 64, "health": {"enabled": False},
         "heldout": {"enabled": False},
         "data": {"source": "builtin:preference", "max_rows": 16, "eval_split": "test",
                  "max_eval_rows": 8},
         "train": {"max_steps": 1, "per_device_train_batch_size": 8, "learning_rate": 1e-4}}
    )  # fmt: skip
    return raw


@pytest.mark.parametrize(
    "method", ["adalora", "pissa", pytest.param("olora", marks=pytest.mark.slow)]
)
def test_trains_reloads_on_the_original_base_and_hands_off_to_dpo(
    method, tmp_path, monkeypatch, tiny_pipeline_cfg
):
    trained = {}
    real_save = models.save_stage_model

    def save_and_capture(model, tokenizer, out_dir, **kw):
        trained.setdefault("logits", logits_of(model, tokenizer))  # the SFT stage's, first
        return real_save(model, tokenizer, out_dir, **kw)

    monkeypatch.setattr(models, "save_stage_model", save_and_capture)
    raw = sft_then_dpo(tmp_path / "run", ADAPTERS[method], tiny_pipeline_cfg)
    run_pipeline(validate_pipeline(raw, stage_kinds()), REGISTRY, tmp_path / "run")

    sft = tmp_path / "run" / "sft"
    record = json.loads((sft / "stage.json").read_text())
    assert record["metrics"]["eval_loss"] < record["metrics"]["before_eval_loss"]  # it trained
    saved = json.loads((sft / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and not (sft / "adapter_init").exists()
    if method == "adalora":  # the budget pruned: fewer ranks than 8 per module remain
        ranks = saved["rank_pattern"]
        assert ranks and sum(ranks.values()) / len(ranks) < 8 and saved["alpha_pattern"] == ranks
    else:  # converted against the initial adapter: rank 2r, a plain LoRA init
        assert (saved["r"], saved["init_lora_weights"]) == (16, True)

    # plain load on the original (untouched) base gives the model SFT trained
    spec = ModelSpec(name="builtin:tiny")
    reloaded, tok = models.load_stage_model(sft, spec)
    base = models.load_base(spec, tok)
    for name, p in base.named_parameters():
        assert torch.equal(reloaded.get_base_model().get_parameter(name), p), name
    assert (logits_of(reloaded, tok) - trained["logits"]).abs().max() < 1e-4
    assert (logits_of(base, tok) - trained["logits"]).abs().max() > 1e-2

    # DPO continues it as LoRA; its reference is the same adapter: the rewards start at 0
    before = json.loads((tmp_path / "run" / "dpo" / "stage.json").read_text())["metrics"]
    assert before["before_eval_rewards/chosen"] == 0 and before["before_eval_rewards/rejected"] == 0
    assert abs(before["before_eval_loss"] - math.log(2)) < 1e-6


def test_a_new_adalora_adapter_outside_sft_is_refused(tmp_path, tiny_pipeline_cfg):
    raw = sft_then_dpo(tmp_path / "run", ADAPTERS["adalora"], tiny_pipeline_cfg)
    raw["stages"] = raw["stages"][1:]
    with pytest.raises(UserError, match=r"stages.dpo: a new AdaLoRA adapter is created by an SFT"):
        run_pipeline(validate_pipeline(raw, stage_kinds()), REGISTRY, tmp_path / "run")
