"""Fixtures: the builtin tiny base, and one briefly trained run (SFT, then an eval stage)."""

from __future__ import annotations

import pytest

from alignkit.config import ModelSpec, validate_pipeline
from alignkit.models import load_base, load_tokenizer, resolve_model_path
from alignkit.pipeline import run_pipeline
from alignkit.stages import REGISTRY, stage_kinds

SFT_STEPS = 40
DEMO_BAND = "length(min_words=5, max_words=24, per_word=0.1)"


@pytest.fixture(scope="session")
def tiny():
    """(base model, tokenizer) of builtin:tiny."""
    spec = ModelSpec()
    tokenizer = load_tokenizer(resolve_model_path(spec), spec)
    return load_base(spec, tokenizer), tokenizer


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_pipeline_cfg):
    """A run dir with an SFT stage (LoRA, 40 steps of 32) and an eval stage comparing it with
    the base on 64 builtin:sft test prompts (with references) x 4 samples (about 50 s of CPU)."""
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    raw = tiny_pipeline_cfg(run_dir, steps=SFT_STEPS)
    sft = raw["stages"][0]
    sft["data"]["max_rows"] = SFT_STEPS * 32
    sft["train"].update(per_device_train_batch_size=32, save_steps=1000, logging_steps=20)
    raw["stages"].append(
        {
            "name": "eval",
            "kind": "eval",
            # the demonstrations' 5-24 word band: what a brief SFT reliably teaches (builtin:tiny
            # v2's base already scores about as well as it on gold)
            "rewards": ["gold", DEMO_BAND],
            "n": 4,
            "max_prompts": 64,
            "max_new_tokens": 40,
        }
    )
    run_pipeline(validate_pipeline(raw, stage_kinds()), REGISTRY, run_dir)
    return run_dir
