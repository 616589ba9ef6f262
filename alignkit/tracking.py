"""Experiment tracking: one setting for the whole run (``run.report_to``), each stage logged
under its own name, only by the main process.

- **TensorBoard**: ``<tracking_dir>/tensorboard/<stage>/``, one subdirectory per stage, so
  ``tensorboard --logdir <tracking_dir>/tensorboard`` shows the stages side by side.
- **W&B**: one W&B run per stage, ``group`` = the pipeline run's name, ``name`` = the stage,
  ``job_type`` = its kind; files under ``<tracking_dir>/wandb`` (``WANDB_MODE=offline`` works;
  ``WANDB_PROJECT`` names the project, default ``alignkit``).
- **MLflow**: experiment = the pipeline run's name, one parent run per run directory, one
  nested run per stage; ``MLFLOW_TRACKING_URI`` when set (e.g. ``sqlite:///mlflow.db`` or a
  server), else a local file store (``file://<tracking_dir>/mlruns``, which MLflow 3 keeps in
  maintenance mode: we set its opt-in ``MLFLOW_ALLOW_FILE_STORE``). Metric names keep our
  prefix and write the rest with '.' for '/' (``final/ppo.gold.win_rate``): the file store
  cannot hold both ``a/b`` and ``a/b/c``.

What is logged: a TRL stage's trainer logs through transformers' own integration callbacks,
bound to the stage's open tracker run (``train/loss``, ``eval/loss``, ... as transformers names
them); our PPO logs its ``metrics.jsonl`` record every step under ``train/``; health checks log
their values under ``health/`` and each trip as text (``health/trips``); the health probe's
samples go in as a table (a markdown table in TensorBoard's text tab); a stage's final metrics
(held-out evaluation with CIs, the comparison's summary) under ``final/``.
Thin glue over the trackers' own clients; no library logs one pipeline as grouped stages.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from alignkit.errors import UserError
from alignkit.rundir import TRACKING_DIR, read_json_or_none, write_json_atomic

#: The Python package each tracker needs (MLflow: ``mlflow`` or ``mlflow-skinny``).
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


HINTS = {
    "tensorboard": "check that the tracking dir is writable",
    "wandb": "log in with `wandb login`, or set WANDB_MODE=offline",
    "mlflow": "check MLFLOW_TRACKING_URI",
}


def tracking_dir(run_dir: Path, configured: str | None) -> Path:
    return Path(configured) if configured else Path(run_dir) / TRACKING_DIR


def check_trackers(report_to: list[str]) -> None:
    """Fail before any stage runs when a tracker's package is missing."""
    for name in report_to:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise UserError(
                f"run.report_to: {name} needs the {PACKAGES[name]} package; install it "
                f"(pip install 'alignkit[tracking]') or remove {name} from run.report_to"
            )


class StageTracker:
    """One stage's view of the run's trackers. With no backends (tracking off, or a rank other
    than 0) every call does nothing."""

    def __init__(self, backends: list | None = None):
        self.backends = backends or []

    @property
    def active(self) -> bool:
        return bool(self.backends)

    def log(self, values: dict[str, Any], step: int, prefix: str = "train/") -> None:
        """Scalars at ``step``; non-numbers are left out."""
        numbers = {prefix + k: float(v) for k, v in values.items() if _is_number(v)}
        for b in self.backends:
            b.scalars(numbers, step)

    def text(self, key: str, text: str, step: int) -> None:
        for b in self.backends:
            b.text(key, text, step)

    def table(self, key: str, rows: list[dict], step: int) -> None:
        if rows:
            for b in self.backends:
                b.table(key, rows, step)

    def final(self, metrics: dict[str, Any], step: int) -> None:
        """A finished stage's metrics (held-out evaluation, comparison summary) under
        ``final/``; W&B also keeps them as the run's summary."""
        numbers = {"final/" + k: float(v) for k, v in metrics.items() if _is_number(v)}
        for b in self.backends:
            b.summary(numbers, step)

    def trainer_callbacks(self) -> list:
        """transformers' integration callbacks, writing into this stage's tracker runs."""
        return [b.trainer_callback() for b in self.backends]

    def close(self) -> None:
        for b in self.backends:
            b.close()
        self.backends = []


NO_TRACKING = StageTracker()


def open_stage_tracker(
    report_to: list[str],
    configured_dir: str | None,
    run_dir: Path,
    run_name: str,
    stage: str,
    kind: str,
    config: dict,
    is_main: bool,
    resume_step: int | None = None,
) -> StageTracker:
    """The stage's tracker: every backend of ``report_to`` opened for this stage on the main
    process; a tracker that does nothing elsewhere. ``resume_step``: the checkpoint an
    interrupted stage resumes from; TensorBoard drops what the first attempt logged after it
    (those steps run again)."""
    if not report_to or not is_main:
        return StageTracker()
    root = tracking_dir(run_dir, configured_dir)
    root.mkdir(parents=True, exist_ok=True)
    opened: list = []
    for name in report_to:
        cls = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}[name]
        try:
            opened.append(cls(root, run_name, stage, kind, config, resume_step))
        except Exception as e:
            StageTracker(opened).close()
            raise UserError(
                f"run.report_to: {name} could not start a run for stage {stage!r}: {e} "
                f"({HINTS[name]}; or remove {name} from run.report_to)"
            ) from e
    return StageTracker(opened)


class _TensorBoard:
    def __init__(self, root, run_name, stage, kind, config, resume_step):
        from torch.utils.tensorboard import SummaryWriter  # only when report_to has it

        log_dir = str(root / "tensorboard" / stage)
        purge = None if resume_step is None else resume_step + 1  # steps after the checkpoint
        self.writer = SummaryWriter(log_dir=log_dir, purge_step=purge)
        self.writer.add_text("config", _code(json.dumps(config, indent=2, default=str)), 0)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    summary = scalars

    def text(self, key: str, text: str, step: int) -> None:
        self.writer.add_text(key, text, step)
        self.writer.flush()

    def table(self, key: str, rows: list[dict], step: int) -> None:
        self.text(key, _markdown_table(rows), step)

    def trainer_callback(self):
        # it closes the writer when training ends; the writer reopens on the next write
        from transformers.integrations import TensorBoardCallback

        return TensorBoardCallback(tb_writer=self.writer)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, root, run_name, stage, kind, config, resume_step):
        import wandb  # an optional tracker: only when report_to has it

        self.wandb = wandb
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "alignkit"),
            group=run_name,
            name=stage,
            job_type=kind,
            dir=str(root),
            config={"stage": config},
        )
        # transformers' callback and we both log the step as train/global_step
        self.run.define_metric("train/global_step")
        self.run.define_metric("*", step_metric="train/global_step", step_sync=True)

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log({**values, "train/global_step": step})

    def summary(self, values: dict[str, float], step: int) -> None:
        self.scalars(values, step)
        self.run.summary.update(values)

    def text(self, key: str, text: str, step: int) -> None:
        self.table(key, [{"step": step, "text": text}], step)

    def table(self, key: str, rows: list[dict], step: int) -> None:
        columns = list(rows[0])
        data = [[r.get(c) for c in columns] for r in rows]
        table = self.wandb.Table(columns=columns, data=data)
        self.run.log({key: table, "train/global_step": step})

    def trainer_callback(self):
        from transformers.integrations import WandbCallback  # transformers: seconds

        return WandbCallback()  # logs into wandb.run, the run opened here

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    PARENT_FILE = "mlflow_parent.json"

    def __init__(self, root, run_name, stage, kind, config, resume_step):
        import mlflow  # an optional tracker: only when report_to has it

        self.mlflow = mlflow
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if uri is None:  # a file store in the run: MLflow 3 wants this opt-in for one
            uri = (root / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(uri)
        experiment = mlflow.set_experiment(run_name)
        while mlflow.active_run() is not None:  # a run left open by a failed stage
            mlflow.end_run()
        mlflow.start_run(run_id=self._parent_id(root, uri, experiment.experiment_id, run_name))
        mlflow.start_run(run_name=stage, nested=True, tags={"alignkit.kind": kind})
        params = {f"stage.{k}": str(v)[:250] for k, v in _flatten(config).items()}
        items = list(params.items())
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per call
            mlflow.log_params(dict(items[i : i + 100]))

    def _parent_id(self, root: Path, uri: str, experiment_id: str, run_name: str) -> str:
        """The run directory's parent run (kept in ``tracking_dir``), created on first use."""
        path = root / self.PARENT_FILE
        saved = read_json_or_none(path) or {}
        if saved.get("uri") == uri and saved.get("experiment_id") == experiment_id:
            return saved["run_id"]
        client = self.mlflow.MlflowClient()
        run = client.create_run(experiment_id, run_name=run_name)
        write_json_atomic(path, {"uri": uri, "experiment_id": experiment_id,
                                 "run_id": run.info.run_id})  # fmt: skip
        return run.info.run_id

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics({self.metric_name(k): v for k, v in values.items()}, step=step)

    @staticmethod
    def metric_name(key: str) -> str:
        """Our prefix, then the rest with '/' as '.': the file store keeps a metric as a file at
        its name's path, so ``x/win_rate`` beside ``x/win_rate/ci_low`` could not both exist."""
        prefix, _, rest = key.partition("/")
        name = f"{prefix}/{rest.replace('/', '.')}" if rest else prefix
        return re.sub(r"[^0-9A-Za-z_\-. :/]", "_", name)

    summary = scalars

    def text(self, key: str, text: str, step: int) -> None:
        self.mlflow.log_text(text, f"{key}/step-{step:06d}.txt")

    def table(self, key: str, rows: list[dict], step: int) -> None:
        columns = {c: [r.get(c) for r in rows] for c in rows[0]}
        self.mlflow.log_table(columns, artifact_file=f"{key}/step-{step:06d}.json")

    def trainer_callback(self):
        from transformers.integrations import MLflowCallback  # transformers: seconds

        return MLflowCallback()  # logs into the active run: this stage's nested run

    def close(self) -> None:
        self.mlflow.end_run()  # the stage's nested run
        self.mlflow.end_run()  # the pipeline's parent run (reopened by the next stage)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): value}


def _code(text: str) -> str:
    return "    " + text.replace("\n", "\n    ")  # TensorBoard's text tab renders markdown


def _markdown_table(rows: list[dict]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = (str(r.get(c, "")).replace("|", "\\|").replace("\n", " ") for c in columns)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
