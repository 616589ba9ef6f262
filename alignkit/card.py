"""Model cards: a Hugging Face ``README.md`` for every finished stage, so an adapter directory
is self-describing when it is shared or pushed to the Hub.

Written once by the pipeline's main process from the stage's ``stage.json`` record (nothing a
stage has to remember to do), into the stage directory and beside the weights (``adapter/`` or
``model/``, replacing peft's empty template there). YAML front matter as the Hub reads it
(``huggingface_hub.ModelCardData``: base model, library, tags, Hub datasets); the body holds the
adapter's config, the data with row counts and SHA-256 hashes, the stage lineage up the chain,
the key metrics with the set each was measured on, the health checks' trips, library versions,
intended use and limits. Loading is unaffected: peft and transformers never read README.md.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from huggingface_hub import ModelCardData

from alignkit.config import BUILTIN_MODEL
from alignkit.handoff import ADAPTER_DIR, FULL_MODEL_DIR, StageOutput
from alignkit.rundir import read_json_or_none, write_text_atomic

CARD_FILE = "README.md"
#: Metrics a card shows, in this order, when the stage recorded them.
KEY_METRICS = (
    "heldout_nll_base", "heldout_nll", "heldout_ppl", "heldout_pairwise_accuracy",
    "eval_rewards/accuracies", "eval_rewards/margins", "gold_reward", "gold_reward_ref",
    "gold_reward_gain_ci_low", "gold_reward_gain_ci_high", "reward", "reward_ref", "kl_ref",
    "response_length", "eos_rate", "forgetting_nll_before", "forgetting_nll_after",
    "forgetting_nll_increase", "pairs", "samples", "train_loss", "global_step",
)  # fmt: skip
#: Adapter config fields a card shows (``adapter_config.json``), when set.
ADAPTER_FIELDS = (
    "peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules", "use_dora",
    "use_rslora", "init_lora_weights", "modules_to_save", "num_virtual_tokens",
)  # fmt: skip
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def write_model_card(stage_dir: Path, record: dict, run_dir: Path) -> None:
    """Write the card of the stage in ``stage_dir`` (its ``stage.json`` content: ``record``)
    there and beside its weights. ``run_dir`` holds the parent stages named in the lineage."""
    config = read_json_or_none(stage_dir / ADAPTER_DIR / "adapter_config.json")
    text = model_card(record, lineage(run_dir, record.get("parent")), config)
    for directory in (stage_dir, stage_dir / ADAPTER_DIR, stage_dir / FULL_MODEL_DIR):
        if directory.is_dir():
            write_text_atomic(directory / CARD_FILE, text)


def lineage(run_dir: Path, parent: str | None) -> list[dict]:
    """The records of the stage's parent, its parent's parent, ... (nearest first)."""
    chain: list[dict] = []
    while parent and len(chain) < 100:
        stage = StageOutput.read(run_dir / parent)
        if stage is None:
            chain.append({"name": parent, "missing": True})
            break
        chain.append(stage.record)
        parent = stage.record.get("parent")
    return chain


def model_card(record: dict, chain: list[dict], adapter_config: dict | None = None) -> str:
    """The card's text: front matter, then the sections (see the module docstring).
    ``adapter_config``: the saved ``adapter_config.json``, for the adapter section."""
    base = (record.get("base_model") or {}).get("name", "")
    weights = record.get("outputs", {}).get("weights")
    data = record.get("data") or []
    front = ModelCardData(
        base_model=base if _HUB_ID.match(base) else None,
        library_name="peft" if weights == ADAPTER_DIR else "transformers" if weights else None,
        pipeline_tag=_pipeline_tag(record) if weights else None,
        tags=["alignkit", record.get("kind", "stage"), record.get("adapter_type", "none")],
        datasets=sorted({d["source"] for d in data if _HUB_ID.match(str(d["source"]))}) or None,
    )
    sections = [
        f"# {record.get('name')}: {record.get('kind')} stage (alignkit)",
        _summary(record, base, chain),
        _adapter_section(adapter_config),
        _data_section(data),
        _lineage_section(chain),
        _metrics_section(record),
        _health_section(record.get("health")),
        _versions_section(record.get("versions") or {}),
        _use_section(record, base),
    ]
    body = "\n\n".join(s for s in sections if s)
    return f"---\n{front.to_yaml()}\n---\n\n{body}\n"


def _pipeline_tag(record: dict) -> str:
    return "text-classification" if record.get("kind") == "reward_model" else "text-generation"


def _summary(record: dict, base: str, chain: list[dict]) -> str:
    parent = chain[0]["name"] if chain else None
    revision = (record.get("base_model") or {}).get("revision")
    lines = [
        f"- **Base model:** `{base}`" + (f" (revision `{revision}`)" if revision else ""),
        f"- **Quantization of the base:** {record.get('quantization', 'none')}",
        f"- **Weights:** {_weights_text(record)}",
        f"- **Parent stage:** `{parent}`" if parent else "- **Parent stage:** none",
        f"- **Config hash:** `{record.get('config_hash')}`, seed {record.get('seed')}",
        f"- **Trained:** {record.get('started')} to {record.get('finished')}"
        + (f" (resumed from `{record['resumed_from']}`)" if record.get("resumed_from") else ""),
    ]
    return "\n".join(lines)


def _weights_text(record: dict) -> str:
    weights = record.get("outputs", {}).get("weights")
    if weights == ADAPTER_DIR:
        return f"a {record.get('adapter_type')} adapter in `{ADAPTER_DIR}/` (peft)"
    if weights == FULL_MODEL_DIR:
        return f"a fully fine-tuned model in `{FULL_MODEL_DIR}/` (transformers)"
    return "none (this stage writes data or reports, not a model)"


def _adapter_section(config: dict | None) -> str:
    if not config:
        return ""
    shown = {k: config[k] for k in ADAPTER_FIELDS if config.get(k) not in (None, [], "")}
    lines = ["## Adapter", ""]
    lines += [f"- `{k}`: `{json.dumps(v)}`" for k, v in shown.items()]
    return "\n".join(lines)


def _data_section(data: list[dict]) -> str:
    if not data:
        return ""
    lines = ["## Data", "", "| role | source | split | rows | sha256 |", "|---|---|---|---|---|"]
    for d in data:
        lines.append(
            f"| {d['role']} | `{d['source']}` | {d.get('split') or '-'} | {d['rows']} | "
            f"`{d['sha256']}` |"
        )
    lines += ["", "sha256: over the rows as used (normalized, one canonical JSON line each)."]
    return "\n".join(lines)


def _lineage_section(chain: list[dict]) -> str:
    if not chain:
        return ""
    lines = ["## Lineage", "", "Nearest first; each started from the next one down."]
    lines += ["", "| stage | kind | weights | config hash | trained on (sha256) |", "|---|---|---|---|---|"]  # fmt: skip
    for r in chain:
        if r.get("missing"):
            lines.append(f"| `{r['name']}` | (no finished stage.json found) | | | |")
            continue
        train = [d for d in r.get("data") or [] if d["role"] in ("train", "replay")]
        used = ", ".join(f"`{d['source']}` ({d['rows']} rows, `{d['sha256'][:12]}`)" for d in train)
        lines.append(
            f"| `{r.get('name')}` | {r.get('kind')} | {r.get('adapter_type')} | "
            f"`{r.get('config_hash')}` | {used or '-'} |"
        )
    return "\n".join(lines)


def _metrics_section(record: dict) -> str:
    metrics = record.get("metrics") or {}
    keys = [k for k in KEY_METRICS if isinstance(metrics.get(k), int | float)]
    if not keys:
        return ""
    lines = ["## Metrics", "", "| metric | value | measured on |", "|---|---|---|"]
    for k in keys:
        lines.append(f"| `{k}` | {metrics[k]:.4g} | {_measured_on(k, record)} |")
    return "\n".join(lines)


def _measured_on(key: str, record: dict) -> str:
    """The set a metric was measured on, as the stage's config and data records name it."""
    by_role = {d["role"]: d for d in record.get("data") or []}
    if key.startswith("forgetting_"):
        d = by_role.get("forgetting")
        return f"general text `{d['source']}` ({d['rows']} texts)" if d else "general text"
    if key.startswith(("heldout_nll", "heldout_ppl", "heldout_pairwise", "eval_")):
        d = by_role.get("eval")
        return (
            f"held-out rows of `{d['source']}` ({d.get('split')}, {d['rows']} rows)" if d else "-"
        )
    heldout = (record.get("config") or {}).get("heldout")
    if (
        key.startswith(("gold_reward", "reward", "kl_ref", "response_length", "eos_rate"))
        and heldout
    ):
        prompts = heldout.get("prompts") or "the task's held-out prompts (`builtin:prompts`)"
        if heldout.get("prompts"):
            prompts = f"`{prompts}`"
        return (
            f"{prompts} ({heldout.get('split')}), {heldout.get('num_prompts')} prompts x "
            f"{heldout.get('samples_per_prompt')} samples; `_ref`: the reference"
        )
    return "training"


def _health_section(health: dict | None) -> str:
    if not health:
        return ""
    trips = health.get("trips") or []
    lines = ["## Health checks", "", f"{health.get('checks', 0)} checks during training, "
             f"{len(trips)} trip(s)."]  # fmt: skip
    for t in trips:
        lines.append(f"- step {t.get('step')}: {t.get('check')}: {t.get('message')}")
    return "\n".join(lines)


def _versions_section(versions: dict) -> str:
    if not versions:
        return ""
    return "## Versions\n\n" + ", ".join(f"{k} {v}" for k, v in versions.items())


def _use_section(record: dict, base: str) -> str:
    kind, weights = record.get("kind"), record.get("outputs", {}).get("weights")
    lines = ["## Intended use and limits", ""]
    if kind == "reward_model":
        lines.append(
            "Scores a (prompt, answer) pair with one number: a learned proxy for the preferences "
            "in its data, with blind spots where that data is thin. Optimising a policy against "
            "it needs a KL leash and a held-out check (a second RM or human/gold labels)."
        )
    elif weights:
        lines.append(
            f"A research checkpoint of a {kind} stage, for evaluation and further training. The "
            "metrics above are all that was measured: no safety, bias or factuality evaluation "
            "was run, and the base model's limits carry over."
        )
    else:
        lines.append("A record of this stage's inputs and outputs; it holds no model.")
    if base == BUILTIN_MODEL:
        lines.append(
            "\n`builtin:tiny` is a toy model of alignkit's synthetic task (about 0.6M parameters, a "
            "vocabulary of 130 words): it demonstrates the pipeline and is useless for anything "
            "else."
        )
    if weights == ADAPTER_DIR:
        cls = (
            "AutoModelForSequenceClassification"
            if kind == "reward_model"
            else "AutoModelForCausalLM"
        )
        where = f'"{base}"'
        imports = [f"from transformers import {cls}", "from peft import PeftModel"]
        if base == BUILTIN_MODEL:  # a folder alignkit builds and caches, not a Hub id
            where = "ensure_tiny_model()"
            imports.append("from alignkit.builtin import ensure_tiny_model")
        labels = ", num_labels=1" if kind == "reward_model" else ""
        lines += ["", "```python", *imports, "", f"base = {cls}.from_pretrained({where}{labels})",
                  f'model = PeftModel.from_pretrained(base, "{ADAPTER_DIR}")', "```"]  # fmt: skip
    return "\n".join(lines)
