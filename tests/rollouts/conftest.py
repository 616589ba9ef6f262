"""Fixtures: the builtin tiny model as an HF engine, builtin prompts, a LoRA stage on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alignkit.builtin import load_builtin
from alignkit.models import load_base, load_tokenizer
from alignkit.rollouts.hf import HFEngine
from alignkit.rollouts.source import model_source


def messages(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="session")
def tiny_source():
    return model_source(model="builtin:tiny")


@pytest.fixture(scope="session")
def tiny_engine(tiny_source):
    return HFEngine.from_source(tiny_source, batch_size=32)


@pytest.fixture(scope="session")
def test_prompts():
    return [messages(r["prompt"]) for r in load_builtin("prompts", "test")[:8]]


def make_lora_stage(stage_dir: Path, seed: int = 0, modules_to_save=None) -> Path:
    """A finished 'sft' stage: a LoRA adapter with random B, large enough that sampling
    with the same seed picks other tokens than the base."""
    from peft import LoraConfig, get_peft_model

    source = model_source(model="builtin:tiny")
    tok = load_tokenizer(source.tokenizer_dir, source.spec)
    model = load_base(source.spec, tok)
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules="all-linear", modules_to_save=modules_to_save
    )
    model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    model.save_pretrained(stage_dir / "adapter")
    tok.save_pretrained(stage_dir)
    record = {
        "name": stage_dir.name,
        "kind": "sft",
        "base_model": {"name": "builtin:tiny", "revision": None, "dtype": "float32"},
        "quantization": "none",
        "adapter_type": "lora",
    }
    (stage_dir / "stage.json").write_text(json.dumps(record))
    return stage_dir


@pytest.fixture(scope="session")
def lora_stage(tmp_path_factory):
    return make_lora_stage(tmp_path_factory.mktemp("run") / "sft")
