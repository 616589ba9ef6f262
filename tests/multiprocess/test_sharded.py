"""Sharded engines: DeepSpeed ZeRO-2/3 (the ``deepspeed`` extra) — the shipped launch configs are
valid DeepSpeed configs, and SFT on two CPU processes under each trains the model one process
would, saving an adapter plain peft loads — and a raw FSDP2 LoRA save."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import ClusterConfig

sys.path.insert(0, str(Path(__file__).parent))
from launch import free_port, launch, pipeline  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"
ZERO = ["zero2", "zero3"]


@pytest.mark.parametrize("name", ZERO)
def test_shipped_zero_config_is_a_valid_deepspeed_config(name, monkeypatch):
    """What accelerate hands DeepSpeed from our YAML, with its "auto" sizes filled as the
    Trainer fills them, passes DeepSpeed's own config validation."""
    pytest.importorskip("deepspeed")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from accelerate.utils import DeepSpeedPlugin
    from deepspeed.runtime.config import DeepSpeedConfig

    launch_cfg = ClusterConfig.from_yaml_file(CONFIGS / f"{name}.yaml")
    ds = DeepSpeedPlugin(**launch_cfg.deepspeed_config).deepspeed_config
    ds = {**ds, "train_micro_batch_size_per_gpu": 4, "bf16": {"enabled": True}}
    ds.pop("train_batch_size")
    checked = DeepSpeedConfig(ds)
    assert checked.zero_optimization_stage == int(name[-1])
    assert checked.gradient_clipping == 1.0 and checked.bfloat16_config.enabled
    if name == "zero3":  # without it, a ZeRO-3 save writes empty adapter tensors
        assert checked.zero_config.gather_16bit_weights_on_model_save


def sft_only(batch: int) -> dict:
    """SFT with its held-out evaluation (sampling: under ZeRO-3 every rank must join it)."""
    raw = pipeline(batch)
    raw["stages"] = raw["stages"][:1]
    raw["stages"][0]["heldout"] = {"num_prompts": 4, "samples_per_prompt": 1, "max_new_tokens": 8}
    return raw


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return launch(1, 8, tmp_path_factory.mktemp("one") / "run1", sft_only(8))


def _losses(root: Path) -> list[float]:
    rows = [json.loads(x) for x in (root / "run" / "sft" / "metrics.jsonl").open()]
    return [v for r in rows if "loss" in r for v in (r["loss"], r["grad_norm"])]


def every_tensor_sharded(tmp_path: Path) -> Path:
    """ZeRO-3 as on a real model: the tiny model's LoRA tensors are under DeepSpeed's
    persistence threshold (kept whole on every rank); a 7B model's are not. Threshold 0 shards
    every tensor, so saving without gathering would write empty ones."""
    ds = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
          "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                "stage3_gather_16bit_weights_on_model_save": True}}  # fmt: skip
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    launch_cfg = tmp_path / "zero3-sharded.yaml"
    launch_cfg.write_text(
        "distributed_type: DEEPSPEED\nnum_machines: 1\nnum_processes: 2\nuse_cpu: false\n"
        f"deepspeed_config:\n  deepspeed_config_file: {tmp_path / 'ds.json'}\n"
        "  zero3_init_flag: true\n"
    )
    return launch_cfg


@pytest.mark.slow
@pytest.mark.parametrize("name", [*ZERO, "zero3-sharded"])
def test_zero_sft_on_two_processes_trains_the_one_process_model(name, one_process, tmp_path):
    pytest.importorskip("deepspeed")
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from alignkit.builtin.tiny import ensure_tiny_model

    launch_cfg = (
        every_tensor_sharded(tmp_path) if name == "zero3-sharded" else CONFIGS / f"{name}.yaml"
    )
    two = launch(2, 4, tmp_path / name, sft_only(4), accelerate_config=launch_cfg)
    manifest = json.loads((two / "run" / "manifest.json").read_text())
    assert manifest["processes"] == {"world_size": 2, "launcher": "accelerate",
                                     "engine": f"deepspeed zero-{name[4]}"}  # fmt: skip
    assert manifest["stages"][0]["status"] == "complete"
    assert "kl_ref" in manifest["stages"][0]["metrics"]  # the held-out evaluation ran
    assert _losses(two) == pytest.approx(_losses(one_process), abs=1e-5)  # 2 steps: synced
    adapter = two / "run" / "sft" / "adapter"
    saved, single = (load_file(d / "sft" / "adapter" / "adapter_model.safetensors")
                     for d in (two / "run", one_process / "run"))  # fmt: skip
    assert saved.keys() == single.keys()
    for key in saved:  # real tensors (not ZeRO-3's empty placeholders), the 1-process values
        assert saved[key].shape == single[key].shape
        assert torch.allclose(saved[key], single[key], atol=1e-4), key
    base = AutoModelForCausalLM.from_pretrained(ensure_tiny_model())
    model = PeftModel.from_pretrained(base, adapter)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.isfinite(model(ids).logits).all()


def test_raw_fsdp2_lora_save_loads_with_plain_peft(tmp_path):
    """FSDP2 (``fully_shard``) on a peft LoRA model, 2 CPU processes: the gathered adapter the
    stage saver writes is whole, trained, and plain peft loads exactly those values."""
    import subprocess

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from alignkit.builtin.tiny import ensure_tiny_model

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", str(Path(__file__).with_name("fsdp2_worker.py")),
           str(tmp_path)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    expected = torch.load(tmp_path / "expected.pt")
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(ensure_tiny_model()), tmp_path / "adapter"
    )
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert loaded.keys() == expected.keys() and expected
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key
    assert all(v.abs().max() > 0 for k, v in expected.items() if "lora_B" in k)  # trained
