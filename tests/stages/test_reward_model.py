"""Reward model: trains, its score head survives the save/reload, and the scorer uses it."""

import json

import torch
from rich.console import Console

from alignkit.config import validate_pipeline
from alignkit.models import merge_stage
from alignkit.pipeline import run_pipeline
from alignkit.rewards.gold import gold_reward
from alignkit.rewards.reward_model import RewardModelScorer
from alignkit.stages import REGISTRY, stage_kinds

PROMPTS = ["Topic: river garden", "Topic: school music", "Topic: river garden"]
COMPLETIONS = [
    "the river is bright and the garden is lovely .",
    "sad awful music at the gloomy school",
    "garden",
]


def rm_pipeline(run_dir, steps=40):
    return {
        "run": {"name": "rm", "seed": 0},
        "model": {"name": "builtin:tiny"},
        "adapter": {"type": "lora", "r": 8, "alpha": 16},
        "stages": [
            {
                "name": "rm",
                "kind": "reward_model",
                "data": {
                    "source": "builtin:preference",
                    "eval_split": "test",
                    "max_rows": 640,
                    "max_eval_rows": 128,
                },
                "max_length": 64,
                "train": {
                    "max_steps": steps,
                    "per_device_train_batch_size": 16,
                    "learning_rate": 3e-3,
                },
            }
        ],
    }


def test_reward_model_trains_and_reloads_to_the_same_scores(tmp_path, monkeypatch):
    import alignkit.models as models

    captured = {}
    original = models.save_stage_model

    def capture(model, tokenizer, out_dir, **kw):
        captured["scores"] = RewardModelScorer(model, tokenizer, max_length=64)(
            PROMPTS, COMPLETIONS
        )
        return original(model, tokenizer, out_dir, **kw)

    monkeypatch.setattr(models, "save_stage_model", capture)
    cfg = validate_pipeline(rm_pipeline(tmp_path / "run"), stage_kinds())
    run_pipeline(cfg, REGISTRY, tmp_path / "run", Console(quiet=True))
    stage = tmp_path / "run" / "rm"
    metrics = json.loads((stage / "stage.json").read_text())["metrics"]
    # an untrained score head already reads the pretrained base's sentiment features (its
    # accuracy is far from chance, either way round): the loss is what must fall
    assert metrics["eval_loss"] < metrics["before_eval_loss"] - 0.1
    assert metrics["heldout_pairwise_accuracy"] >= 0.9
    cfg_json = json.loads((stage / "adapter" / "adapter_config.json").read_text())
    assert "score" in cfg_json["modules_to_save"]

    scorer = RewardModelScorer.from_path(stage)
    reloaded = scorer(PROMPTS, COMPLETIONS)
    assert max(abs(a - b) for a, b in zip(reloaded, captured["scores"], strict=True)) < 1e-4
    # scoring is batch-independent (padding never leaks into the score)
    one_by_one = [scorer([p], [c])[0] for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    assert max(abs(a - b) for a, b in zip(one_by_one, reloaded, strict=True)) < 1e-4
    # the trained RM agrees with the gold reward on a clear pair
    gold = gold_reward(PROMPTS[:2], COMPLETIONS[:2])
    assert (reloaded[0] > reloaded[1]) == (gold[0] > gold[1])

    # merged full model scores like base + adapter, loaded by plain transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    merged = merge_stage(stage, tmp_path / "merged")
    plain = RewardModelScorer(
        AutoModelForSequenceClassification.from_pretrained(merged),
        AutoTokenizer.from_pretrained(merged),
        max_length=64,
    )
    assert (
        max(abs(a - b) for a, b in zip(plain(PROMPTS, COMPLETIONS), reloaded, strict=True)) < 1e-4
    )
    assert torch.is_tensor(torch.tensor(reloaded))


def test_reward_model_from_sft_continues_the_sft_adapter(tmp_path, tiny_pipeline_cfg):
    from safetensors.torch import load_file

    from alignkit.config import AdapterSpec, ModelSpec
    from alignkit.stages.reward_model import load_reward_model_for_training

    raw = tiny_pipeline_cfg(tmp_path / "run", steps=3)
    run_pipeline(
        validate_pipeline(raw, stage_kinds()), REGISTRY, tmp_path / "run", Console(quiet=True)
    )
    sft_adapter = tmp_path / "run" / "sft" / "adapter"
    model, _ = load_reward_model_for_training(ModelSpec(), AdapterSpec(), sft_adapter.parent)
    saved = load_file(str(sft_adapter / "adapter_model.safetensors"))
    params = dict(model.named_parameters())
    lora = [k for k in saved if "lora_B" in k]
    assert lora
    for key in lora:
        loaded = params[key.replace(".lora_B.weight", ".lora_B.default.weight")]
        assert torch.equal(loaded, saved[key]) and loaded.abs().sum() > 0
    assert any("score" in n and p.requires_grad for n, p in params.items())
