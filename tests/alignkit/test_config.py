import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from alignkit.config import (
    AdapterSpec,
    apply_override,
    config_hash,
    load_pipeline,
    validate_pipeline,
)
from alignkit.errors import UserError
from alignkit.stages import stage_kinds

ROOT = Path(__file__).resolve().parents[2]
NOT_PIPELINES = {"compare.yaml"}  # validated by its own schema below
CONFIGS = sorted(
    p
    for p in (ROOT / "configs").rglob("*.yaml")
    if "accelerate" not in p.parts and p.name not in NOT_PIPELINES
)


def minimal(**over):
    raw = {
        "run": {"name": "t"},
        "model": {"name": "builtin:tiny"},
        "stages": [{"name": "sft", "kind": "sft", "data": {"source": "builtin:sft"}}],
    }
    raw.update(over)
    return raw


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_config_validates(path):
    cfg = load_pipeline(path, stage_kinds())
    assert cfg.stages


def test_compare_config_validates():
    from alignkit.eval.compare import compare_config

    assert compare_config(ROOT / "configs" / "compare.yaml")


def test_configs_exist():
    assert any(p.name == "quickstart.yaml" for p in CONFIGS)


def test_iterated_rlhf_round_one_is_the_quickstart():
    """iterated-rlhf.yaml shares runs/quickstart: its round-1 stages must hash like the
    quickstart's, or running one re-runs (and replaces) the other's stages."""
    quick, iterated = (
        yaml.safe_load((ROOT / "configs" / name).read_text())
        for name in ("quickstart.yaml", "iterated-rlhf.yaml")
    )
    assert iterated["run"]["dir"] == quick["run"]["dir"]
    for key in ("model", "adapter"):
        assert iterated[key] == quick[key], key
    assert iterated["run"]["seed"] == quick["run"]["seed"]
    stages = {s["name"]: s for s in iterated["stages"]}
    for stage in quick["stages"]:
        if stage["name"] in ("sft", "onpolicy", "reward_model", "ppo"):
            assert stages[stage["name"]] == stage, stage["name"]


def test_unknown_top_level_key_suggests_nearest():
    raw = minimal(adaptor={"type": "lora"})
    with pytest.raises(UserError, match=r"unknown key 'adaptor' \(did you mean 'adapter'\?\)"):
        validate_pipeline(raw, stage_kinds())


def test_unknown_nested_key_in_stage_suggests_nearest():
    raw = minimal(stages=[{"name": "sft", "kind": "sft", "data": {"sorce": "x"}}])
    with pytest.raises(UserError, match=r"unknown key 'data.sorce' \(did you mean 'source'\?\)"):
        validate_pipeline(raw, stage_kinds())


def test_unknown_trainer_knob_is_checked_against_trl_fields():
    raw = minimal(
        stages=[{"kind": "sft", "data": {"source": "s"}, "train": {"learning_rat": 1e-4}}]
    )
    with pytest.raises(UserError, match=r"train.learning_rat.*did you mean 'learning_rate'"):
        validate_pipeline(raw, stage_kinds())


def test_unknown_stage_kind_and_bad_parent():
    with pytest.raises(UserError, match="unknown stage kind 'sfft'.*did you mean 'sft'"):
        validate_pipeline(minimal(stages=[{"kind": "sfft"}]), stage_kinds())
    raw = minimal(stages=[{"kind": "sft", "from": "nope", "data": {"source": "s"}}])
    with pytest.raises(UserError, match="not an earlier stage"):
        validate_pipeline(raw, stage_kinds())


def test_bad_value_names_the_field():
    raw = minimal(model={"name": "m", "quantization": "3bit"})
    with pytest.raises(UserError, match=r"model.quantization"):
        validate_pipeline(raw, stage_kinds())


def test_dotted_overrides_address_stages_by_name_and_parse_yaml():
    raw = minimal()
    apply_override(raw, "stages.sft.train.learning_rate=1e-4")
    apply_override(raw, "model.quantization=4bit")
    apply_override(raw, "adapter.target_modules=[q_proj, v_proj]")
    cfg = validate_pipeline(raw, stage_kinds())
    assert cfg.stages[0].train == {"learning_rate": 1e-4}
    assert cfg.model.quantization == "4bit"
    assert cfg.adapter.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(UserError, match="no stage named 'dpo'"):
        apply_override(raw, "stages.dpo.beta=0.1")
    with pytest.raises(UserError, match="KEY=VALUE"):
        apply_override(raw, "model.name")


def test_config_hash_changes_with_content_only():
    a = validate_pipeline(minimal(), stage_kinds())
    b = validate_pipeline(minimal(), stage_kinds())
    assert config_hash(a.stages[0], a.model) == config_hash(b.stages[0], b.model)
    b.stages[0].max_length = 7
    assert config_hash(a.stages[0], a.model) != config_hash(b.stages[0], b.model)


def test_cli_bad_config_exits_2_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  nmae: x\nstages:\n  - kind: sft\n    data: {source: builtin:sft}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "alignkit", "run", str(bad)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    said = " ".join(proc.stderr.split())  # rich wraps at 80 columns, where the path allows
    assert "unknown key 'model.nmae'" in said and "did you mean 'name'" in said
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("adapter", "error"),
    [
        ({"init_lora_weights": "svd"}, "not one of default, gaussian, pissa, pissa_niter_N"),
        ({"init_lora_weights": "pissa_niter_0"}, "not one of default"),
        ({"type": "ia3", "init_lora_weights": "gaussian"}, "applies to type: lora, not 'ia3'"),
        ({"init_lora_weights": "pissa", "modules_to_save": ["embed_tokens"]}, "keeps only"),
        ({"init_lora_weights": "olora", "use_dora": True}, "cannot be combined"),
        ({"type": "adalora", "r": 8, "adalora": {"init_r": 4}}, r"init_r \(4\) must be >= r"),
        ({"type": "adalora", "adalora": {"tinit": 0.5, "tfinal": 0.5}}, "tinit \\+ tfinal"),
        ({"type": "adalora", "use_dora": True}, "AdaLoRA has neither"),
        ({"type": "full", "loraplus_ratio": 16}, "loraplus_ratio applies to type: lora"),
    ],
)
def test_adapter_options_that_cannot_work_are_refused(adapter, error):
    with pytest.raises(ValidationError, match=error):
        AdapterSpec(**adapter)
