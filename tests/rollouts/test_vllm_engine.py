"""The vLLM engine. What needs no GPU (adapter checks, tensor-parallel checks, the lazy import)
runs everywhere; the engine itself runs only under ``-m vllm`` with vLLM and a CUDA GPU."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from alignkit.errors import UserError
from alignkit.rollouts.source import model_source
from alignkit.rollouts.vllm import (
    VLLMConfig,
    check_adapter,
    check_tensor_parallel,
    lora_rank_slot,
)

from .conftest import make_lora_stage, messages

HAVE_VLLM = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()
needs_vllm = pytest.mark.skipif(
    not HAVE_VLLM,
    reason="needs vLLM and a CUDA GPU (pip install 'alignkit[vllm]' on a GPU machine, then pytest -m vllm)",
)


def test_importing_the_engine_module_does_not_import_vllm():
    code = "import sys, alignkit.rollouts.vllm, alignkit.rollouts.job; print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.skipif(HAVE_VLLM, reason="vLLM is installed here")
def test_without_vllm_the_engine_says_how_to_get_it(tiny_source):
    from alignkit.rollouts import load_engine

    with pytest.raises(UserError, match=r"vllm extra.*--engine hf"):
        load_engine("vllm", tiny_source)
    with pytest.raises(UserError, match="did you mean 'vllm'"):
        load_engine("vlm", tiny_source)


def test_lora_rank_slots():
    assert [lora_rank_slot(r) for r in (1, 4, 8, 12, 16, 300, 512)] == [1, 8, 8, 16, 16, 320, 512]
    with pytest.raises(UserError, match="larger than vLLM supports"):
        lora_rank_slot(1024)


def test_tensor_parallel_is_checked_against_gpus_and_heads(tiny_source):
    config = AutoConfig.from_pretrained(tiny_source.model_path)  # 4 heads, 2 KV heads
    check_tensor_parallel(1, config, device_count=1)
    check_tensor_parallel(4, config, device_count=4)  # KV heads replicated: 4 % 2 == 0
    with pytest.raises(UserError, match="needs 2 GPUs; 1 visible"):
        check_tensor_parallel(2, config, device_count=1)
    with pytest.raises(UserError, match="does not divide the model's 4 attention heads"):
        check_tensor_parallel(3, config, device_count=8)
    with pytest.raises(ValueError):
        VLLMConfig(tensor_parallel_size=0)
    with pytest.raises(ValueError):
        VLLMConfig(gpu_memory_utilization=1.5)


def test_a_policy_lora_passes_the_adapter_check(lora_stage, tiny_source):
    assert check_adapter(lora_stage / "adapter", tiny_source.model_path) == 8


def test_adapters_vllm_would_misapply_are_refused(tmp_path, tiny_source):
    base = tiny_source.model_path
    value_head = make_lora_stage(tmp_path / "rm", modules_to_save=["lm_head"]) / "adapter"
    with pytest.raises(UserError, match="modules_to_save.*reward-model or value adapter"):
        check_adapter(value_head, base)

    good = make_lora_stage(tmp_path / "sft") / "adapter"
    foreign = shutil.copytree(good, tmp_path / "foreign")  # an adapter for a deeper model
    weights = load_file(foreign / "adapter_model.safetensors")
    save_file(
        {k.replace("layers.1.", "layers.7."): v for k, v in weights.items()},
        foreign / "adapter_model.safetensors",
    )
    with pytest.raises(UserError, match="missing from the base model.*layers.7"):
        check_adapter(foreign, base)

    empty = shutil.copytree(good, tmp_path / "empty")
    save_file({"unrelated": torch.zeros(1)}, empty / "adapter_model.safetensors")
    with pytest.raises(UserError, match="no LoRA weights"):
        check_adapter(empty, base)

    dora = shutil.copytree(good, tmp_path / "dora")
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(UserError, match="DoRA"):
        check_adapter(dora, base)


# --- on a GPU with vLLM ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_setup(tmp_path_factory):
    """Two LoRA stages on builtin:tiny, one vLLM engine serving the first."""
    from alignkit.rollouts.vllm import VLLMEngine

    root = tmp_path_factory.mktemp("vllm")
    first, second = make_lora_stage(root / "a", seed=0), make_lora_stage(root / "b", seed=1)
    config = VLLMConfig(
        gpu_memory_utilization=0.3, dtype="float32", max_model_len=256, enable_sleep_mode=True
    )
    engine = VLLMEngine(model_source(stage=first), config)
    return engine, first, second


def hf_merged(stage):
    from alignkit.rollouts.hf import HFEngine

    engine = HFEngine.from_source(model_source(stage=stage, dtype="float32"), batch_size=64)
    engine.model = engine.model.merge_and_unload().to("cuda")
    return engine


def builtin_prompts(n):
    from alignkit.builtin import load_builtin

    return [messages(r["prompt"]) for r in load_builtin("prompts", "train")[:n]]


@pytest.mark.vllm
@needs_vllm
def test_greedy_lora_matches_hf_with_the_merged_adapter(vllm_setup):
    from alignkit.rollouts.types import SamplingConfig

    engine, first, _ = vllm_setup
    prompts = builtin_prompts(64)
    cfg = SamplingConfig(temperature=0, max_new_tokens=32)
    ours, reference = engine.generate(prompts, cfg), hf_merged(first).generate(prompts, cfg)
    assert ours.prompt_ids == reference.prompt_ids
    same = sum(
        a[:32] == b[:32] for a, b in zip(ours.completion_ids, reference.completion_ids, strict=True)
    )
    assert same >= 0.95 * len(prompts), f"{same}/64 prompts agree on the first 32 tokens"


@pytest.mark.vllm
@needs_vllm
def test_a_new_adapter_id_changes_outputs_and_sleep_keeps_them(vllm_setup):
    from alignkit.rollouts.types import SamplingConfig

    engine, first, second = vllm_setup
    prompts = builtin_prompts(16)
    cfg = SamplingConfig(temperature=0, max_new_tokens=24, logprobs=True)
    before = engine.generate(prompts, cfg)
    engine.update_adapter(second / "adapter")
    after = engine.generate(prompts, cfg)
    assert engine.lora_request.lora_int_id == 2 and engine.lora_request.lora_name == "policy-v2"
    assert before.logprobs != after.logprobs
    engine.sleep(level=1)
    engine.wake_up()
    assert engine.generate(prompts, cfg).completion_ids == after.completion_ids
    engine.update_adapter(first / "adapter")  # back to the first policy for other tests


@pytest.mark.vllm
@needs_vllm
def test_sampling_logprobs_match_hf_recomputed(vllm_setup):
    from alignkit.rollouts.types import SamplingConfig

    engine, first, _ = vllm_setup
    cfg = SamplingConfig(n=2, max_new_tokens=16, logprobs=True, top_k=0)
    batch = engine.generate(builtin_prompts(8), cfg)
    hf = hf_merged(first)
    worst = 0.0
    for k in range(len(batch)):
        ids = torch.tensor(
            [batch.prompt_ids[batch.prompt_index(k)] + batch.completion_ids[k]], device="cuda"
        )
        with torch.no_grad():
            logits = hf.model(input_ids=ids).logits[0].float()
        start = len(batch.prompt_ids[batch.prompt_index(k)]) - 1
        lp = torch.log_softmax(logits[start : start + len(batch.completion_ids[k])], -1)
        expected = lp.gather(1, torch.tensor(batch.completion_ids[k], device="cuda")[:, None])[:, 0]
        worst = max(worst, (expected.cpu() - torch.tensor(batch.logprobs[k])).abs().max().item())
    assert worst < 1e-2


@pytest.mark.vllm
@needs_vllm
def test_tensor_parallel_beyond_the_gpus_is_refused_before_vllm_starts(lora_stage):
    from alignkit.rollouts.vllm import VLLMEngine

    too_many = torch.cuda.device_count() + 1
    with pytest.raises(UserError, match=f"needs {too_many} GPUs"):
        VLLMEngine(model_source(stage=lora_stage), VLLMConfig(tensor_parallel_size=too_many))
