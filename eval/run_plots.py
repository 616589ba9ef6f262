"""The run page's pictures: the stage chain as an inline SVG graph, and each stage's training
curves and health checks as matplotlib PNGs (returned as bytes; the page inlines them).

Curves come from a stage's ``metrics.jsonl`` (TRL's logs or our PPO's records), grouped into
loss, reward, accuracy and KL panels; health checks from ``health.json``, each tripped check marked where
it tripped (a red cross on its metric's panel, a red dashed line on the training curves).
"""

from __future__ import annotations

import io
import math
from datetime import datetime
from html import escape

#: Status colours (fill, stroke) of the chain graph.
STATUS_COLORS = {
    "complete": ("#e6f4ea", "#1e8e3e"),
    "running": ("#fef7e0", "#f9ab00"),
    "interrupted": ("#fef7e0", "#e37400"),
    "failed": ("#fce8e6", "#d93025"),
    "stopped": ("#fce8e6", "#d93025"),
    "stale": ("#f3e8fd", "#9334e6"),
    "pending": ("#f1f3f4", "#80868b"),
}
BOX_W, BOX_H, GAP_X, GAP_Y = 180, 62, 60, 40

#: Panels of the curves figure: title -> does a metric name belong to it
PANELS = (
    ("loss", lambda k: k == "loss" or k.endswith("_loss") and not k.startswith("train_")),
    ("reward", lambda k: (any(w in k for w in ("reward", "score_mean", "margin"))
                          and not any(w in k for w in ("max_", "min_", "accurac")))),
    ("accuracy", lambda k: k.endswith(("accuracy", "accuracies")) and "token" not in k),
    ("KL", lambda k: k.split("/")[-1] in ("kl", "approx_kl", "kl_ref")),
)  # fmt: skip
SKIP = ("_std", "runtime", "per_second", "_seconds", "tokens_per_s", "total_flos", "before_")


def duration(started: str | None, finished: str | None) -> str:
    """``1m 05s`` between two manifest timestamps, or ``""``."""
    try:
        fmt = "%Y-%m-%dT%H:%M:%S%z"
        took = datetime.strptime(finished, fmt) - datetime.strptime(started, fmt)
        seconds = int(took.total_seconds())
    except (TypeError, ValueError):
        return ""
    minutes, s = divmod(seconds, 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h {m:02d}m" if hours else f"{m}m {s:02d}s" if m else f"{s}s"


def chain_svg(stages: list[dict], edges: list[tuple[str, str, bool]]) -> str:
    """The stages as boxes (name, kind, status, time), each in the column after every stage it
    starts from or reads, with an arrow from each parent (solid) and from each other stage a stage reads (dashed, e.g. a
    reward model). ``stages``: manifest entries; ``edges``: (from, to, is_parent)."""
    depth: dict[str, int] = {}
    for s in stages:  # after every stage it starts from or reads (those come earlier)
        before = [depth.get(a, -1) for a, b, _ in edges if b == s["name"]]
        depth[s["name"]] = max(before, default=-1) + 1
    rows: dict[int, int] = {}
    pos: dict[str, tuple[int, int]] = {}
    for s in stages:
        col = depth[s["name"]]
        row = rows.get(col, 0)
        rows[col] = row + 1
        pos[s["name"]] = (10 + col * (BOX_W + GAP_X), 10 + row * (BOX_H + GAP_Y))
    width = 20 + (max(depth.values()) + 1) * (BOX_W + GAP_X) - GAP_X
    height = 20 + max(rows.values()) * (BOX_H + GAP_Y) - GAP_Y
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="stage graph">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
        'fill="#5f6368"/></marker></defs>',
    ]
    below = 0
    for a, b, is_parent in edges:
        if a not in pos or b not in pos:
            continue
        (x1, y1), (x2, y2) = pos[a], pos[b]
        if x2 - x1 > BOX_W + GAP_X and y1 == y2:  # past the boxes between: below them
            dip = 4 / 3 * (10 + 8 * (below % 3))  # each its own depth in the gap
            below += 1
            sx, sy, ex, ey = x1 + BOX_W / 2, y1 + BOX_H, x2 + BOX_W / 3, y2 + BOX_H
            path = f"M{sx},{sy} C{sx},{sy + dip} {ex},{ey + dip} {ex},{ey + 2}"
        elif x2 > x1:  # left to right: from the right edge to the left edge
            sx, sy, ex, ey = x1 + BOX_W, y1 + BOX_H / 2, x2, y2 + BOX_H / 2
            mid = (sx + ex) / 2
            path = f"M{sx},{sy} C{mid},{sy} {mid},{ey} {ex - 2},{ey}"
        else:  # same column: from the bottom edge, around the right side
            sx, sy, ex, ey = x1 + BOX_W * 0.75, y1 + BOX_H, x2 + BOX_W * 0.75, y2
            path = f"M{sx},{sy} C{sx + 40},{sy + 20} {ex + 40},{ey - 20} {ex},{ey - 2}"
        dash = "" if is_parent else ' stroke-dasharray="5,4"'
        parts.append(
            f'<path d="{path}" fill="none" stroke="#5f6368" stroke-width="1.5"{dash} '
            'marker-end="url(#arrow)"/>'
        )
    for s in stages:
        x, y = pos[s["name"]]
        fill, stroke = STATUS_COLORS.get(s["status"], STATUS_COLORS["pending"])
        took = duration(s.get("started"), s.get("finished"))
        name = escape(s["name"])
        parts += [
            f'<a href="#stage-{name}"><g>',
            f'<rect x="{x}" y="{y}" width="{BOX_W}" height="{BOX_H}" rx="8" fill="{fill}" '
            f'stroke="{stroke}" stroke-width="2"/>',
            f'<text x="{x + 10}" y="{y + 20}" font-weight="bold" font-size="14">{name}</text>',
            f'<text x="{x + 10}" y="{y + 37}" font-size="12" fill="#3c4043">'
            f"{escape(s['kind'])}</text>",
            f'<text x="{x + 10}" y="{y + 53}" font-size="12" fill="{stroke}">'
            f"{escape(s['status'])}{' · ' + took if took else ''}</text>",
            "</g></a>",
        ]
    parts.append("</svg>")
    return "\n".join(parts)


def curves_png(records: list[dict], trips: list[dict]) -> bytes | None:
    """Loss, reward, accuracy and KL panels over steps from metrics.jsonl records; every health trip as a
    red dashed line. ``None`` when the records hold none of these metrics."""
    series: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for r in records:
        step = r.get("step")
        if not isinstance(step, int | float):
            continue
        for key, value in r.items():
            if key in ("step", "epoch") or any(s in key for s in SKIP):
                continue
            if not isinstance(value, int | float) or not math.isfinite(value):
                continue
            for title, belongs in PANELS:
                if belongs(key):
                    xs, ys = series.setdefault(title, {}).setdefault(key, ([], []))
                    xs.append(step)
                    ys.append(float(value))
                    break
    panels = [(t, series[t]) for t, _ in PANELS if t in series]
    if not panels:
        return None
    fig, axes = _figure(len(panels), per_row=4, width=3.9)
    for ax, (title, lines) in zip(axes, panels, strict=True):
        for key, (xs, ys) in sorted(lines.items())[:8]:
            style = "o--" if key.startswith("eval") else "-"
            ax.plot(xs, ys, style, label=key, markersize=3, linewidth=1.3)
        for i, t in enumerate(trips):
            ax.axvline(t["step"], color="#d93025", linestyle="--", linewidth=1,
                       label="health trip" if i == 0 else None)  # fmt: skip
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _png(fig)


def health_png(history: list[dict], trips: list[dict]) -> bytes | None:
    """One panel per health value over the checks; a tripped check marked on its metric."""
    keys = [
        k for k in dict.fromkeys(k for h in history for k in h) if k not in ("step", "rm_flagged")
    ]
    if not keys:
        return None
    fig, axes = _figure(len(keys), per_row=4, width=3.6, height=2.6)
    for ax, key in zip(axes, keys, strict=False):
        points = [(h["step"], h[key]) for h in history if key in h]
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", markersize=3)
        for t in (t for t in trips if t["metric"] == key):
            ax.plot([t["step"]], [t["value"]], "x", color="#d93025", markersize=11, mew=2.5)
            ax.axhline(t["threshold"], color="#d93025", linestyle=":", linewidth=1)
            ax.annotate(t["check"], (t["step"], t["value"]), color="#d93025", fontsize=8,
                        textcoords="offset points", xytext=(4, 4))  # fmt: skip
        ax.set_title(key, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[len(keys) :]:
        ax.set_visible(False)
    return _png(fig)


def _figure(count: int, per_row: int = 3, width: float = 4.6, height: float = 3.2):
    import matplotlib  # the backend must be set before pyplot is imported

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # after the backend

    cols = min(count, per_row)
    nrows = math.ceil(count / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(width * cols, height * nrows), squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt  # after _figure set the backend

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()
