"""The sweep report: a table of trials (printed and ``trials.csv``), the best trial's pipeline
as a ready-to-run YAML (``best.yaml``), and Optuna's plots as PNG (optimization history,
parameter importances, parallel coordinates) in ``<run_dir>/sweep/report/``."""

from __future__ import annotations

import csv
import logging
import warnings
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from alignkit.rundir import write_text_atomic
from alignkit.sweep.space import SweepSpec, with_params

log = logging.getLogger(__name__)

#: Metrics shown beside the objective when the stage recorded them (the rest are in the CSV).
CONTEXT_METRICS = ("kl_ref", "eval_loss")
HEADERS = {"last_step": "step", "seconds": "s"}


def trial_rows(study, spec: SweepSpec) -> list[dict]:
    """One row per attempt, in trial order: number, directory, state, parameters, objective,
    the last step reported to the pruner, seconds, and every metric the stage recorded."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        metrics = t.user_attrs.get("metrics", {})
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if (
            t.datetime_complete and t.datetime_start) else None  # fmt: skip
        row = {
            "trial": t.number,
            "dir": t.user_attrs.get("dir", ""),
            "state": "killed" if t.user_attrs.get("interrupted") else t.state.name.lower(),
            **{p: t.params.get(p) for p in spec.params},
            spec.objective: t.value if t.value is not None else _last_intermediate(t),
            "last_step": t.user_attrs.get("last_step"),
            "seconds": round(seconds) if seconds is not None else None,
        }
        row.update({f"metric:{k}": v for k, v in sorted(metrics.items()) if k != spec.objective})
        rows.append(row)
    return rows


def _last_intermediate(t) -> float | None:
    values = t.intermediate_values
    return values[max(values)] if values else None


def write_report(
    study, spec: SweepSpec, raw: dict, run_dir: Path, sweep_dir: Path, console: Console
) -> Path:
    out = sweep_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = trial_rows(study, spec)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "trials.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    console.print(_table(rows, spec))
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if not complete:
        console.print("[yellow]sweep:[/] no trial completed; no best config or plots")
        return out
    best = study.best_trial
    values = {p: best.params[p] for p in spec.params}
    header = (
        f"# Best trial of sweep {study.study_name}: trial {best.number} "
        f"({best.user_attrs.get('dir', '')}), {spec.objective} = {best.value:.6g}\n"
        + "".join(f"#   {p} = {v!r}\n" for p, v in values.items())
        + "# Run it with: alignkit run best.yaml (its finished upstream stages are skipped)\n"
    )
    best_raw = with_params(raw, values)
    best_raw.setdefault("run", {})["dir"] = str(run_dir)  # where the shared stages are
    body = yaml.safe_dump(best_raw, sort_keys=False, allow_unicode=True)
    write_text_atomic(out / "best.yaml", header + body)
    _plots(study, spec, out)
    console.print(
        f"best: trial {best.number}, {spec.objective} = {best.value:.4g} "
        f"({', '.join(f'{p} = {v:.4g}' if isinstance(v, float) else f'{p} = {v}' for p, v in values.items())})"
    )
    console.print(f"sweep report: [bold]{out}[/] (trials.csv, best.yaml, *.png)")
    return out


def _table(rows: list[dict], spec: SweepSpec) -> Table:
    """The headline columns (parameters by their last name; the rest are in trials.csv)."""
    shown = [
        "trial", "state", *spec.params, spec.objective,
        *(f"metric:{m}" for m in CONTEXT_METRICS), "last_step", "seconds",
    ]  # fmt: skip
    shown = [c for c in shown if any(r.get(c) is not None for r in rows)]
    title = f"sweep: value = {spec.objective} ({spec.direction})"
    table = Table(title=title, show_edge=False)
    for col in shown:
        header = "value" if col == spec.objective else HEADERS.get(col, col.rsplit(".", 1)[-1])
        header = header.removeprefix("metric:")
        table.add_column(header, justify="right", no_wrap=True)
    for r in rows:
        table.add_row(*(_cell(r.get(c)) for c in shown))
    return table


def _cell(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _plots(study, spec: SweepSpec, out: Path) -> None:
    """Optuna's matplotlib plots. Parameter importances use PED-ANOVA (no scikit-learn needed);
    a plot Optuna cannot draw yet (too few trials) is skipped with a note."""
    import matplotlib  # the backend must be set before pyplot is imported

    matplotlib.use("Agg")
    # pyplot after the backend; optuna: the optional sweep extra
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as views

    target_name = spec.objective
    plots = {
        "optimization_history.png": lambda: views.plot_optimization_history(
            study, target_name=target_name
        ),
        "param_importances.png": lambda: views.plot_param_importances(
            study, evaluator=optuna.importance.PedAnovaImportanceEvaluator(),
            target_name=target_name,
        ),
        "parallel_coordinate.png": lambda: views.plot_parallel_coordinate(
            study, target_name=target_name
        ),
        "intermediate_values.png": lambda: views.plot_intermediate_values(study),
    }  # fmt: skip
    for name, draw in plots.items():
        try:
            with warnings.catch_warnings():  # "experimental" notes, and too-few-trials notes
                warnings.simplefilter("ignore")
                ax = draw()
        except Exception as e:  # noqa: BLE001 (a missing plot must not lose the sweep's report)
            log.warning("sweep report: %s not drawn: %s", name, e)
            continue
        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
        fig.set_size_inches(8, 5)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
