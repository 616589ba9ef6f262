"""``alignkit sweep``: a hyperparameter search over one stage of a pipeline, on Optuna.

Layout of ``<run_dir>``::

    sft/ ...                 the stages the swept one starts from: run once, shared
    sweep/study.db           the Optuna study (SQLite; or the ``storage:`` URL)
    sweep/trial-0003/        one trial: links to the shared stages + the swept stage's output
    sweep/report/            trials.csv, best.yaml, the plots

Each trial is a pipeline run in its own directory, so the run directory's skip and resume
logic applies: the linked upstream stages are complete and skipped, and a trial whose process
was killed is retried with the same values and resumes its checkpoint. Optuna does the search,
the pruning and the storage; this module only wires trials to pipeline runs.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import socket
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from alignkit.config import (
    PipelineConfig,
    StageKinds,
    did_you_mean,
    parent_of,
    validate_pipeline,
)
from alignkit.errors import UserError
from alignkit.finite import NonFiniteError
from alignkit.health import HealthStop
from alignkit.pipeline import run_pipeline
from alignkit.rundir import RunDir
from alignkit.sweep.report import write_report
from alignkit.sweep.space import SweepSpec, load_sweep, with_params

log = logging.getLogger(__name__)

SWEEP_DIR = "sweep"
#: Trial outcomes that end a trial for good (a failed one failed by its own error: NaN, a
#: health stop), as opposed to one whose process was killed, which is retried.
ENDED = ("COMPLETE", "PRUNED", "FAIL")


def require_optuna():
    try:  # the optional sweep extra
        import optuna
    except ImportError:
        raise UserError(
            "alignkit sweep needs Optuna: pip install 'alignkit[sweep]' (or pip install optuna)"
        ) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


@dataclass
class TrialReport:
    """How a stage inside a trial hands intermediate objective values to Optuna's pruner
    (``StageContext.trial``): every ``every`` training steps the stage evaluates the objective
    and calls :meth:`report`, which raises ``optuna.TrialPruned`` when the pruner says stop."""

    trial: Any
    """The running ``optuna.Trial``."""
    stage: str
    objective: str
    every: int
    console: Console
    missing: bool = field(default=False, init=False)

    def due(self, step: int) -> bool:
        return self.every > 0 and step > 0 and step % self.every == 0

    def report(self, step: int, metrics: Mapping[str, float]) -> None:
        value = metrics.get(self.objective)
        if value is None:
            if not self.missing:
                self.missing = True
                self.console.print(
                    f"[yellow]sweep:[/] stage {self.stage} has no intermediate "
                    f"{self.objective!r} at step {step}; this trial reports only its final value"
                )
            return
        self.trial.report(float(value), step)
        self.trial.set_user_attr("last_step", step)
        self.console.print(
            f"sweep trial {self.trial.number}: {self.objective} = {value:.4g} at step {step}"
        )
        if self.trial.should_prune():
            import optuna  # the optional sweep extra (installed: this trial is Optuna's)

            raise optuna.TrialPruned(f"{self.objective} = {value:.4g} at step {step}")


def run_sweep(
    raw: dict,
    where: str,
    stage_kinds: StageKinds,
    registry: Mapping[str, Any],
    run_dir: Path | None,
    console: Console,
) -> Path:
    """Run (or resume, or join) the sweep a raw pipeline config's ``sweep:`` block describes,
    until its trial budget is spent; write the report. Returns the report directory."""
    spec = load_sweep(raw, stage_kinds, where)
    cfg = validate_pipeline(raw, stage_kinds, where)
    optuna = require_optuna()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(
            "alignkit sweep runs each trial in one process; to use more machines or GPUs, start "
            "several `alignkit sweep` processes on the same study (see the README's Sweeps)"
        )
    run_dir = Path(run_dir or cfg.run.dir or f"runs/{cfg.run.name}")
    sweep_dir = run_dir / SWEEP_DIR
    sweep_dir.mkdir(parents=True, exist_ok=True)
    upstream = upstream_stages(cfg, spec.stage)
    if upstream:  # once; a second worker waits here, then finds them complete
        with _file_lock(sweep_dir / ".upstream.lock"):
            run_pipeline(_only(cfg, upstream), registry, run_dir, console)
    study = open_study(optuna, spec, cfg, sweep_dir)
    retry_killed(optuna, study, spec, console)
    seed = (cfg.run.seed if spec.seed is None else spec.seed) + len(study.trials)
    study.sampler = _sampler(optuna, spec, seed)

    def objective(trial) -> float:
        trial_dir = sweep_dir / f"trial-{root_number(trial):04d}"
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")  # for retries
        trial.set_user_attr("dir", trial_dir.name)
        values = {p: d.suggest(trial, p) for p, d in spec.params.items()}
        shown = ", ".join(f"{p.rsplit('.', 1)[-1]}={_fmt(v)}" for p, v in values.items())
        console.rule(f"[bold]sweep trial {trial.number}[/] ({trial_dir.name}): {shown}")
        _link_upstream(trial_dir, run_dir, upstream)
        trial_cfg = validate_pipeline(with_params(raw, values), stage_kinds, where)
        report = TrialReport(trial, spec.stage, spec.objective, spec.report_every, console)
        try:
            run_pipeline(
                _only(trial_cfg, [*upstream, spec.stage]), registry, trial_dir, console, report
            )
        except optuna.TrialPruned:
            shutil.rmtree(RunDir(trial_dir).partial_dir(spec.stage) / "checkpoints", True)
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)  # retried (resuming) by the next sweep
            raise
        metrics = (RunDir(trial_dir).stage_json(spec.stage) or {}).get("metrics", {})
        trial.set_user_attr("metrics", {k: v for k, v in metrics.items() if _number(v)})
        if not _number(metrics.get(spec.objective)):
            raise UserError(
                f"{where}: sweep.objective: stage {spec.stage!r} recorded no metric "
                f"{spec.objective!r}{did_you_mean(spec.objective, metrics)}; it records: "
                f"{', '.join(sorted(k for k, v in metrics.items() if _number(v)))}"
            )
        return float(metrics[spec.objective])

    while (done := finished(study)) < spec.trials:
        console.print(f"sweep: {done} of {spec.trials} trials finished")
        study.optimize(objective, n_trials=1, catch=(NonFiniteError, HealthStop))
    return write_report(study, spec, raw, run_dir, sweep_dir, console)


def upstream_stages(cfg: PipelineConfig, name: str) -> list[str]:
    """The stages ``name`` starts from or reads, transitively, in pipeline order."""
    needed: set[str] = set()
    todo = [cfg.stage(name)]
    while todo:
        stage = todo.pop()
        parent = parent_of(cfg, stage)
        for other in ([parent.name] if parent else []) + stage.uses_stages():
            if other not in needed and other in {s.name for s in cfg.stages}:
                needed.add(other)
                todo.append(cfg.stage(other))
    return [s.name for s in cfg.stages if s.name in needed]


def _only(cfg: PipelineConfig, names: list[str]) -> PipelineConfig:
    out = cfg.model_copy()
    out.stages = [s for s in cfg.stages if s.name in names]
    return out


def _link_upstream(trial_dir: Path, run_dir: Path, names: list[str]) -> None:
    """The shared stages appear in the trial's run directory as links to the real ones."""
    trial_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        link = trial_dir / name
        if not link.is_symlink():
            link.symlink_to(os.path.relpath(run_dir / name, trial_dir), target_is_directory=True)


def open_study(optuna, spec: SweepSpec, cfg: PipelineConfig, sweep_dir: Path):
    url = spec.storage or f"sqlite:///{(sweep_dir / 'study.db').resolve()}"
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    try:
        warnings.filterwarnings("ignore", "Argument ``heartbeat_interval``", category=Warning)
        storage = optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine,
            heartbeat_interval=spec.heartbeat_seconds,
            grace_period=3 * spec.heartbeat_seconds,
            heartbeat_stale_trial_callback=lambda study, t: _retry(study, t, spec),
        )
    except ImportError as e:  # a PostgreSQL/MySQL URL without its driver
        raise UserError(f"sweep.storage: {url.split(':')[0]} needs a driver: {e}") from None
    pruner = {
        "median": lambda: optuna.pruners.MedianPruner(
            n_startup_trials=spec.pruner.startup_trials, n_warmup_steps=spec.pruner.warmup_steps
        ),
        "hyperband": lambda: optuna.pruners.HyperbandPruner(
            min_resource=max(1, spec.report_every), reduction_factor=spec.pruner.reduction_factor
        ),
        "none": optuna.pruners.NopPruner,
    }[spec.pruner.type]()
    name = spec.study_name or f"{cfg.run.name}-{spec.stage}"
    study = optuna.create_study(
        storage=storage, study_name=name, direction=spec.direction, pruner=pruner,
        load_if_exists=True,
    )  # fmt: skip
    stored = study.direction.name.lower()
    if stored != spec.direction:  # Optuna loads an existing study as it was stored
        raise UserError(
            f"sweep: study {name!r} in {url} was created to {stored} its objective, not to "
            f"{spec.direction}; set sweep.study_name to start another study"
        )
    return study


def _sampler(optuna, spec: SweepSpec, seed: int):
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=spec.n_startup)


def root_number(trial) -> int:
    """The number of the first attempt of a (retried) trial: its directory is named by it."""
    return int(trial.user_attrs.get("retry_of", trial.number))


def latest_attempts(study) -> dict[int, Any]:
    """Root number -> the latest attempt of that trial."""
    latest: dict[int, Any] = {}
    for t in study.get_trials(deepcopy=False):
        root = root_number(t)
        if root not in latest or t.number > latest[root].number:
            latest[root] = t
    return latest


def finished(study) -> int:
    """Trials that count against the budget: their latest attempt ended (not killed)."""
    return sum(
        t.state.name in ENDED and not (t.state.name == "FAIL" and t.user_attrs.get("interrupted"))
        for t in latest_attempts(study).values()
    )


def retry_killed(optuna, study, spec: SweepSpec, console: Console) -> None:
    """Retry every trial whose process was killed: one still RUNNING whose process on this host
    is gone (SIGKILL, a crash) is marked failed first; one interrupted by Ctrl-C/SIGTERM already
    is. Its retry has the same values and resumes the killed attempt's checkpoint. (A trial of
    a dead process on another machine is failed by Optuna's heartbeat check, then retried.)"""
    storage, host = study._storage, socket.gethostname()
    for t in latest_attempts(study).values():
        if t.state.name == "RUNNING":
            owner, _, pid = str(t.user_attrs.get("worker", "")).rpartition(":")
            if owner != host or not pid.isdigit() or _alive(int(pid)):
                continue
            storage.set_trial_user_attr(t._trial_id, "interrupted", True)
            storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
            t = storage.get_trial(t._trial_id)
        if t.state.name == "FAIL" and t.user_attrs.get("interrupted"):
            console.print(f"sweep: trial {t.number} was killed; retrying it with the same values")
            _retry(study, t, spec)


def _retry(study, trial, spec: SweepSpec) -> None:
    attempt = int(trial.user_attrs.get("attempt", 1)) + 1
    if attempt > spec.max_retries + 1:
        log.warning(
            "sweep: trial %d was killed %d times; not retried", root_number(trial), attempt - 1
        )
        return
    attrs = {"retry_of": root_number(trial), "attempt": attempt}
    study.enqueue_trial(trial.params, user_attrs=attrs)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _file_lock:
    """An exclusive flock held for a block (released by the OS if the process dies)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.handle = open(self.path, "a")  # noqa: SIM115
        fcntl.flock(self.handle, fcntl.LOCK_EX)

    def __exit__(self, *exc):
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
