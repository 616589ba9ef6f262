"""Loading base models, tokenizers and adapters; saving what a stage produced.

Every stage builds its model through these functions, so dtype, quantization, pad-token and
adapter handling are the same everywhere. A stage's saved output is plain peft/transformers:
``adapter/`` (loadable with ``PeftModel.from_pretrained``) or ``model/`` for full fine-tuning,
plus the tokenizer with its chat template.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import peft
import torch
from accelerate import PartialState
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedTokenizerBase,
)

from alignkit.adapters import INITIAL_ADAPTER_DIR, save_adalora_as_lora
from alignkit.builtin import ensure_tiny_model
from alignkit.config import BUILTIN_MODEL, AdapterSpec, ModelSpec
from alignkit.errors import UserError
from alignkit.handoff import (
    ADAPTER_DIR,
    FULL_MODEL_DIR,
    POLICY_ADAPTER,
    StageOutput,
    spec_from_record,  # noqa: F401 (its home before alignkit.handoff; imported from here)
)
from alignkit.rundir import STAGE_FILE, match_directory_modes

log = logging.getLogger(__name__)

# Existing tokens that can serve as padding when a tokenizer has none (or pads with EOS).
_PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]", "<|finetune_right_pad_id|>", "<|endoftext|>")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(spec: ModelSpec) -> str:
    """A Hub id or local path for ``spec.name``; builds and caches ``builtin:tiny`` on first use."""
    if spec.name == BUILTIN_MODEL:
        return str(ensure_tiny_model())
    if spec.name.startswith("builtin:"):
        raise UserError(
            f"model.name: unknown builtin model {spec.name!r}; the builtin is {BUILTIN_MODEL!r}"
        )
    return spec.name


def torch_dtype(spec: ModelSpec) -> torch.dtype:
    if spec.dtype != "auto":
        return _DTYPES[spec.dtype]
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_tokenizer(source: str | Path, spec: ModelSpec | None = None) -> PreTrainedTokenizerBase:
    """Load a tokenizer and make sure it has a pad token distinct from EOS.

    When the tokenizer has no pad token, or pads with EOS (so masking pads would also mask the
    EOS the model must learn to emit), an existing pad-like token is used instead, or a new
    ``<|pad|>`` token is added (the model's embeddings are resized in :func:`load_base`). Either
    way one log line says so.
    """
    try:
        tok = AutoTokenizer.from_pretrained(
            str(source),
            revision=spec.revision if spec else None,
            trust_remote_code=spec.trust_remote_code if spec else False,
        )
    except OSError as e:
        raise UserError(f"could not load a tokenizer from {source!r}: {e}") from None
    if tok.pad_token is not None and tok.pad_token_id != tok.eos_token_id:
        return tok
    vocab = tok.get_vocab()
    for cand in _PAD_CANDIDATES:
        if cand in vocab and vocab[cand] != tok.eos_token_id:
            log.warning(
                "tokenizer %s: pad token set to existing %r (was %r)", source, cand, tok.pad_token
            )
            tok.pad_token = cand
            return tok
    log.warning("tokenizer %s: no pad token distinct from EOS; adding '<|pad|>'", source)
    tok.add_special_tokens({"pad_token": "<|pad|>"})
    return tok


def quantization_config(spec: ModelSpec):
    if spec.quantization == "none":
        return None
    if spec.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch_dtype(spec)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=spec.quant_type,
        bnb_4bit_use_double_quant=spec.double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=compute,
    )


def load_base(
    spec: ModelSpec,
    tokenizer: PreTrainedTokenizerBase,
    path: str | None = None,
    model_cls=AutoModelForCausalLM,
    **kwargs,
):
    """Load the base model in the requested dtype/quantization, resized to the tokenizer."""
    path = path or resolve_model_path(spec)
    quant = quantization_config(spec)
    extra = dict(kwargs)
    if quant is not None:
        extra["quantization_config"] = quant
        extra["device_map"] = {"": _device_index()}
    if spec.attn_implementation:
        extra["attn_implementation"] = spec.attn_implementation
    try:
        model = model_cls.from_pretrained(
            path,
            revision=spec.revision,
            dtype=torch_dtype(spec),
            trust_remote_code=spec.trust_remote_code,
            **extra,
        )
    except OSError as e:
        raise UserError(f"model.name: could not load {spec.name!r}: {e}") from None
    if quant is not None and not torch.cuda.is_available():
        _keep_cpu_4bit_layout(model)
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        _resize_embeddings(model, len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _keep_cpu_4bit_layout(model) -> None:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference on the first eval forward.

    The repacked layout is inference-only: training after an evaluation (as every stage does
    when it measures the untrained model first) then fails inside bitsandbytes.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _resize_embeddings(model, size: int) -> None:
    """Grow the embeddings for added tokens; new rows are the mean of the old ones, so a reload
    (which repeats this) gives bit-identical weights."""
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(size, mean_resizing=False)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[old:] = emb[:old].mean(0, keepdim=True)
        out = model.get_output_embeddings()
        if out is not None and out.weight.data_ptr() != emb.data_ptr():
            out.weight[old:] = out.weight[:old].mean(0, keepdim=True)


def _device_index():
    if torch.cuda.is_available():
        return PartialState().local_process_index
    return "cpu"


def peft_config(adapter: AdapterSpec, task_type: str = "CAUSAL_LM"):
    """The peft config for an adapter spec (``None`` for full fine-tuning)."""
    if adapter.type == "full":
        return None
    if adapter.type == "lora":
        return peft.LoraConfig(
            r=adapter.r,
            lora_alpha=adapter.alpha,
            lora_dropout=adapter.dropout,
            target_modules=adapter.target_modules,
            use_dora=adapter.use_dora,
            use_rslora=adapter.use_rslora,
            init_lora_weights=True
            if adapter.init_lora_weights == "default"
            else adapter.init_lora_weights,
            modules_to_save=adapter.modules_to_save or None,
            task_type=task_type,
        )
    if adapter.type == "adalora":
        spec = adapter.adalora
        return peft.AdaLoraConfig(
            target_r=adapter.r,
            init_r=spec.init_r or (3 * adapter.r + 1) // 2,
            lora_alpha=adapter.alpha,
            lora_dropout=adapter.dropout,
            target_modules=adapter.target_modules,
            orth_reg_weight=spec.orth_reg_weight,
            deltaT=spec.delta_t,
            total_step=1,  # the trainer's step count, set when training begins (AdaLoraBudget)
            modules_to_save=adapter.modules_to_save or None,
            task_type=task_type,
        )
    if adapter.type == "ia3":
        # IA3 scales feed-forward inputs differently: peft's per-architecture defaults know which
        # modules are which, so "all-linear" means "use them"
        targets = None if adapter.target_modules == "all-linear" else adapter.target_modules
        return peft.IA3Config(
            target_modules=targets,
            modules_to_save=adapter.modules_to_save or None,
            task_type=task_type,
        )
    if adapter.type == "prefix":
        return peft.PrefixTuningConfig(
            num_virtual_tokens=adapter.num_virtual_tokens, task_type=task_type
        )
    return peft.PromptTuningConfig(
        num_virtual_tokens=adapter.num_virtual_tokens, task_type=task_type
    )


def attach_adapter(model, adapter: AdapterSpec, spec: ModelSpec, task_type: str = "CAUSAL_LM"):
    """Wrap ``model`` with a new trainable adapter (or return it as is for full fine-tuning)."""
    if adapter.type == "full":
        if spec.quantization != "none":
            raise UserError(
                "adapter.type: full fine-tuning needs an unquantized base; set model.quantization: none"
            )
        return model
    if spec.quantization != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, peft_config(adapter, task_type))


def load_adapter(model, adapter_dir: str | Path, trainable: bool, name: str = POLICY_ADAPTER):
    """Load a saved adapter onto ``model`` (trainable or frozen)."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise UserError(f"no adapter found at {adapter_dir} (adapter_config.json missing)")
    return PeftModel.from_pretrained(
        model, str(adapter_dir), adapter_name=name, is_trainable=trainable
    )


def load_stage_model(
    stage_dir: str | Path, spec: ModelSpec, trainable: bool = False, model_cls=AutoModelForCausalLM
):
    """Base + the adapter (or the full model) a finished stage saved, with the stage's tokenizer.

    A sequence-classification class is loaded with one output (the reward model's score)."""
    extra = {"num_labels": 1} if model_cls is AutoModelForSequenceClassification else {}
    stage_dir = Path(stage_dir)
    tokenizer = load_tokenizer(stage_dir, spec)
    if (stage_dir / FULL_MODEL_DIR).is_dir():
        model = load_base(
            spec, tokenizer, path=str(stage_dir / FULL_MODEL_DIR), model_cls=model_cls
        )
        model.requires_grad_(trainable)
        return model, tokenizer
    model = load_base(spec, tokenizer, model_cls=model_cls, **extra)
    model = load_adapter(model, stage_dir / ADAPTER_DIR, trainable=trainable)
    if spec.quantization != "none":  # adapter weights compute in the base's dtype, as in training
        for name, p in model.named_parameters():
            if "lora_" in name and p.is_floating_point():
                p.data = p.data.to(torch_dtype(spec))
    return model, tokenizer


def load_policy(spec: ModelSpec, adapter: AdapterSpec, parent_dir: Path | None):
    """The model a training stage starts from, with its tokenizer.

    With a parent stage: its adapter loaded trainable on the base (or its full model). Without:
    the base with a new adapter from ``adapter`` (or the base itself for full fine-tuning).
    """
    if parent_dir is not None and (parent_dir / FULL_MODEL_DIR).is_dir():
        model, tokenizer = load_stage_model(parent_dir, spec, trainable=True)
        return model, tokenizer
    tokenizer = load_tokenizer(parent_dir or resolve_model_path(spec), spec)
    model = load_base(spec, tokenizer)
    if parent_dir is not None:
        if spec.quantization != "none":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return load_adapter(model, parent_dir / ADAPTER_DIR, trainable=True), tokenizer
    return attach_adapter(model, adapter, spec), tokenizer


def save_stage_model(
    model, tokenizer: PreTrainedTokenizerBase, out_dir: Path, state_dict: dict | None = None
) -> str:
    """Save the trained adapter (only the policy one, ``default``) or the full model, plus the tokenizer.

    The tokenizer goes to the stage dir and beside the weights, so ``adapter/`` or ``model/`` alone
    loads with plain peft/transformers (and vLLM). ``state_dict``: the model's full weights when
    they were gathered from shards (ZeRO-3, FSDP). Returns the subdir name written.
    """
    if isinstance(model, PeftModel) and model.peft_config[POLICY_ADAPTER].peft_type == "ADALORA":
        sub = ADAPTER_DIR
        save_adalora_as_lora(model, out_dir / sub, state_dict)
    elif isinstance(model, PeftModel):
        sub = ADAPTER_DIR
        initial = out_dir / INITIAL_ADAPTER_DIR
        # PiSSA/OLoRA trained on changed base weights: peft converts the adapter (rank 2r) to
        # apply to the original base, what every later stage and plain peft load
        convert = (
            {"path_initial_model_for_weight_conversion": str(initial)} if initial.is_dir() else {}
        )
        if convert:  # peft converts from the live weights: whole on every rank (never sharded:
            state_dict = None  # keep_initial_adapter refuses that) and holding the initial one
        model.save_pretrained(
            str(out_dir / sub), selected_adapters=[POLICY_ADAPTER], state_dict=state_dict, **convert
        )
        if convert:
            shutil.rmtree(initial)
    else:
        sub = FULL_MODEL_DIR
        model.save_pretrained(str(out_dir / sub), state_dict=state_dict)
    tokenizer.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir / sub))
    return sub


def merge_stage(stage_dir: str | Path, out_dir: str | Path) -> Path:
    """Write base + a stage's adapter as one full model (safetensors + tokenizer) that plain
    ``from_pretrained`` loads. A quantized stage is merged into the unquantized base weights."""
    stage_dir, out_dir = Path(stage_dir), Path(out_dir)
    stage = StageOutput.read(stage_dir)
    if stage is None:
        raise UserError(f"{stage_dir}: not a finished stage (no {STAGE_FILE})")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"--out {out_dir}: exists and is not empty; choose a new directory")
    spec = stage.base
    if spec.quantization != "none":
        log.warning(
            "merging into the unquantized base weights (the stage trained on a %s base)",
            spec.quantization,
        )
        spec = spec.model_copy(update={"quantization": "none"})
    model_cls = (
        AutoModelForSequenceClassification if stage.kind == "reward_model" else AutoModelForCausalLM
    )
    model, tokenizer = load_stage_model(stage_dir, spec, model_cls=model_cls)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    match_directory_modes(tmp)
    if out_dir.exists():
        out_dir.rmdir()
    tmp.rename(out_dir)
    return out_dir


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
