"""Reward vs KL frontier on the builtin task: DPO beta, PPO KL coefficient, GRPO beta.

One run directory holds one SFT stage (the quickstart's) and, from it, one DPO, PPO and GRPO
stage per swept value. Every policy stage ends with the held-out evaluation (64 builtin test
prompts x 2 samples, fixed seed), which records the held-out gold reward of the policy and of its
reference (the SFT policy) and ``kl_ref``, the policy's KL to that reference in nats per
sequence. Each point is one stage: x = KL to SFT, y = gold reward gain over SFT.

    python bench/frontier.py                 # ~13 min on 2 CPU cores (3-4 values per method)
    python bench/frontier.py --quick         # ~3 min: 2 values per method, short runs
    python bench/frontier.py --methods dpo   # one method

Finished stages are skipped when the same run directory is used again (the pipeline's cache),
so an interrupted sweep continues. Writes ``frontier.csv`` and ``frontier.png`` into
``--out`` (default ``bench/``) and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = {  # method -> (swept field, values, stage fields)
    "dpo": ("beta", [0.01, 0.03, 0.1, 0.5], {}),
    "ppo": ("kl_coef", [0.01, 0.05, 0.3], {"adaptive_kl": False}),
    "grpo": ("beta", [0.005, 0.04, 0.3], {}),
    # plain sigmoid DPO (no NLL term) at the lr where the quickstart saw it degenerate
    "dpo_sigmoid": ("beta", [0.1, 0.3, 1.0], {"loss_type": ["sigmoid"]}),
}
QUICK = {"dpo": [0.1, 1.0], "ppo": [0.03, 0.3], "grpo": [0.02, 0.3], "dpo_sigmoid": [0.3]}
LABELS = {"dpo": "DPO + NLL (quickstart)", "ppo": "PPO", "grpo": "GRPO",
          "dpo_sigmoid": "DPO, sigmoid only (lr 2e-4)"}  # fmt: skip


def pipeline(methods: list[str], quick: bool, seed: int) -> dict:
    """The quickstart's model, adapter and SFT stage, plus one stage per (method, value)."""
    base = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    by_name = {s["name"]: s for s in base["stages"]}
    grpo = yaml.safe_load((ROOT / "configs" / "quickstart-grpo.yaml").read_text())
    sigmoid = json.loads(json.dumps(by_name["dpo"]))
    sigmoid["train"].pop("loss_weights", None)
    sigmoid["train"]["learning_rate"] = 2e-4
    templates = {
        "dpo": by_name["dpo"],
        "dpo_sigmoid": sigmoid,
        "ppo": by_name["ppo"],
        "grpo": next(s for s in grpo["stages"] if s["kind"] == "grpo"),
    }
    stages = [by_name["sft"]]
    if "ppo" in methods:  # PPO trains on the quickstart's reward model (with on-policy pairs)
        stages += [by_name["onpolicy"], by_name["reward_model"]]
    for method in methods:
        field, values, fixed = SWEEPS[method]
        for value in QUICK[method] if quick else values:
            stage = json.loads(json.dumps(templates[method]))  # a deep copy
            name = f"{method}_{field}_{value:g}"
            stage.update(fixed, name=name, **{"from": "sft", field: value})
            stage["health"] = {"enabled": False}  # the sweep measures, it does not judge
            if quick:
                _shorten(stage)
            stages.append(stage)
    return {"run": {"name": "frontier", "seed": seed}, "model": base["model"],
            "adapter": base["adapter"], "stages": stages}  # fmt: skip


def _shorten(stage: dict) -> None:
    if stage["kind"] == "ppo":
        stage["steps"] = 30
    else:
        stage["train"]["max_steps"] = 100 if stage["kind"] == "dpo" else 30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--methods", nargs="+", choices=list(SWEEPS), default=list(SWEEPS))
    ap.add_argument("--quick", action="store_true", help="2 values per method, short runs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "frontier")
    ap.add_argument("--out", type=Path, default=ROOT / "bench")
    args = ap.parse_args()

    from rich.console import Console

    from alignkit.config import validate_pipeline
    from alignkit.pipeline import run_pipeline
    from alignkit.rundir import RunDir
    from alignkit.stages import REGISTRY, stage_kinds

    run_dir = (
        args.run_dir if not args.quick else args.run_dir.with_name(args.run_dir.name + "-quick")
    )
    raw = pipeline(args.methods, args.quick, args.seed)
    cfg = validate_pipeline(raw, stage_kinds(), where="frontier")
    t0 = time.time()
    run_pipeline(cfg, REGISTRY, run_dir, Console(stderr=True))
    swept = [s for s in raw["stages"] if s["name"].startswith(tuple(SWEEPS))]
    rows = collect(RunDir(run_dir), swept)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, args.out / "frontier.csv")
    plot(rows, args.out / "frontier.png")
    print_table(rows)
    print(f"\n{len(rows)} runs, {time.time() - t0:.0f} s; wrote {args.out / 'frontier.csv'} "
          f"and {args.out / 'frontier.png'}", file=sys.stderr)  # fmt: skip


def collect(rd, stages: list[dict]) -> list[dict]:
    rows = []
    for stage in stages:
        record = rd.stage_json(stage["name"])
        m = record["metrics"]
        method = next(m for m in SWEEPS if stage["name"].startswith(m + "_" + SWEEPS[m][0]))
        field = SWEEPS[method][0]
        rows.append({
            "method": method,
            "param": field,
            "value": float(stage[field]),
            "gold_reward": m["gold_reward"],
            "gold_reward_sft": m["gold_reward_ref"],
            "gain": m["gold_reward"] - m["gold_reward_ref"],
            "gain_ci_low": m["gold_reward_gain_ci_low"],
            "gain_ci_high": m["gold_reward_gain_ci_high"],
            "kl_to_sft": m["kl_ref"],
            "train_seconds": m.get("train_runtime", float("nan")),
        })  # fmt: skip
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def print_table(rows: list[dict]) -> None:
    print("| method | param | value | KL to SFT (nats/seq) | gold gain over SFT [95% CI] | gold |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['param']} | {r['value']:g} | {r['kl_to_sft']:.2f} | "
              f"{r['gain']:+.3f} [{r['gain_ci_low']:+.3f}, {r['gain_ci_high']:+.3f}] | "
              f"{r['gold_reward']:.3f} |")  # fmt: skip


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for method, marker in (("dpo", "o"), ("dpo_sigmoid", "D"), ("ppo", "s"), ("grpo", "^")):
        points = sorted((r for r in rows if r["method"] == method), key=lambda r: r["kl_to_sft"])
        if not points:
            continue
        x = [r["kl_to_sft"] for r in points]
        y = [r["gain"] for r in points]
        err = [[r["gain"] - r["gain_ci_low"] for r in points],
               [r["gain_ci_high"] - r["gain"] for r in points]]  # fmt: skip
        ax.errorbar(x, y, yerr=err, marker=marker, capsize=3, label=LABELS[method])
        for r in points:
            ax.annotate(f"{r['param']}={r['value']:g}", (r["kl_to_sft"], r["gain"]),
                        textcoords="offset points", xytext=(4, -10), fontsize=7)  # fmt: skip
    ax.axhline(0, color="gray", lw=0.8)
    if max(r["kl_to_sft"] for r in rows) > 10:  # a degenerate run: keep the rest readable
        ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("KL to the SFT policy (nats per sequence, held-out samples)")
    ax.set_ylabel("held-out gold reward gain over SFT")
    ax.set_title("Reward vs KL on the builtin task")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
