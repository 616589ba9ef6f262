"""The comparison's PNG plots (matplotlib, Agg backend: no display needed).

- ``reward_distributions.png``: per reward, one violin per model over its samples, mean marked;
- ``win_rates.png``: per comparison and reward, the win rate with its 95% CI; 0.5 marked;
- ``reward_vs_kl.png``: per reward, one point per model: mean reward (with CI) against KL to the
  base in nats per sequence (the base sits at 0).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from alignkit.eval.report import reward_label as _short
from alignkit.eval.scoring import ModelSamples

DPI = 110


def make_plots(results: dict, data: dict[str, ModelSamples], out: Path) -> list[str]:
    """Write the plots into ``out``; return their file names."""
    import matplotlib  # ~0.25 s, only when a report is drawn; Agg is chosen before pyplot loads

    matplotlib.use("Agg", force=True)
    names = [_reward_distributions(results, data, out)]
    if results["comparisons"]:
        names.append(_win_rates(results, out))
    if results["base"] is not None:
        names.append(_reward_vs_kl(results, out))
    return names


def _grid(count: int, width: float = 5.0, height: float = 3.6):
    import matplotlib.pyplot as plt  # after make_plots chose the Agg backend

    fig, axes = plt.subplots(1, count, figsize=(width * count, height), squeeze=False)
    return fig, list(axes[0])


def _save(fig, out: Path, name: str) -> str:
    import matplotlib.pyplot as plt  # after make_plots chose the Agg backend

    fig.tight_layout()
    fig.savefig(Path(out) / name, dpi=DPI)
    plt.close(fig)
    return name


def _reward_distributions(results: dict, data: dict[str, ModelSamples], out: Path) -> str:
    labels = list(data)
    fig, axes = _grid(len(results["rewards"]), width=max(4.0, 1.3 * len(labels) + 2))
    for ax, reward in zip(axes, results["rewards"], strict=True):
        values = [data[label].rewards[reward].ravel() for label in labels]
        values = [v[~np.isnan(v)] for v in values]
        shown = [i for i, v in enumerate(values) if v.size]
        if shown:
            parts = ax.violinplot([values[i] for i in shown], positions=shown, showmedians=True)
            for body in parts["bodies"]:
                body.set_alpha(0.45)
            ax.scatter(
                shown,
                [values[i].mean() for i in shown],
                marker="D",
                color="black",
                zorder=3,
                label="mean",
            )
            ax.legend(loc="lower right", fontsize=8)
        ax.set_xticks(range(len(labels)), labels, rotation=20)
        ax.set_title(f"{_short(reward)}: distribution over samples")
        ax.set_ylabel("reward")
        ax.grid(axis="y", alpha=0.3)
    return _save(fig, out, "reward_distributions.png")


def _win_rates(results: dict, out: Path) -> str:
    import matplotlib.pyplot as plt  # after make_plots chose the Agg backend

    rows = results["comparisons"]
    fig, ax = plt.subplots(figsize=(7.5, 0.55 * len(rows) + 1.6))
    y = np.arange(len(rows))[::-1]
    rates = np.array([c["win_rate"] for c in rows])
    errors = np.array(
        [[c["win_rate"] - c["ci_low"] for c in rows], [c["ci_high"] - c["win_rate"] for c in rows]]
    )
    colors = [
        "tab:green" if c["ci_low"] > 0.5 else "tab:red" if c["ci_high"] < 0.5 else "tab:gray"
        for c in rows
    ]
    ax.barh(y, rates, color=colors, alpha=0.6, height=0.6)
    ax.errorbar(rates, y, xerr=errors, fmt="none", ecolor="black", capsize=4)
    ax.axvline(0.5, color="black", linestyle="--", linewidth=1)
    ax.set_yticks(y, [f"{c['model']} vs {c['against']} ({_short(c['reward'])})" for c in rows])
    ax.set_xlim(0, 1)
    ax.set_xlabel("win rate over prompts (ties count half), 95% bootstrap CI")
    ax.set_title("win rate")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, out, "win_rates.png")


def _reward_vs_kl(results: dict, out: Path) -> str:
    fig, axes = _grid(len(results["rewards"]))
    for ax, reward in zip(axes, results["rewards"], strict=True):
        for m in results["models"]:
            kl = 0.0 if m["role"] == "base" else (m["kl"] or {}).get("per_sequence", {}).get("mean")
            r = m["rewards"][reward]
            if kl is None or r["mean"] is None:
                continue
            yerr = [[r["mean"] - r["ci_low"]], [r["ci_high"] - r["mean"]]]
            marker = "s" if m["role"] == "base" else "o"
            ax.errorbar([kl], [r["mean"]], yerr=yerr, fmt=marker, capsize=4, markersize=7)
            ax.annotate(m["label"], (kl, r["mean"]), textcoords="offset points", xytext=(6, 6))
        ax.set_xlabel(f"KL(model || {results['base']}), nats per sequence")
        ax.set_ylabel(f"mean {_short(reward)}")
        ax.set_title(f"{_short(reward)} vs KL")
        ax.grid(alpha=0.3)
        ax.margins(x=0.2, y=0.2)
    return _save(fig, out, "reward_vs_kl.png")
