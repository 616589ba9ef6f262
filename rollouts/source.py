"""Where a policy comes from: a base model (+ adapter), or a finished stage of a run.

Both engines load from a :class:`ModelSource`, so ``--stage RUN_DIR/STAGE`` and
``--model M --adapter A`` mean the same thing to HF and vLLM.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from alignkit.config import ModelSpec
from alignkit.errors import UserError
from alignkit.handoff import ADAPTER_DIR, FULL_MODEL_DIR, StageOutput
from alignkit.models import resolve_model_path
from alignkit.rundir import STAGE_FILE


@dataclass(frozen=True)
class ModelSource:
    """``spec`` names the base; ``model_path`` overrides its weights (a full fine-tune);
    ``adapter_dir`` is a peft adapter on top; the tokenizer comes from ``tokenizer_dir``."""

    spec: ModelSpec
    model_path: str
    tokenizer_dir: str
    adapter_dir: Path | None = None

    def describe(self) -> str:
        return self.model_path + (f" + adapter {self.adapter_dir}" if self.adapter_dir else "")


def model_source(
    model: str | None = None,
    adapter: str | Path | None = None,
    stage: str | Path | None = None,
    dtype: str = "auto",
    quantization: str | None = None,
) -> ModelSource:
    """Resolve ``--model M [--adapter A]`` or ``--stage RUN_DIR/STAGE`` (exactly one)."""
    if (model is None) == (stage is None):
        raise UserError("give either --model (optionally with --adapter) or --stage RUN_DIR/STAGE")
    if stage is not None:
        if adapter is not None:
            raise UserError("--adapter and --stage exclude each other: a stage brings its adapter")
        return _stage_source(Path(stage), dtype, quantization)
    spec = ModelSpec(name=model, dtype=dtype, quantization=quantization or "none")
    path = resolve_model_path(spec)
    adapter_dir = Path(adapter) if adapter is not None else None
    if adapter_dir is not None and not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(
            f"--adapter {adapter_dir}: no adapter_config.json there (not a peft adapter)"
        )
    # An adapter saved by a stage carries the tokenizer it was trained with (chat template).
    tok_dir = (
        adapter_dir if adapter_dir and (adapter_dir / "tokenizer_config.json").is_file() else path
    )
    return ModelSource(spec, path, str(tok_dir), adapter_dir)


def _stage_source(stage_dir: Path, dtype: str, quantization: str | None) -> ModelSource:
    stage = StageOutput.read(stage_dir)
    if stage is None:
        hint = " (it is still running or failed)" if stage_dir.is_dir() else ""
        raise UserError(f"--stage {stage_dir}: not a finished stage, no {STAGE_FILE}{hint}")
    spec = stage.base.model_copy(
        update={
            "dtype": stage.base.dtype if dtype == "auto" else dtype,
            "quantization": quantization or stage.base.quantization,
        }
    )
    if (stage_dir / FULL_MODEL_DIR).is_dir():
        return ModelSource(spec, str(stage_dir / FULL_MODEL_DIR), str(stage_dir))
    adapter_dir = stage_dir / ADAPTER_DIR
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"--stage {stage_dir}: neither {ADAPTER_DIR}/ nor {FULL_MODEL_DIR}/ found")
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("task_type") == "SEQ_CLS" or stage.kind == "reward_model":
        raise UserError(
            f"--stage {stage_dir}: a reward-model stage scores text, it does not generate; "
            f"use it as --reward {stage_dir}"
        )
    return ModelSource(spec, resolve_model_path(spec), str(stage_dir), adapter_dir)
