"""SFT on the builtin tiny model: LoRA, QLoRA (4-bit on CPU) and full fine-tuning."""

import pytest
import torch

import alignkit.models as models
from alignkit.config import ModelSpec, validate_pipeline
from alignkit.pipeline import run_pipeline
from alignkit.stages import REGISTRY, stage_kinds

BATCH = ["alpha beta gamma", "the river is calm and bright"]


def logits_of(model, tokenizer):
    enc = tokenizer(BATCH, return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        return model(**enc).logits.float()


def run_and_capture(raw, tmp_path, monkeypatch):
    """Run the pipeline; return the in-memory trained model's logits and the stage dir."""
    captured = {}
    original = models.save_stage_model

    def save_and_capture(model, tokenizer, out_dir, **kw):
        captured["logits"] = logits_of(model, tokenizer)
        captured["trainable"] = {
            n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
        }
        return original(model, tokenizer, out_dir, **kw)

    monkeypatch.setattr(models, "save_stage_model", save_and_capture)
    cfg = validate_pipeline(raw, stage_kinds())
    run_pipeline(cfg, REGISTRY, tmp_path / "run")
    return captured, tmp_path / "run" / "sft"


@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_lora_sft_trains_adapter_and_reloads_to_identical_logits(
    tmp_path, monkeypatch, tiny_pipeline_cfg, quantization
):
    raw = tiny_pipeline_cfg(tmp_path / "run", quantization=quantization)
    captured, stage = run_and_capture(raw, tmp_path, monkeypatch)
    # LoRA B matrices start at zero: training must have moved them
    lora_b = [v for n, v in captured["trainable"].items() if "lora_B" in n]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)
    assert [n for n in captured["trainable"] if "lora" not in n] == []  # only the adapter trains
    assert (stage / "adapter" / "adapter_model.safetensors").exists()
    assert not (stage / "adapter" / "ref").exists()
    spec = ModelSpec(name="builtin:tiny", quantization=quantization)
    reloaded, tok = models.load_stage_model(stage, spec)
    assert tok.chat_template and tok.pad_token_id != tok.eos_token_id
    diff = (logits_of(reloaded, tok) - captured["logits"]).abs().max().item()
    assert diff == 0.0 if quantization == "none" else diff < 1e-4, diff
    if quantization == "none":  # a merged model loads with plain transformers, same logits
        from transformers import AutoModelForCausalLM, AutoTokenizer

        merged = models.merge_stage(stage, tmp_path / "merged")
        plain = AutoModelForCausalLM.from_pretrained(merged)
        plain_tok = AutoTokenizer.from_pretrained(merged)
        assert plain_tok.chat_template == tok.chat_template
        assert (logits_of(plain, plain_tok) - captured["logits"]).abs().max() < 1e-4


def test_full_sft_changes_weights_and_reloads(tmp_path, monkeypatch, tiny_pipeline_cfg):
    raw = tiny_pipeline_cfg(tmp_path / "run", adapter="full")
    captured, stage = run_and_capture(raw, tmp_path, monkeypatch)
    spec = ModelSpec(name="builtin:tiny")
    tok = models.load_tokenizer(models.resolve_model_path(spec))
    base = models.load_base(spec, tok)
    base_params = dict(base.named_parameters())
    changed = [n for n, v in captured["trainable"].items() if not torch.equal(v, base_params[n])]
    assert len(changed) == len(captured["trainable"]) > 10
    assert (stage / "model" / "model.safetensors").exists()
    reloaded, tok = models.load_stage_model(stage, spec)
    assert torch.equal(logits_of(reloaded, tok), captured["logits"])


def test_sft_records_heldout_nll_below_untrained(tmp_path, tiny_pipeline_cfg):
    raw = tiny_pipeline_cfg(tmp_path / "run", steps=30)
    cfg = validate_pipeline(raw, stage_kinds())
    run_pipeline(cfg, REGISTRY, tmp_path / "run")
    import json

    record = json.loads((tmp_path / "run" / "sft" / "stage.json").read_text())
    m = record["metrics"]
    assert m["heldout_nll"] < m["heldout_nll_base"] - 0.05
    assert m["eval_loss"] == m["heldout_nll"] and m["global_step"] == 30
    assert record["adapter_type"] == "lora" and record["base_model"]["name"] == "builtin:tiny"
    lines = (tmp_path / "run" / "sft" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) >= 30  # one per logged step plus evals
    assert not (tmp_path / "run" / "sft" / "checkpoints").exists()


@pytest.mark.parametrize("adapter", ["ia3", "prompt", "prefix"])
def test_other_peft_types_train_and_reload(tmp_path, monkeypatch, tiny_pipeline_cfg, adapter):
    raw = tiny_pipeline_cfg(tmp_path / "run", adapter=adapter)
    raw["stages"][0]["train"]["learning_rate"] = 3e-2
    captured, stage = run_and_capture(raw, tmp_path, monkeypatch)
    assert captured["trainable"]
    spec = ModelSpec(name="builtin:tiny")
    reloaded, tok = models.load_stage_model(stage, spec)
    base = models.load_base(spec, tok)
    assert (logits_of(reloaded, tok) - captured["logits"]).abs().max() < 1e-5
    base_logits = logits_of(base, tok)
    tail = captured["logits"][:, -base_logits.shape[1] :]  # prompt tuning prepends virtual tokens
    assert (base_logits - tail).abs().max() > 1e-4  # the adapter does something


def test_sft_cleans_its_data_and_reports_in_the_stage_dir(tmp_path, tiny_pipeline_cfg):
    import json

    from alignkit.data.sources import load_rows

    rows = [r.data for r in load_rows("builtin:sft")[:40]]
    leaked = {
        "messages": [
            {"role": "user", "content": "Topic: forest market theater journey"},
            rows[0]["messages"][1],
        ]
    }  # fmt: skip  (builtin:prompts[test] row 0)
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [*rows, rows[3], rows[7], leaked]))
    raw = tiny_pipeline_cfg(tmp_path / "run", steps=2)
    stage = raw["stages"][0]
    stage["data"] = {"source": str(data), "eval_size": 4, "group_by": "prompt", "clean": {}}
    stage["heldout"] = {**stage["heldout"], "prompts": "builtin:prompts"}
    run_pipeline(validate_pipeline(raw, stage_kinds()), REGISTRY, tmp_path / "run")
    report = json.loads((tmp_path / "run" / "sft" / "data_clean.json").read_text())
    removed = {rule: c["count"] for rule, c in report["removed"].items() if c["count"]}
    assert removed == {"exact_duplicate": 2, "contaminated": 1}
    metrics = json.loads((tmp_path / "run" / "sft" / "stage.json").read_text())["metrics"]
    assert (metrics["train_rows"], metrics["eval_rows"]) == (36, 4)
