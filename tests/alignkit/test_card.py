"""Every stage's model card and forgetting record, on a small sft -> dpo -> eval pipeline."""

import json

import pytest
import torch
from huggingface_hub import ModelCard
from peft import PeftModel
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignkit.builtin import ensure_tiny_model
from alignkit.config import ModelSpec, validate_pipeline
from alignkit.models import load_stage_model
from alignkit.pipeline import run_pipeline
from alignkit.stages import REGISTRY, stage_kinds

STAGES = ("sft", "dpo", "compare")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_pipeline_cfg):
    run_dir = tmp_path_factory.mktemp("cards")
    raw = tiny_pipeline_cfg(run_dir, steps=3)
    raw["stages"] += [
        {
            "name": "dpo",
            "kind": "dpo",
            "data": {
                "source": "builtin:preference",
                "eval_split": "test",
                "max_rows": 32,
                "max_eval_rows": 16,
            },
            "max_length": 64,
            "heldout": {"num_prompts": 4, "samples_per_prompt": 1, "max_new_tokens": 8},
            "train": {"max_steps": 2, "per_device_train_batch_size": 8, "learning_rate": 1e-3},
        },  # fmt: skip
        {"name": "compare", "kind": "eval", "max_prompts": 4, "n": 1, "max_new_tokens": 8},
    ]
    run_pipeline(validate_pipeline(raw, stage_kinds()), REGISTRY, run_dir, Console(quiet=True))
    return run_dir


def test_every_stage_has_a_card_naming_its_parent_and_data_hashes(run_dir):
    for stage in STAGES:
        record = json.loads((run_dir / stage / "stage.json").read_text())
        dirs = [run_dir / stage] + ([run_dir / stage / "adapter"] if stage != "compare" else [])
        for directory in dirs:
            card = ModelCard.load(
                directory / "README.md"
            )  # the Hub's parser reads the front matter
            assert "alignkit" in card.data.tags and stage in card.text.strip().splitlines()[0]
            parent = f"`{record['parent']}`" if record["parent"] else "none"
            assert f"**Parent stage:** {parent}" in card.text
            assert record["data"], stage
            for used in record["data"]:
                assert used["sha256"] in card.text and f"| {used['rows']} |" in card.text
    dpo = ModelCard.load(run_dir / "dpo" / "adapter" / "README.md")
    assert dpo.data.library_name == "peft" and "dpo" in dpo.data.tags
    sft = json.loads((run_dir / "sft" / "stage.json").read_text())
    lineage = dpo.text.split("## Lineage")[1].split("##")[0]
    assert f"`{sft['config_hash']}`" in lineage and sft["data"][0]["sha256"][:12] in lineage
    assert "4 prompts x 1 samples" in dpo.text  # a metric names the set it was measured on


def test_a_carded_adapter_directory_still_loads_with_plain_peft(run_dir):
    adapter = run_dir / "dpo" / "adapter"
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    base = AutoModelForCausalLM.from_pretrained(ensure_tiny_model())
    model = PeftModel.from_pretrained(base, adapter)
    ours, _ = load_stage_model(run_dir / "dpo", ModelSpec(name="builtin:tiny"))
    enc = tokenizer(["the river is calm"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, ours(**enc).logits)


def test_forgetting_is_recorded_per_stage_and_reported_by_the_comparison(run_dir):
    m = {s: json.loads((run_dir / s / "stage.json").read_text())["metrics"] for s in STAGES}
    for stage in ("sft", "dpo"):
        assert m[stage]["forgetting_texts"] == 256
        increase = m[stage]["forgetting_nll_after"] - m[stage]["forgetting_nll_before"]
        assert m[stage]["forgetting_nll_increase"] == pytest.approx(increase)
    # SFT trained (3 steps at lr 3e-3): its general-text NLL moved; DPO started where SFT ended
    assert m["sft"]["forgetting_nll_after"] != m["sft"]["forgetting_nll_before"]
    assert m["dpo"]["forgetting_nll_before"] == pytest.approx(
        m["sft"]["forgetting_nll_after"], abs=1e-5
    )
    results = json.loads((run_dir / "compare" / "results.json").read_text())
    by_label = {model["label"]: model.get("forgetting") for model in results["models"]}
    assert by_label["base"] is None
    assert by_label["dpo"]["nll_after"] == m["dpo"]["forgetting_nll_after"]
    assert by_label["dpo"]["source"] == "builtin:pretraining"
    report = (run_dir / "compare" / "report.md").read_text()
    assert "## Forgetting" in report and f"{m['sft']['forgetting_nll_after']:.3f}" in report
