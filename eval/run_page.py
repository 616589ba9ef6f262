"""``alignkit report RUN_DIR``: one self-contained HTML page for a run, read from its files.

No server, no CDN, no JavaScript: inline CSS, pictures as base64 data URIs, and ``<details>``
for what opens on a click. The page holds the stage chain as a graph (status and time per
stage), then per stage: its training curves (``metrics.jsonl``) with health trips marked, its
health checks (``health.json``), held-out metrics with confidence intervals (``stage.json``),
the health probe's samples by step (``samples.jsonl``), and for a comparison (``results.json``)
its tables, plots and a sample browser: each prompt with every model's completions and rewards.
"""

from __future__ import annotations

import base64
import json
import time
from html import escape
from pathlib import Path

from alignkit.eval import report as compare_report
from alignkit.eval import run_plots
from alignkit.health import HEALTH_FILE, SAMPLES_FILE
from alignkit.rundir import REPORT_FILE, read_json_or_none
from alignkit.status import headline, load_status

MAX_PROBE_STEPS = 8  # probe checks shown per stage (first, last and evenly between)
MAX_PROMPTS = 40  # prompts in a comparison's sample browser
PLOT_TITLES = {
    "reward_distributions.png": "Reward distributions",
    "win_rates.png": "Win rates",
    "reward_vs_kl.png": "Reward vs KL to the base",
}

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#202124;
background:#fafafa}
main{max-width:1180px;margin:0 auto;padding:16px 24px 48px}
h1{font-size:24px;margin:8px 0 4px}h2{font-size:20px;border-bottom:1px solid #dadce0;
padding-bottom:4px;margin-top:36px}h3{font-size:15px;margin:18px 0 6px}
.meta{color:#5f6368;font-size:13px}.graph{overflow-x:auto;background:#fff;border:1px solid
#dadce0;border-radius:8px;padding:8px}
table{border-collapse:collapse;font-size:12.5px;margin:6px 0;background:#fff}
th,td{border:1px solid #e0e0e0;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f1f3f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;border:1px solid #e0e0e0;border-radius:6px;background:#fff}
details{margin:4px 0;background:#fff;border:1px solid #e0e0e0;border-radius:6px;
padding:4px 8px}summary{cursor:pointer;font-size:13px}
.trip{color:#b3261e}.ok{color:#1e8e3e}.pill{display:inline-block;border-radius:10px;
padding:0 8px;font-size:12px;color:#fff}.completion{font-family:ui-monospace,monospace;
white-space:pre-wrap}
"""


def write_run_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write the page (default ``RUN_DIR/report.html``); return its path."""
    run_dir = Path(run_dir)
    path = Path(out) if out is not None else run_dir / REPORT_FILE
    html = build_page(run_dir)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(path)
    return path


def build_page(run_dir: Path) -> str:
    manifest = load_status(run_dir)  # a UserError when RUN_DIR is no run directory
    stages = manifest["stages"]
    records = {s["name"]: read_json_or_none(run_dir / s["name"] / "stage.json") for s in stages}
    processes = manifest.get("processes", {})
    body = [
        f"<h1>{escape(manifest['run'])}</h1>",
        f'<p class="meta">model <b>{escape(str(manifest.get("model")))}</b> · seed '
        f"{manifest.get('seed')} · {processes.get('world_size', 1)} process(es) · "
        f"{escape(str(run_dir))} · page written {time.strftime('%Y-%m-%d %H:%M:%S')}</p>",
        "<h2>Stages</h2>",
        f'<div class="graph">{run_plots.chain_svg(stages, _edges(stages, records))}</div>',
        _stage_table(stages),
    ]
    for s in stages:
        body.append(_stage_section(run_dir, s, records[s["name"]]))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(manifest['run'])}: alignkit run</title><style>{CSS}</style></head>"
        f"<body><main>{''.join(body)}</main></body></html>\n"
    )


def _edges(stages: list[dict], records: dict) -> list[tuple[str, str, bool]]:
    """Parent edges, and an edge from every other stage a stage reads (a reward model, a
    rollout stage's pairs, the stages a comparison compares): the manifest's ``uses``; in a
    run written before it had one, the stage names among the config's top-level values."""
    names = {s["name"] for s in stages}
    edges = [(s["parent"], s["name"], True) for s in stages if s.get("parent")]
    for s in stages:
        used = s.get("uses")
        if used is None:
            config = (records.get(s["name"]) or {}).get("config", {})
            values = [v for k, v in config.items() if k not in ("name", "kind", "from")]
            used = [u.get("stage") if isinstance(u, dict) else u  # reward_model's mix
                    for v in values for u in (v if isinstance(v, list) else [v])]  # fmt: skip
        edges += [(u, s["name"], False) for u in used
                  if isinstance(u, str) and u in names and u != s.get("parent")]  # fmt: skip
    return list(dict.fromkeys(edges))


def _stage_table(stages: list[dict]) -> str:
    rows = []
    for s in stages:
        health = s.get("health") or {}
        trips = health.get("trips", [])
        rows.append(
            [
                f'<a href="#stage-{escape(s["name"])}">{escape(s["name"])}</a>',
                escape(s["kind"]),
                escape(s.get("parent") or "-"),
                _pill(s["status"]),
                escape(run_plots.duration(s.get("started"), s.get("finished")) or "-"),
                "<br>".join(f"{escape(k)} {v:.4g}" for k, v in headline(s.get("metrics") or {}))
                or "-",
                (
                    f'<span class="trip">{len(trips)} trip(s)</span>'
                    if trips
                    else '<span class="ok">ok</span>'
                    if health
                    else "-"
                ),  # fmt: skip
            ]
        )
    header = ["stage", "kind", "from", "status", "time", "headline", "health"]
    return _table(header, rows, raw=True)


def _stage_section(run_dir: Path, s: dict, record: dict | None) -> str:
    name = s["name"]
    stage_dir = run_dir / name
    if not stage_dir.is_dir():  # unfinished: its files are in the partial dir
        stage_dir = run_dir / f".{name}.partial"
    out = [
        f'<section id="stage-{escape(name)}"><h2>{escape(name)} '
        f'<span class="meta">({escape(s["kind"])})</span> {_pill(s["status"])}</h2>'
    ]
    health = read_json_or_none(stage_dir / HEALTH_FILE) or {}
    trips = health.get("trips", [])
    metrics_rows = _jsonl(stage_dir / "metrics.jsonl")
    curves = run_plots.curves_png(metrics_rows, trips)
    if curves:
        out += ["<h3>Training curves</h3>", _img(curves, f"{name}: training curves")]
    if health.get("history"):
        out.append(f"<h3>Health checks ({len(health['history'])})</h3>")
        chart = run_plots.health_png(health["history"], trips)
        if chart:
            out.append(_img(chart, f"{name}: health checks"))
        out += [
            f'<p class="trip">✗ <b>{escape(t["check"])}</b> at step {t["step"]}: '
            f"{escape(t['message'])}</p>"
            for t in trips
        ] or ['<p class="ok">no check tripped</p>']
    metrics = (record or {}).get("metrics") or s.get("metrics") or {}
    out.append(_heldout(metrics))
    results = read_json_or_none(stage_dir / "results.json")
    if results:
        out.append(_comparison(stage_dir, results))
    elif (stage_dir / SAMPLES_FILE).exists():
        out.append(_probe_samples(_jsonl(stage_dir / SAMPLES_FILE)))
    if metrics:
        rows = [[escape(k), _num(v)] for k, v in sorted(metrics.items())]
        out.append(
            f"<details><summary>all metrics ({len(rows)})</summary>"
            f"{_table(['metric', 'value'], rows, raw=True)}</details>"
        )
    if s["status"] != "complete":
        out.append(f'<p class="meta">stage not complete ({escape(s["status"])})</p>')
    return "".join(out) + "</section>"


def _heldout(metrics: dict) -> str:
    """Held-out evaluation: each reward of the policy vs its reference, gain with its 95% CI;
    KL, length and EOS rate."""
    rewards = [k[: -len("_gain_ci_low")] for k in metrics if k.endswith("_gain_ci_low")]
    if not rewards:
        return ""
    rows = []
    for r in rewards:
        policy, ref = metrics.get(r), metrics.get(f"{r}_ref")
        gain = policy - ref if policy is not None and ref is not None else None
        ci = f"[{_fmt(metrics[f'{r}_gain_ci_low'])}, {_fmt(metrics.get(f'{r}_gain_ci_high'))}]"
        rows.append([r, _fmt(policy), _fmt(ref), _fmt(gain), ci])
    for key, label in (("response_length", "length"), ("eos_rate", "EOS rate")):
        if key in metrics:
            rows.append([label, _fmt(metrics[key]), _fmt(metrics.get(f"{key}_ref")), "", ""])
    if "kl_ref" in metrics:
        per_token = metrics.get("kl_ref_per_token")
        rows.append(["KL to reference (nats/seq)", _fmt(metrics["kl_ref"]), "", "",
                     f"{_fmt(per_token)} per token" if per_token is not None else ""])  # fmt: skip
    n = metrics.get("heldout_prompts")
    title = "Held-out evaluation" + (f" ({n:.0f} prompts)" if n else "")
    header = ["metric", "policy", "reference", "gain", "gain 95% CI"]
    return f"<h3>{title}</h3>" + _table(header, rows)


def _probe_samples(rows: list[dict]) -> str:
    """The health probe's samples, one ``<details>`` per check step."""
    if not rows:
        return ""
    steps = sorted({r["step"] for r in rows})
    if len(steps) > MAX_PROBE_STEPS:
        k = MAX_PROBE_STEPS - 1
        steps = sorted({steps[round(i * (len(steps) - 1) / k)] for i in range(k + 1)})
    out = [f"<h3>Probe samples ({len(steps)} of the checks)</h3>"]
    columns = [c for c in ("prompt", "completion", "tokens", "kl", "gold") if c in rows[0]]
    for step in steps:
        chosen = [r for r in rows if r["step"] == step]
        table = _table(columns, [[r.get(c, "") for c in columns] for r in chosen])
        out.append(
            f"<details><summary>step {step}: {len(chosen)} samples</summary>{table}</details>"
        )
    return "".join(out)


def _comparison(stage_dir: Path, results: dict) -> str:
    """The comparison's tables and plots (as in its report.md) and a per-prompt sample browser."""
    out = [
        f"<h3>Comparison: {results['n_prompts']} prompts × {results['samples_per_prompt']} "
        "samples</h3>",
        _table(*compare_report.reward_rows(results)),
        _table(*compare_report.drift_rows(results)),
        "<h3>Win rates</h3>",
        _table(*compare_report.comparison_rows(results)),
    ]
    for plot in results.get("plots", []):
        path = stage_dir / plot
        if path.exists():
            out += [
                f"<h3>{escape(PLOT_TITLES.get(plot, plot))}</h3>",
                _img(path.read_bytes(), plot),
            ]
    samples = _jsonl(stage_dir / "samples.jsonl")
    if samples:
        out.append(_sample_browser(samples, results))
    return "".join(out)


def _sample_browser(samples: list[dict], results: dict) -> str:
    """Each prompt (the first ``MAX_PROMPTS``) with every model's completions and rewards, the
    aligned models first and the base (the reference) last."""
    prompts = {e["prompt_id"]: e["prompt"] for e in results.get("examples", [])}
    by_prompt: dict[str, list[dict]] = {}
    for r in samples:
        by_prompt.setdefault(r["prompt_id"], []).append(r)
        if "prompt" in r:
            prompts[r["prompt_id"]] = r["prompt"]
    rewards = [compare_report.reward_label(r) for r in results["rewards"]]
    out = [f"<h3>Samples ({min(len(by_prompt), MAX_PROMPTS)} of {len(by_prompt)} prompts)</h3>"]
    for pid, rows in list(by_prompt.items())[:MAX_PROMPTS]:
        body = []
        for r in rows:
            scores = {compare_report.reward_label(k): v for k, v in r["rewards"].items()}
            label = r["model"] + (" (base)" if r["model"] == results["base"] else "")
            body.append(
                [label, r["sample"], r["completion"], *(_fmt(scores.get(k)) for k in rewards)]
            )
        text = prompts.get(pid, pid)
        out.append(
            f"<details><summary>{escape(text[:160])}</summary>"
            f"{_table(['model', '#', 'completion', *rewards], body)}</details>"
        )
    return "".join(out)


# --- HTML pieces --------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list], raw: bool = False) -> str:
    """An HTML table; cells are escaped unless ``raw`` (cells built here as HTML)."""
    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for cell in row:
            numeric = isinstance(cell, int | float) and not isinstance(cell, bool)
            text = str(cell) if raw else escape(str(cell))
            cls = ' class="num"' if numeric else ' class="completion"' if len(text) > 60 else ""
            cells.append(f"<td{cls}>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{data}">'


def _pill(status: str) -> str:
    color = run_plots.STATUS_COLORS.get(status, run_plots.STATUS_COLORS["pending"])[1]
    return f'<span class="pill" style="background:{color}">{escape(status)}</span>'


def _fmt(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def _num(value) -> str:
    return _fmt(value, 6) if isinstance(value, int | float) else escape(str(value))


def _jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file; a torn last line (a stage still writing) is left out."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows
