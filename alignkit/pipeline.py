"""The pipeline runner: decide per stage whether to skip, resume, run or re-run, then do it.

Hand-written: no library runs a chain of training stages with content-hashed skip/resume. Each
stage's hash covers its own config, the model and adapter specs, the run seed and its parent's
hash, so a change upstream re-runs everything downstream of it.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console
from rich.table import Table

from alignkit import __version__, interrupts
from alignkit.card import write_model_card
from alignkit.config import (
    AdapterSpec,
    ModelSpec,
    PipelineConfig,
    StageBase,
    config_hash,
    parent_of,
)
from alignkit.errors import UserError
from alignkit.handoff import StageOutput, find_stage
from alignkit.health import health_summary
from alignkit.rundir import (
    RunDir,
    checkpoint_step,
    latest_checkpoint,
    read_json_or_none,
    trim_logs_to_step,
)
from alignkit.tracking import NO_TRACKING, StageTracker, check_trackers, open_stage_tracker

log = logging.getLogger(__name__)


class TrialReport(Protocol):
    """Where a stage run as a sweep's trial hands intermediate objective values (implemented by
    :class:`alignkit.sweep.study.TrialReport` on an Optuna trial)."""

    stage: str
    """The stage that reports."""
    objective: str
    """The metric to report, named as the stage records it."""

    def due(self, step: int) -> bool:
        """Whether the stage should evaluate and report after training step ``step``."""

    def report(self, step: int, metrics: Mapping[str, float]) -> None:
        """Hand over the value of ``objective`` in ``metrics``; raises ``optuna.TrialPruned``
        to stop the trial (the stage lets it propagate, like an interrupt)."""


@dataclass
class StageContext:
    name: str
    model: ModelSpec
    adapter: AdapterSpec
    seed: int
    out_dir: Path
    """Where the stage writes (the partial dir; renamed into place when the stage finishes)."""
    parent: StageOutput | None
    resume_from: Path | None
    """Latest trainer checkpoint of an interrupted attempt, to resume from."""
    console: Console
    is_main: bool = True
    tracker: StageTracker = NO_TRACKING
    """The run's experiment trackers, opened for this stage (does nothing when tracking is off
    and on every rank but the main one)."""
    trial: TrialReport | None = None
    """In a sweep's trial: where the stage reports intermediate objective values when
    ``trial.due(step)`` (may stop the trial)."""

    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / "metrics.jsonl"

    @property
    def where(self) -> str:
        """How config errors name this stage."""
        return f"stages.{self.name}"

    @property
    def run_dir(self) -> Path:
        return self.out_dir.parent

    def finished_stage(self, name: str, key: str, kinds: tuple[str, ...]) -> StageOutput:
        """Another finished stage of this run, read by name (config key ``key`` names it), that
        must be one of ``kinds`` (see :func:`alignkit.handoff.find_stage`)."""
        return find_stage(self.run_dir, name, kinds, f"{self.where}.{key}")

    def require_policy_parent(self, kind: str, required: bool = False) -> StageOutput | None:
        """The parent stage, refused unless it produced a policy (a ``kind`` stage continues a
        policy, never a reward model or an evaluation); ``required``: a parent must be given."""
        parent = self.parent
        if parent is None:
            if required:
                raise UserError(
                    f"{self.where}.from: {kind} starts from a policy stage; set `from:` to one "
                    "(e.g. `from: sft`)"
                )
            return None
        if not parent.is_policy:
            raise UserError(
                f"{self.where}.from: {kind} starts from a policy stage, not {parent.name!r} "
                f"(a {parent.kind} stage)"
            )
        return parent


@dataclass
class StageResult:
    metrics: dict[str, float]
    adapter_type: str
    outputs: dict[str, str] = field(default_factory=dict)
    data: list[dict] = field(default_factory=list)
    """What the stage read: ``alignkit.data.fingerprint.data_record`` entries (role, source,
    split, rows, sha256), recorded in stage.json and the model card."""
    early_stopping: dict[str, Any] | None = None
    """Recorded in stage.json when the stage ran with early stopping (see
    :func:`alignkit.training.early_stopping_record`)."""


@dataclass(frozen=True)
class StageKind:
    """A registry entry: the stage's config schema and its run function."""

    config_cls: type[StageBase]
    run: Callable[[Any, StageContext], StageResult]


@dataclass
class Decision:
    stage: StageBase
    hash: str
    action: str  # skip | run | resume | rerun
    reason: str
    parent: StageBase | None
    resume_from: Path | None = None  # the checkpoint a "resume" continues from


def plan(cfg: PipelineConfig, run_dir: RunDir) -> list[Decision]:
    """What to do with each stage, in order, and why."""
    hashes: dict[str, str] = {}
    reruns: set[str] = set()
    decisions = []
    for stage in cfg.stages:
        parent = parent_of(cfg, stage)
        used = [n for n in stage.uses_stages() if n in hashes]
        parts = [
            stage,
            cfg.model,
            cfg.adapter,
            cfg.run.seed,
            hashes.get(parent.name) if parent else None,
        ]
        if used:  # only stages that read other stages carry their hashes (older hashes stay valid)
            parts.append({n: hashes[n] for n in used})
        h = config_hash(*parts)
        hashes[stage.name] = h
        state = run_dir.state(stage.name)
        upstream_names = [n for n in ([parent.name] if parent else []) + used if n in reruns]
        upstream = bool(upstream_names)
        if state.complete_hash == h:
            action, reason = "skip", "complete, config unchanged"
        elif state.partial_hash == h and state.checkpoint is not None:
            action, reason = "resume", f"interrupted; resuming from {state.checkpoint.name}"
        elif state.complete_hash is not None:
            action = "rerun"
            reason = (
                f"upstream stage '{upstream_names[0]}' re-runs"
                if upstream
                else "its config changed"
            )
        elif upstream and state.partial_hash is None:
            action, reason = "run", f"not run yet (upstream '{upstream_names[0]}' runs first)"
        else:
            action, reason = (
                "run",
                "not run yet" if state.partial_hash is None else "interrupted before a checkpoint",
            )
        if action != "skip":
            reruns.add(stage.name)
        resume = state.checkpoint if action == "resume" else None
        decisions.append(Decision(stage, h, action, reason, parent, resume))
    return decisions


def plan_of_rank_zero(decisions: list[Decision]) -> list[Decision]:
    """Every rank takes rank 0's plan. Ranks plan from the files they see, and rank 0 starts
    changing them (dropping a stale partial dir, trimming logs) as soon as it has planned: a
    rank that planned a moment later could resume a checkpoint rank 0 just deleted, or skip a
    stage the others train, and the run would deadlock or diverge."""
    from accelerate.utils import broadcast_object_list  # see _cuda: the runner plans without torch

    payload = [[(d.hash, d.action, d.reason, d.resume_from) for d in decisions]]
    broadcast_object_list(payload, from_process=0)
    for d, (h, action, reason, resume) in zip(decisions, payload[0], strict=True):
        d.hash, d.action, d.reason, d.resume_from = h, action, reason, resume
    return decisions


def print_plan(decisions: list[Decision], console: Console) -> None:
    table = Table(title="pipeline plan", show_edge=False)
    for col in ("stage", "kind", "from", "action", "why"):
        table.add_column(col)
    style = {"skip": "dim", "run": "green", "resume": "yellow", "rerun": "magenta"}
    for d in decisions:
        table.add_row(
            d.stage.name,
            d.stage.kind,
            d.parent.name if d.parent else "-",
            f"[{style[d.action]}]{d.action}[/]",
            d.reason,
        )
    console.print(table)


def run_pipeline(
    cfg: PipelineConfig,
    registry: Mapping[str, StageKind],
    run_dir: str | Path,
    console: Console | None = None,
    trial: TrialReport | None = None,
) -> list[Decision]:
    """Plan and run the stages; ``trial``: the sweep trial the stage ``trial.stage`` reports to."""
    from accelerate import PartialState  # see _cuda: the runner plans without torch

    console = console or Console()
    check_trackers(cfg.run.report_to)
    state = PartialState(cpu=not _cuda())
    rd = RunDir(run_dir, is_main=state.is_main_process)
    with rd.lock():
        decisions = plan(cfg, rd)
        if state.num_processes > 1:
            decisions = plan_of_rank_zero(decisions)
        if state.is_main_process:
            print_plan(decisions, console)
        manifest = _manifest(cfg, rd, decisions)
        manifest["processes"] = {
            "world_size": state.num_processes,
            "launcher": _launcher(),
            "engine": _engine(state.num_processes),
        }
        rd.write_manifest(manifest)
        for i, d in enumerate(decisions):
            if d.action != "skip":
                report = trial if trial is not None and trial.stage == d.stage.name else None
                entry = manifest["stages"][i]
                _run_stage(cfg, registry, rd, d, manifest, entry, state, console, report)
        if state.is_main_process and any(d.action != "skip" for d in decisions):
            print_timings(decisions, manifest, console)
    return decisions


def print_timings(decisions: list[Decision], manifest: dict, console: Console) -> None:
    """Wall-clock seconds of each stage run now (also in the manifest and each ``stage.json``)."""
    table = Table(title="stage times", show_edge=False)
    for col, justify in (("stage", "left"), ("kind", "left"), ("action", "left"), ("s", "right")):
        table.add_column(col, justify=justify)
    total = 0.0
    for d, entry in zip(decisions, manifest["stages"], strict=True):
        if d.action == "skip":
            continue
        seconds = entry.get("seconds", 0.0)
        total += seconds
        table.add_row(d.stage.name, d.stage.kind, d.action, f"{seconds:.1f}")
    table.add_row("[bold]total[/]", "", "", f"[bold]{total:.1f}[/]")
    console.print(table)


def _run_stage(
    cfg, registry, rd: RunDir, d: Decision, manifest, entry, state, console, trial
) -> None:
    from alignkit.finite import check_saved_weights  # torch; see _cuda

    entry.update(status="running", started=_now())
    rd.write_manifest(manifest)
    resume = d.resume_from
    out_dir = rd.begin_stage(d.stage.name, d.hash, resume=resume is not None)
    if resume is not None and state.is_main_process:  # steps after the checkpoint run again
        trim_logs_to_step(out_dir, checkpoint_step(resume))
    state.wait_for_everyone()
    parent = _parent_output(rd, d.parent)
    ctx = StageContext(
        name=d.stage.name,
        model=cfg.model,
        adapter=cfg.adapter,
        seed=cfg.run.seed,
        out_dir=out_dir,
        parent=parent,
        resume_from=resume,
        console=console,
        is_main=state.is_main_process,
        trial=trial,
    )
    if state.is_main_process:
        console.rule(f"[bold]{d.stage.name}[/] ({d.stage.kind}): {d.action}")
    started = time.time()
    ctx.tracker = _open_tracker(cfg, rd, d, state.is_main_process)
    try:
        result = registry[d.stage.kind].run(d.stage, ctx)
        if state.is_main_process:
            check_saved_weights(out_dir, ctx.where)  # NaN/inf never completes a stage
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            interrupts.acknowledge()  # being handled: no second one inside the handler
        _record_failure(rd, manifest, entry, out_dir, e, console)
        _close_tracker(ctx.tracker)
        raise
    record = _stage_record(cfg, d, result, parent, started)
    record["resumed_from"] = resume.name if resume else None
    if result.early_stopping is not None:
        record["early_stopping"] = result.early_stopping
    seconds = round(time.time() - started, 1)  # this attempt's (a resumed stage: since resuming)
    record["seconds"] = seconds
    record.update(_health(out_dir))
    if state.is_main_process:  # README.md beside the weights: the directory describes itself
        write_model_card(out_dir, record, rd.path)
    state.wait_for_everyone()
    rd.finish_stage(d.stage.name, record)
    entry.update(status="complete", finished=_now(), seconds=seconds, metrics=result.metrics)
    rd.write_manifest(manifest)
    ctx.tracker.final(result.metrics, int(result.metrics.get("global_step", 0)))
    ctx.tracker.close()
    if state.is_main_process:
        summary = ", ".join(f"{k}={v:.4g}" for k, v in _headline(result.metrics).items())
        console.print(
            f"[green]✓[/] {d.stage.name} complete in {time.time() - started:.0f}s  {summary}"
        )


def _open_tracker(cfg: PipelineConfig, rd: RunDir, d: Decision, is_main: bool):
    return open_stage_tracker(
        cfg.run.report_to,
        cfg.run.tracking_dir,
        rd.path,
        cfg.run.name,
        d.stage.name,
        d.stage.kind,
        redact(d.stage.model_dump(mode="json", by_alias=True)),
        is_main,
        checkpoint_step(d.resume_from) if d.resume_from is not None else None,
    )


def _close_tracker(tracker: StageTracker) -> None:
    """Close a failed stage's trackers; a tracker's own error must not hide the stage's."""
    try:
        tracker.close()
    except Exception as e:  # noqa: BLE001
        log.warning("could not close the stage's trackers: %s", e)


def _record_failure(rd: RunDir, manifest, entry, out_dir: Path, error, console) -> None:
    """Mark the stage failed or interrupted in the manifest and say what was kept. Never
    raises: the original error is what the user must see (a full disk fails here too)."""
    interrupted = isinstance(error, KeyboardInterrupt)
    try:
        entry.update(status="interrupted" if interrupted else "failed", **_health(out_dir))
        rd.write_manifest(manifest)
    except Exception as e:  # noqa: BLE001 (reporting must not hide the stage's error)
        log.warning("could not record the stage's status in the manifest: %s", e)
    if interrupted and rd.is_main:
        checkpoint = latest_checkpoint(out_dir / "checkpoints")
        kept = f"its checkpoint {checkpoint.name} is kept" if checkpoint else "no checkpoint yet"
        console.print(
            f"[yellow]interrupted[/] stage {entry['name']}: {kept} in {out_dir}; re-run the "
            "same command to resume"
        )


def _launcher() -> str:
    """How this run was started, from the environment the launchers set."""
    env = os.environ
    if "ACCELERATE_MIXED_PRECISION" in env or "ACCELERATE_USE_DEEPSPEED" in env:
        return "accelerate"
    if "TORCHELASTIC_RUN_ID" in env:
        return "torchrun"
    if "SLURM_JOB_ID" in env and "SLURM_PROCID" in env:
        return "slurm"
    return "single process"


def _engine(world_size: int) -> str:
    """The data-parallel engine accelerate was told to use (its launcher sets these)."""
    env = os.environ
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        if stage is None and (file := env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")):
            stage = (read_json_or_none(Path(file)) or {}).get("zero_optimization", {}).get("stage")
        return f"deepspeed zero-{stage if stage is not None else '?'}"
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return f"fsdp{env.get('FSDP_VERSION', '1')}"
    return "ddp" if world_size > 1 else "none"


def _cuda() -> bool:
    # torch costs seconds: planning, manifests and `alignkit status` run without it
    import torch

    return torch.cuda.is_available()


def _manifest(cfg: PipelineConfig, rd: RunDir, decisions: list[Decision]) -> dict:
    old = {s["name"]: s for s in (rd.manifest() or {}).get("stages", [])}
    stages = []
    names = {d.stage.name for d in decisions}
    for d in decisions:
        entry = {
            "name": d.stage.name,
            "kind": d.stage.kind,
            "parent": d.parent.name if d.parent else None,
            "uses": [n for n in d.stage.uses_stages() if n in names],
            "config_hash": d.hash,
            "output": d.stage.name,
            "status": "complete" if d.action == "skip" else "pending",
        }
        if d.action == "skip":
            prev = old.get(d.stage.name, {})
            record = rd.stage_json(d.stage.name) or {}
            entry.update(
                started=prev.get("started", record.get("started")),
                finished=prev.get("finished", record.get("finished")),
                metrics=record.get("metrics", {}),
            )
        stages.append(entry)
    return {"run": cfg.run.name, "model": cfg.model.name, "seed": cfg.run.seed, "stages": stages}


def _parent_output(rd: RunDir, parent: StageBase | None) -> StageOutput | None:
    if parent is None:
        return None
    output = StageOutput.read(rd.stage_dir(parent.name))
    if output is None:
        raise RuntimeError(f"parent stage {parent.name!r} is not complete")
    return output


def _health(out_dir: Path) -> dict:
    """The stage's health-check summary (``health.json``, see :mod:`alignkit.health`)."""
    summary = health_summary(out_dir)
    return {"health": summary} if summary else {}


def _stage_record(cfg, d: Decision, result: StageResult, parent, started: float) -> dict:
    # the versions recorded (the stage has imported them already); see _cuda
    import peft
    import torch
    import transformers
    import trl

    return {
        "name": d.stage.name,
        "kind": d.stage.kind,
        "is_policy": type(d.stage).is_policy,
        "config_hash": d.hash,
        "parent": parent.name if parent else None,
        "base_model": {
            "name": cfg.model.name,
            "revision": cfg.model.revision,
            "dtype": cfg.model.dtype,
        },
        "quantization": cfg.model.quantization,
        "adapter_type": result.adapter_type,
        "outputs": result.outputs,
        "metrics": result.metrics,
        "data": result.data,
        "config": redact(d.stage.model_dump(mode="json", by_alias=True)),
        "adapter": cfg.adapter.model_dump(mode="json"),
        "seed": cfg.run.seed,
        "versions": {
            "alignkit": __version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "peft": peft.__version__,
        },
        "started": _now(started),
        "finished": _now(),
    }


HEADLINE_KEYS = (
    "heldout_nll",
    "heldout_nll_base",
    "heldout_pairwise_accuracy",
    "eval_rewards/accuracies",
    "eval_rewards/margins",
    "train_loss",
    "global_step",
)


_SECRET = re.compile(r"(^|_)(token|api_?key|password|passwd|secret|credentials?)$", re.I)
_TOKENIZER_TOKEN = re.compile(r"^(pad|eos|bos|unk|sep|cls|mask)_token$", re.I)


def redact(value: Any) -> Any:
    """A copy with the values of secret-looking keys (``hub_token``, ``*api_key*``,
    ``*password*``, ``*secret*``) replaced: run directories get shared, secrets must not be."""
    if isinstance(value, dict):
        return {k: "***" if _is_secret(str(k), v) else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def _is_secret(key: str, value: Any) -> bool:
    return (
        isinstance(value, str)
        and value != ""
        and bool(_SECRET.search(key))
        and not _TOKENIZER_TOKEN.match(key)
    )


def _headline(metrics: dict) -> dict:
    return {k: metrics[k] for k in HEADLINE_KEYS if k in metrics}


def _now(t: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t))
