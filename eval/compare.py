"""``alignkit compare``: aligned models against their base (and each other), with confidence.

Hand-written: no maintained library samples several checkpoints on one prompt set and reports
paired win rates with CIs, KL to the base and a report in one step. The steps:

1. resolve the rewards and prompts (bad input fails before any model loads), render every
   prompt once with one chat template so all models answer the same token ids;
2. per model (aligned ones first, the base last): generate the samples it lacks through the
   rollout engine (same sampling config and seeds for every model), and score with it the
   samples it is needed for: its own, and another model's whose KL is measured against it;
   all of this cached in OUT (:mod:`.cache`), so a re-run with another reward only rescores;
3. score every sample with every reward; compute the metrics (:mod:`.metrics`); write
   ``results.json`` (validated against ``results.schema.json``), ``samples.jsonl``, the plots
   and ``report.md``; print the summary table.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator
from rich.console import Console

from alignkit.config import (
    COMPARE_SAMPLES,
    DEFAULT_SAMPLING,
    MaxNewTokens,
    Samples,
    SamplingSpec,
    Strict,
    Temperature,
    TopP,
    read_yaml,
)
from alignkit.data.prompts import load_prompts
from alignkit.errors import UserError
from alignkit.eval import metrics, plots, report, scoring
from alignkit.eval.cache import GenerationCache
from alignkit.handoff import StageOutput
from alignkit.models import load_tokenizer
from alignkit.rewards.registry import resolve_rewards
from alignkit.rollouts.source import ModelSource, model_source
from alignkit.rollouts.types import EngineName, encode_prompts
from alignkit.rollouts.vllm import VLLMConfig
from alignkit.rundir import STAGE_FILE


class CompareConfig(Strict):
    base: str | None = None
    """Base model: Hub id, local path, ``builtin:tiny``, or a finished stage ``RUN_DIR/STAGE``."""
    base_adapter: str | None = None
    """A peft adapter on ``base``."""
    aligned: list[str] = []
    """Models to judge: finished stages ``RUN_DIR/STAGE`` or model ids/paths."""
    head_to_head: bool = False
    """Also compare every pair of aligned models: each one against every one named before it."""
    prompts: str
    """Prompt source (file, Hub dataset, ``builtin:prompts``); references enable NLL/BLEU/ROUGE."""
    split: str | None = None
    max_prompts: int | None = Field(256, ge=1)
    """Use the first this many prompts."""
    rewards: list[str] = Field(min_length=1)
    """``gold``, a rule, ``module:function`` or a reward-model dir; each reported on its own."""
    out: str
    n: Samples = COMPARE_SAMPLES
    """Samples per prompt and model."""
    temperature: Temperature = DEFAULT_SAMPLING.temperature
    """Sampling temperature of every model (top-k off: their own distributions)."""
    top_p: TopP = DEFAULT_SAMPLING.top_p
    """Nucleus sampling; 1 keeps every token."""
    max_new_tokens: MaxNewTokens = DEFAULT_SAMPLING.max_new_tokens
    """New tokens per sample."""
    seed: int = DEFAULT_SAMPLING.seed
    """Sampling seed: every model samples with it, so comparisons are paired and repeatable."""
    engine: EngineName = "hf"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    quantization: Literal["none", "4bit", "8bit"] | None = None
    batch_size: int = Field(64, ge=1)
    """HF: sequences per generation forward (scoring uses a quarter of it)."""
    chunk_prompts: int = Field(64, ge=1)
    """Prompts per engine call and per cached write."""
    resamples: int = Field(2000, ge=100)
    """Bootstrap resamples for every CI."""
    examples: int = Field(3, ge=0)
    """Side-by-side examples per comparison in the report (largest gains and losses each)."""
    vllm: VLLMConfig = VLLMConfig()

    @model_validator(mode="after")
    def _something_to_compare(self) -> CompareConfig:
        if self.base_adapter is not None and self.base is None:
            raise ValueError("base_adapter needs base")
        if self.base is None and not (self.head_to_head and len(self.aligned) >= 2):
            raise ValueError("give base and at least one aligned model, or head_to_head with two")
        if self.base is not None and not self.aligned:
            raise ValueError("give at least one aligned model to compare with the base")
        return self

    @property
    def sampling(self) -> SamplingSpec:
        return SamplingSpec.policy(
            self.n, self.temperature, self.max_new_tokens, self.seed, top_p=self.top_p
        )


def compare_config(config: str | Path | None = None, **options) -> CompareConfig:
    """A config from an optional YAML file and CLI options (options given override the file);
    a bad value is a UserError naming the key."""
    raw: dict = {}
    if config is not None:
        path = Path(config)
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        raw = read_yaml(path.read_text()) or {}
    raw.update(
        {k: str(v) if isinstance(v, Path) else v for k, v in options.items() if v is not None}
    )
    try:
        return CompareConfig.model_validate(raw)
    except ValidationError as e:
        where = str(config) if config else "alignkit compare"
        problems = [_problem(err, as_flag=config is None) for err in e.errors()]
        raise UserError(f"{where}: " + "; ".join(problems)) from None


def _problem(err: dict, as_flag: bool) -> str:
    """One validation error, naming the key as the user wrote it (``rewards`` in a file,
    ``--reward`` on the command line), with the nearest valid key for an unknown one."""
    loc = err["loc"]
    key = ".".join(map(str, loc)) or "config"
    if as_flag and loc:
        key = "--" + {"rewards": "reward"}.get(str(loc[0]), str(loc[0])).replace("_", "-")
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), list(CompareConfig.model_fields), n=1)
        message = "unknown key" + (f" (did you mean {close[0]!r}?)" if close else "")
    return f"{key}: {message}"


@dataclass
class Entry:
    """One model in the comparison."""

    label: str
    source: ModelSource
    identity: dict
    tokenizer: object
    prompt_ids: dict[str, list[int]]
    group: int
    """Models of one group share a vocabulary: only they score each other's samples (KL)."""
    forgetting: dict | None = None
    """A finished stage's forgetting measurement (:func:`stage_forgetting`), else ``None``."""


def run_compare(cfg: CompareConfig, console: Console | None = None) -> dict:
    """Run (or resume) the comparison into ``cfg.out``; returns the results (``results.json``)."""
    console = console or Console(stderr=True)
    rewards = resolve_rewards(cfg.rewards)
    rows = _unique(load_prompts(cfg.prompts, cfg.split).rows)[: cfg.max_prompts]
    out = Path(cfg.out)
    entries, base = _entries(cfg, load_tokenizer)
    for e in entries:
        e.prompt_ids = _render(e, entries, rows)
    pairs = [(e.label, base) for e in entries if base and e.label != base]
    if cfg.head_to_head:
        aligned = [e.label for e in entries if e.label != base]
        pairs += [(b, a) for i, a in enumerate(aligned) for b in aligned[i + 1 :]]
    by_label = {e.label: e for e in entries}
    kl_pairs = [(a, b) for a, b in pairs if by_label[a].group == by_label[b].group]
    console.print(
        f"compare: {len(entries)} models x {len(rows)} prompts x {cfg.n} samples -> {out}"
    )
    caches = {
        e.label: GenerationCache(out, e.label, {**e.identity, **_sampling_identity(cfg)})
        for e in entries
    }
    for c in caches.values():
        c.open(console)
    work = scoring.Work(cfg, rows, entries, caches, kl_pairs, console)
    work.run()
    data = work.collect(rewards)
    forgetting = {e.label: e.forgetting for e in entries}
    results = metrics.build_results(cfg, rows, data, base, pairs, forgetting)
    out.mkdir(parents=True, exist_ok=True)
    metrics.write_samples(out, rows, data)
    results["plots"] = plots.make_plots(results, data, out)
    report.write_results(out, results)
    report.write_report(out, results)
    report.print_summary(results, console)
    return results


def _entries(cfg: CompareConfig, load_tokenizer) -> tuple[list[Entry], str | None]:
    """Aligned models first, the base last (it then scores every aligned model's samples
    without a second load). Labels: the stage name, else the model's last path part."""
    specs = [(a, None) for a in cfg.aligned]
    if cfg.base is not None:
        specs.append((cfg.base, cfg.base_adapter))
    entries: list[Entry] = []
    vocabularies: list[dict] = []
    for i, (name, adapter) in enumerate(specs):
        is_base = cfg.base is not None and i == len(specs) - 1
        source, identity = _source(name, adapter, cfg, "base" if is_base else "aligned")
        label = _label(name, is_base, source, [e.label for e in entries])
        tokenizer = load_tokenizer(source.tokenizer_dir, source.spec)
        vocab = tokenizer.get_vocab()
        group = next((g for g, v in enumerate(vocabularies) if v == vocab), len(vocabularies))
        if group == len(vocabularies):
            vocabularies.append(vocab)
        forgetting = stage_forgetting(StageOutput.read(Path(name).expanduser()))
        entries.append(Entry(label, source, identity, tokenizer, {}, group, forgetting))
    return entries, entries[-1].label if cfg.base is not None else None


def stage_forgetting(stage: StageOutput | None) -> dict | None:
    """What a finished policy stage recorded of forgetting (general-text NLL per token of the
    policy it started from and of its own), for the report; ``None`` when it recorded none."""
    if stage is None:
        return None
    m = stage.record.get("metrics") or {}
    if "forgetting_nll_after" not in m:
        return None
    texts = next((d for d in stage.record.get("data") or [] if d.get("role") == "forgetting"), {})
    return {
        "source": texts.get("source"),
        "texts": int(m.get("forgetting_texts", texts.get("rows", 0))),
        "nll_before": m["forgetting_nll_before"],
        "nll_after": m["forgetting_nll_after"],
        "increase": m["forgetting_nll_increase"],
    }


def _source(
    name: str, adapter: str | None, cfg: CompareConfig, flag: str
) -> tuple[ModelSource, dict]:
    path = Path(name).expanduser()
    finished = StageOutput.read(path)
    if finished is not None:
        if adapter is not None:
            raise UserError(
                f"--{flag} {name} is a stage: it brings its adapter; drop --base-adapter"
            )
        source = model_source(stage=path, dtype=cfg.dtype, quantization=cfg.quantization)
        stage = {k: finished.record.get(k) for k in ("kind", "config_hash", "finished")}
    elif path.is_dir() and not (path / "config.json").is_file():
        raise UserError(
            f"--{flag} {name}: neither a finished stage (no {STAGE_FILE}; still running or failed?) "
            "nor a model directory (no config.json)"
        )
    elif not path.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise UserError(f"--{flag} {name}: no such directory (give RUN_DIR/STAGE or a model id)")
    else:
        source = model_source(
            model=name, adapter=adapter, dtype=cfg.dtype, quantization=cfg.quantization
        )
        stage = None
    identity = {
        "model": source.model_path,
        "adapter": str(source.adapter_dir) if source.adapter_dir else None,
        "spec": source.spec.model_dump(mode="json"),
        "stage": stage,
    }
    return source, identity


def _label(name: str, is_base: bool, source: ModelSource, taken: list[str]) -> str:
    path = Path(name)
    if StageOutput.read(path) is not None:
        label = path.resolve().name
    elif is_base:
        label = "base"
    else:
        label = name.rstrip("/").split("/")[-1].replace(":", "-") or "model"
    unique, k = label, 2
    while unique in taken:
        unique, k = f"{label}-{k}", k + 1
    return unique


def _render(entry: Entry, entries: list[Entry], rows: list[dict]) -> dict[str, list[int]]:
    """Prompt token ids: one chat template for every model that shares a vocabulary (the first
    of them whose tokenizer has one), so they all answer the same ids."""
    group = [e for e in entries if e.group == entry.group]
    template = next((e for e in group if getattr(e.tokenizer, "chat_template", None)), entry)
    if template is not entry and template.prompt_ids:
        return template.prompt_ids
    ids = encode_prompts(template.tokenizer, [r["prompt"] for r in rows])
    return {r["id"]: p for r, p in zip(rows, ids, strict=True)}


def _sampling_identity(cfg: CompareConfig) -> dict:
    return {
        "prompts": cfg.prompts,
        "split": cfg.split,
        "sampling": cfg.sampling.model_dump(mode="json"),
        "engine": cfg.engine,
    }


def _unique(rows: list[dict]) -> list[dict]:
    seen: set[str] = set()
    return [r for r in rows if not (r["id"] in seen or seen.add(r["id"]))]
