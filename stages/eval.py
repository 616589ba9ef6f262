"""The ``eval`` stage: a pipeline ends by comparing its policy stages with the base model (and
with each other), through the same comparison as ``alignkit compare``.

Outputs in the stage dir: ``report.md`` (linking to the run's page, ``report.html``),
``results.json``, ``samples.jsonl``, the PNG plots and
the cached samples (``generations/``). ``stage.json`` metrics name each comparison
``<model>/<reward>/win_rate`` (with ``/ci_low``, ``/ci_high``, ``/p_value``), and each model's
``<model>/<reward>/mean`` and ``<model>/kl`` (nats per sequence, to the base).

The stage's config hash follows its parent (by default the last policy stage before it): a
change to another compared stage does not re-run it on its own; ``alignkit compare`` can always
be run by hand on the finished stages.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from alignkit.config import (
    BUILTIN_MODEL,
    COMPARE_SAMPLES,
    MaxNewTokens,
    Samples,
    StageBase,
    Temperature,
    did_you_mean,
)
from alignkit.data.fingerprint import data_record
from alignkit.data.prompts import load_prompts
from alignkit.errors import UserError
from alignkit.eval.compare import CompareConfig, run_compare
from alignkit.eval.report import reward_label
from alignkit.handoff import StageOutput, run_stages
from alignkit.pipeline import StageContext, StageResult
from alignkit.rollouts.types import EngineName
from alignkit.rundir import MANIFEST_FILE, REPORT_FILE, read_json
from alignkit.stages.common import reward_stage_names, stage_reward_spec


class EvalStageConfig(StageBase):
    kind: Literal["eval"] = "eval"
    default_parent: ClassVar[bool] = True

    stages: list[str] = []
    """Policy stages to compare; default: every finished policy stage before this one."""
    compare_base: bool = True
    """Compare each stage with the pipeline's base model (``model``)."""
    head_to_head: bool = True
    """Also compare the stages with each other: each against every one before it."""
    prompts: str | None = None
    """Prompt source; default on ``builtin:tiny``: ``builtin:sft`` (its references give NLL,
    BLEU and ROUGE-L)."""
    split: str | None = "test"
    """Split of a Hub or builtin prompt source."""
    rewards: list[str] = []
    """Reward specs as ``alignkit compare --reward`` takes them; a reward_model stage of this
    run is named ``stage:NAME``, or by its bare name when that is no builtin reward. Default on
    ``builtin:tiny``: ``gold``."""
    n: Samples = COMPARE_SAMPLES
    """Samples per prompt and model."""
    max_prompts: int = Field(128, ge=1)
    """Compare on the first this many prompts."""
    max_new_tokens: MaxNewTokens = 48
    """New tokens per sample."""
    temperature: Temperature = 1.0
    """Sampling temperature, the same for every model (top-k and top-p off)."""
    engine: EngineName = "hf"
    """Generation engine: ``hf`` (any device) or ``vllm`` (CUDA, the ``vllm`` extra)."""

    def uses_stages(self) -> list[str]:
        """The compared stages and reward stages: re-running any of them re-runs the comparison."""
        return [*self.stages, *reward_stage_names(self.rewards)]


def run(cfg: EvalStageConfig, ctx: StageContext) -> StageResult:

    if not ctx.is_main:  # one process compares; the others wait for the stage to finish
        return StageResult(metrics={}, adapter_type="none")
    run_dir = ctx.out_dir.parent
    stages = cfg.stages or _policy_stages(run_dir, ctx)
    for name in stages:
        if StageOutput.read(run_dir / name) is None:
            finished = [s.name for s in run_stages(run_dir) if s.is_policy]
            raise UserError(
                f"{ctx.where}.stages: {name!r} is not a finished stage of this run"
                f"{did_you_mean(name, finished)}; finished policy stages: {', '.join(finished) or 'none'}"
            )
    builtin = ctx.model.name == BUILTIN_MODEL
    prompts = cfg.prompts or ("builtin:sft" if builtin else None)
    rewards = cfg.rewards or (["gold"] if builtin else [])
    if prompts is None or not rewards:
        raise UserError(
            f"{ctx.where}: set prompts and rewards (defaults exist only for {BUILTIN_MODEL})"
        )
    if not stages or (not cfg.compare_base and len(stages) < 2):
        raise UserError(f"{ctx.where}: nothing to compare; list policy stages in `stages`")
    compare = CompareConfig(
        base=ctx.model.name if cfg.compare_base else None,
        aligned=[str(run_dir / s) for s in stages],
        head_to_head=cfg.head_to_head and len(stages) > 1,
        prompts=prompts,
        split=cfg.split,
        max_prompts=cfg.max_prompts,
        rewards=[stage_reward_spec(spec, run_dir, f"{ctx.where}.rewards") for spec in rewards],
        out=str(ctx.out_dir),
        n=cfg.n,
        temperature=cfg.temperature,
        max_new_tokens=cfg.max_new_tokens,
        seed=ctx.seed,
        engine=cfg.engine,
        dtype=ctx.model.dtype,
        quantization=ctx.model.quantization,
    )
    results = run_compare(compare, ctx.console)
    with (ctx.out_dir / "report.md").open("a") as f:  # the run page sits in the run directory
        f.write(
            f"\n---\n\nThe whole run on one page (stage graph, training curves, health checks, "
            f"samples): [../{REPORT_FILE}](../{REPORT_FILE}), written when `alignkit run` ends "
            f"or by `alignkit report {run_dir}`.\n"
        )
    return StageResult(
        data=[_prompts_record(prompts, cfg.split, cfg.max_prompts)],
        metrics=_metrics(results),
        adapter_type="none",
        outputs={
            "report": "report.md",
            "results": "results.json",
            "plots": ",".join(results["plots"]),
        },
    )


def _prompts_record(source: str, split: str | None, max_prompts: int) -> dict:
    """The data record of the prompts compared on (the first ``max_prompts`` distinct ones)."""
    seen: set[str] = set()
    rows = [
        r for r in load_prompts(source, split).rows if not (r["id"] in seen or seen.add(r["id"]))
    ]
    return data_record("prompts", source, split, rows[:max_prompts])


def _policy_stages(run_dir: Path, ctx: StageContext) -> list[str]:
    """Finished policy stages listed before this one in the run's manifest."""
    names = []
    for entry in read_json(run_dir / MANIFEST_FILE)["stages"]:
        if entry["name"] == ctx.name:
            break
        stage = StageOutput.read(run_dir / entry["name"])
        if stage is not None and stage.is_policy:
            names.append(entry["name"])
    return names


def _metrics(results: dict) -> dict[str, float]:

    out: dict[str, float] = {}
    for m in results["models"]:
        for reward, r in m["rewards"].items():
            if r["mean"] is not None:
                out[f"{m['label']}/{reward_label(reward)}/mean"] = r["mean"]
        if m["kl"] is not None:
            out[f"{m['label']}/kl"] = m["kl"]["per_sequence"]["mean"]
    for c in results["comparisons"]:
        key = f"{c['model']}/{reward_label(c['reward'])}/win_rate"
        if c["against"] != results["base"]:
            key = f"{c['model']}_vs_{c['against']}/{reward_label(c['reward'])}/win_rate"
        out.update(
            {key: c["win_rate"], f"{key}/ci_low": c["ci_low"], f"{key}/ci_high": c["ci_high"]}
        )
        out[f"{key}/p_value"] = c["p_value"]
    return out
