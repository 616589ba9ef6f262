"""The vLLM engine (the ``vllm`` extra, CUDA only). The only module that imports vllm, lazily.

- The base model loads once (bf16/fp16, or bitsandbytes 4-bit in flight with
  ``quantization: 4bit``); a policy adapter is served *as an adapter* (``LoRARequest``), never
  merged. :meth:`VLLMEngine.update_adapter` registers a new adapter id and name after every
  policy update (vLLM caches adapters by id and compares requests by name, so a reused id
  would serve stale weights) and resets the prefix cache.
- Adapters are checked before vLLM sees them: LoRA only (no DoRA), no ``modules_to_save`` (a
  reward-model or value adapter carries a head vLLM would drop), and every LoRA module must
  exist in the base model: an adapter that matches nothing is an error, not a base-model run.
- ``max_lora_rank`` comes from the adapter (rounded up to a size vLLM supports).
- Sampling log-probs are vLLM's ``processed_logprobs`` (after temperature/top-k/top-p), the
  same definition the HF engine records.
- ``gpu_memory_utilization`` and ``sleep()``/``wake_up()`` (``enable_sleep_mode``) let it
  share a GPU with training; ``tensor_parallel_size`` is checked against the GPUs and heads.

Written against vLLM 0.22-0.31 (``LLM``, ``SamplingParams``, ``LoRARequest``); the tests that
run it are marked ``vllm``.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from alignkit.config import Strict
from alignkit.errors import UserError
from alignkit.models import load_tokenizer
from alignkit.rollouts.source import ModelSource
from alignkit.rollouts.types import Prompt, RolloutBatch, SamplingSpec, encode_prompts

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's LoRAConfig.max_lora_rank choices


#: vLLM settings that other configs expose under their own defaults (a training stage leaves
#: most of the GPU to training); defined once here.
GpuMemoryUtilization = Annotated[float, Field(gt=0, le=1)]
"""Share of the GPU vLLM may take (weights + KV cache); lower it to leave room for training."""
TensorParallelSize = Annotated[int, Field(ge=1)]
"""GPUs one engine shards the model over."""


class VLLMConfig(Strict):
    """The vLLM engine's settings, one block wherever vLLM runs: ``vllm:`` of a rollout job or
    a comparison, ``rollout.vllm:`` of a PPO or GRPO/RLOO stage (GRPO/RLOO hand TRL's engine
    the settings it takes and refuse the others)."""

    gpu_memory_utilization: GpuMemoryUtilization = 0.9
    """Share of the GPU vLLM may take (weights + KV cache); lower it to leave room for training."""
    tensor_parallel_size: TensorParallelSize = 1
    """GPUs one engine shards the model over (checked against the GPUs and attention heads)."""
    max_model_len: int | None = None
    """Prompt + completion tokens; default the model's own limit."""
    max_num_seqs: int = Field(256, ge=1)
    """Sequences vLLM schedules at once (its batch): higher is faster until the KV cache fills."""
    enable_sleep_mode: bool = False
    """Allow :meth:`VLLMEngine.sleep` (free the GPU between rollouts)."""
    enable_prefix_caching: bool = True
    """Reuse the KV cache of shared prompt prefixes (n samples of one prompt share it)."""
    enforce_eager: bool = False
    """Skip CUDA-graph capture: slower decoding, faster start."""
    max_lora_rank: int | None = None
    """Default: the adapter's rank. Set it when later adapters (``update_adapter``) grow."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] | None = None
    """Default: the model spec's dtype (``auto``: vLLM picks bf16 or fp16)."""
    seed: int = 0
    """The engine's seed (each request is also seeded by its sampling settings)."""


def lora_rank_slot(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds ``rank``."""
    for slot in LORA_RANKS:
        if slot >= rank:
            return slot
    raise UserError(f"LoRA rank {rank} is larger than vLLM supports ({LORA_RANKS[-1]})")


def check_tensor_parallel(size: int, hf_config, device_count: int) -> None:
    """vLLM shards attention heads over GPUs: the size must fit the GPUs and split the heads."""
    if size > device_count:
        raise UserError(
            f"vllm.tensor_parallel_size {size} needs {size} GPUs; {device_count} visible"
        )
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    if heads % size:
        raise UserError(
            f"vllm.tensor_parallel_size {size} does not divide the model's {heads} attention heads"
        )
    if (kv_heads % size) if kv_heads >= size else (size % kv_heads):
        raise UserError(
            f"vllm.tensor_parallel_size {size} and the model's {kv_heads} KV heads: one must "
            "divide the other"
        )


def check_adapter(adapter_dir: str | Path, model_path: str, revision: str | None = None) -> int:
    """Refuse an adapter vLLM would not apply faithfully; return its LoRA rank."""
    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    where = f"adapter {adapter_dir}"
    if config.get("peft_type") != "LORA":
        raise UserError(
            f"{where}: vLLM serves LoRA adapters only, not {config.get('peft_type')}; use --engine hf"
        )
    if config.get("use_dora"):
        raise UserError(f"{where}: vLLM does not support DoRA; use --engine hf")
    if config.get("modules_to_save") or config.get("task_type") == "SEQ_CLS":
        raise UserError(
            f"{where}: has modules_to_save {config.get('modules_to_save')} (a reward-model or "
            "value adapter); vLLM would drop them. Only policy adapters go to vLLM"
        )
    targets = _lora_modules(adapter_dir)
    base = _module_types(model_path, revision)
    unknown = sorted(t for t in targets if t not in base)
    if not targets:
        raise UserError(f"{where}: no LoRA weights in adapter_model.safetensors")
    if unknown:
        raise UserError(
            f"{where}: LoRA modules missing from the base model {model_path}: "
            f"{', '.join(unknown[:5])}; is it an adapter for another model?"
        )
    outside = sorted(t for t in targets if ".layers." not in t or base[t] != "Linear")
    if outside:
        raise UserError(
            f"{where}: vLLM applies LoRA to the decoder layers' linear projections only; this "
            f"adapter also targets {', '.join(outside[:5])}. Use --engine hf"
        )
    return max([int(config["r"]), *map(int, (config.get("rank_pattern") or {}).values())])


def _lora_modules(adapter_dir: Path) -> set[str]:

    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise UserError(f"adapter {adapter_dir}: no adapter_model.safetensors")
    with safe_open(str(weights), framework="pt") as f:
        keys = list(f.keys())
    modules = set()
    for key in keys:
        name = key.removeprefix("base_model.model.")
        for marker in (".lora_A.", ".lora_B.", ".lora_embedding_A", ".lora_embedding_B"):
            if marker in name:
                modules.add(name.split(marker)[0])
    return modules


def _module_types(model_path: str, revision: str | None) -> dict[str, str]:
    """Module name -> class name of the base model, built on the meta device (no weights)."""
    config = AutoConfig.from_pretrained(model_path, revision=revision)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: type(m).__name__ for name, m in model.named_modules()}


def _import_vllm():
    try:  # the optional vllm extra (CUDA only): imported when a vLLM engine is built
        import vllm
        from vllm.lora.request import LoRARequest
    except ImportError as e:
        raise UserError(
            f"--engine vllm needs vLLM and a CUDA GPU: install alignkit's vllm extra "
            f"(vllm>=0.22,<0.32) on a GPU machine ({e}). On CPU use --engine hf"
        ) from None
    return vllm, LoRARequest


class VLLMEngine:
    """``generate(prompts, SamplingSpec) -> RolloutBatch`` on a ``vllm.LLM``."""

    def __init__(self, source: ModelSource, config: VLLMConfig | None = None):

        vllm, self._lora_request_cls = _import_vllm()
        config = config or VLLMConfig()
        spec = source.spec
        if spec.quantization == "8bit":
            raise UserError(
                "vLLM has no in-flight 8-bit quantization; use quantization: 4bit or none"
            )
        hf_config = AutoConfig.from_pretrained(source.model_path, revision=spec.revision)
        check_tensor_parallel(config.tensor_parallel_size, hf_config, torch.cuda.device_count())
        self.tokenizer = load_tokenizer(source.tokenizer_dir, spec)
        self.source, self.config = source, config
        rank = config.max_lora_rank
        if source.adapter_dir is not None:
            rank = max(
                rank or 0, check_adapter(source.adapter_dir, source.model_path, spec.revision)
            )
        self.max_lora_rank = lora_rank_slot(rank) if rank else None
        lora = {}
        if self.max_lora_rank is not None:  # one adapter at a time: the current policy
            lora = {"enable_lora": True, "max_lora_rank": self.max_lora_rank, "max_loras": 1}
        self.llm = vllm.LLM(
            model=source.model_path,
            tokenizer=source.tokenizer_dir,
            revision=spec.revision,
            dtype=config.dtype or spec.dtype,
            quantization="bitsandbytes" if spec.quantization == "4bit" else None,
            trust_remote_code=spec.trust_remote_code,
            tensor_parallel_size=config.tensor_parallel_size,
            gpu_memory_utilization=config.gpu_memory_utilization,
            max_model_len=config.max_model_len,
            max_num_seqs=config.max_num_seqs,
            enable_sleep_mode=config.enable_sleep_mode,
            enable_prefix_caching=config.enable_prefix_caching,
            enforce_eager=config.enforce_eager,
            seed=config.seed,
            # record log-probs after temperature/top-k/top-p, as the sampler used them
            logprobs_mode="processed_logprobs",
            **lora,
        )
        self.adapter_version = 0
        self.lora_request = None
        if source.adapter_dir is not None:
            self.update_adapter(source.adapter_dir)

    @classmethod
    def from_source(cls, source: ModelSource, config: VLLMConfig | None = None) -> VLLMEngine:
        return cls(source, config)

    def update_adapter(self, adapter_dir: str | Path) -> None:
        """Serve the adapter saved at ``adapter_dir`` from now on (a new id, a new name)."""
        if self.max_lora_rank is None:
            raise UserError("this vLLM engine was started without LoRA; set vllm.max_lora_rank")
        rank = check_adapter(adapter_dir, self.source.model_path, self.source.spec.revision)
        if rank > self.max_lora_rank:
            raise UserError(
                f"adapter {adapter_dir} has rank {rank}, above this engine's max_lora_rank "
                f"{self.max_lora_rank}; start the engine with vllm.max_lora_rank >= {rank}"
            )
        self.adapter_version += 1
        self.lora_request = self._lora_request_cls(
            f"policy-v{self.adapter_version}",
            self.adapter_version,
            str(Path(adapter_dir).resolve()),
        )
        self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights

    def sleep(self, level: int = 1) -> None:
        """Free the GPU: level 1 keeps the weights in CPU memory, level 2 drops them."""
        if not self.config.enable_sleep_mode:
            raise UserError("sleep() needs vllm.enable_sleep_mode: true")
        self.llm.sleep(level=level)

    def wake_up(self) -> None:
        self.llm.wake_up()
        self.llm.reset_prefix_cache()

    def generate(self, prompts: Sequence[Prompt], cfg: SamplingSpec) -> RolloutBatch:
        from vllm import SamplingParams  # the optional extra, as above

        prompt_ids = encode_prompts(self.tokenizer, prompts)
        params = [
            SamplingParams(
                n=cfg.n,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                top_k=cfg.top_k,  # 0: every token (vLLM >= 0.22)
                max_tokens=cfg.max_new_tokens,
                stop=list(cfg.stop) or None,
                stop_token_ids=list(cfg.stop_token_ids) or None,
                ignore_eos=cfg.ignore_eos,
                seed=_prompt_seed(cfg.seed, i),
                logprobs=0 if cfg.logprobs else None,  # 0: only the sampled token's
            )
            for i in range(len(prompt_ids))
        ]
        outputs = self.llm.generate(
            [{"prompt_token_ids": ids} for ids in prompt_ids],
            sampling_params=params,
            lora_request=self.lora_request,
            use_tqdm=False,
        )
        ids, texts, reasons, logprobs = [], [], [], []
        for out in outputs:  # same order as the prompts
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids.append(list(c.token_ids))
                texts.append(c.text)
                reasons.append("length" if c.finish_reason == "length" else "stop")
                if cfg.logprobs:
                    logprobs.append(
                        [step[t].logprob for step, t in zip(c.logprobs, c.token_ids, strict=True)]
                    )
        return RolloutBatch(
            prompt_ids=prompt_ids,
            prompt_text=[self.tokenizer.decode(p) for p in prompt_ids],
            completion_ids=ids,
            completion_text=texts,
            finish_reason=reasons,
            n=cfg.n,
            logprobs=logprobs if cfg.logprobs else None,
        )


def _prompt_seed(seed: int | None, index: int) -> int | None:
    """A distinct seed per prompt: vLLM seeds each request's sampler, and the same seed on
    every prompt would reuse one random stream (vLLM offsets the n samples of a request)."""
    return None if seed is None else zlib.crc32(f"{seed}:{index}".encode()) & 0x7FFFFFFF
