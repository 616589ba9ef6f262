"""Reward-model over-optimisation on the builtin task (Gao et al. 2022's picture).

Three reward models from the quickstart's SFT policy, differing only in what their pairs cover:

- ``small``: 1,000 offline pairs (two demonstrations each), 150 steps;
- ``offline``: the quickstart's 10,000 offline pairs, 400 steps;
- ``onpolicy``: the same plus comparisons of the SFT policy's own samples (the quickstart's RM).

For each, PPO trains on that RM alone (the quickstart's PPO with a small fixed KL coefficient
and a lower learning rate, so it travels far from SFT, slowly enough to watch), and best-of-n
picks the RM's favourite of n SFT samples. A fourth PPO run uses the ``small`` RM with raw
scores (no normalisation, no clipping, no missing-EOS penalty: the plumbing before this
release). Along each, the proxy (the RM's own score, in units of its std on SFT samples) and the
hidden gold reward are measured against sqrt(KL to SFT): PPO's health probe every 4 steps (32
held-out prompts x 2 samples, KL per sequence from the policy's own samples), best-of-n at
n = 1..16 on 128 held-out prompts (KL = log n - (n-1)/n, the analytic bound). Where the proxy
keeps rising while gold turns down, the RM is being over-optimised.

    python bench/overoptimization.py             # ~15 min on 2 CPU cores
    python bench/overoptimization.py --steps 40  # shorter PPO runs

Finished stages are skipped when the run directory is reused. Writes ``overoptimization.csv``
and ``overoptimization.png`` into ``--out`` (default ``bench/``) and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RMS = ("small", "offline", "onpolicy")
RUNS = {
    "small": "rm_small",
    "offline": "rm_offline",
    "onpolicy": "reward_model",
    "small_raw": "rm_small",
}  # PPO run -> the RM it trains on
RAW = {"normalize_scores": "none", "score_clip": None, "missing_eos_penalty": 0.0}
BEST_OF = (1, 2, 4, 8, 16)


def pipeline(steps: int, seed: int) -> dict:
    """The quickstart's sft/onpolicy/reward_model stages, two more RMs, one PPO per RM."""
    base = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    by_name = {s["name"]: s for s in base["stages"]}
    onpolicy_rm = by_name["reward_model"]
    offline = {k: v for k, v in json.loads(json.dumps(onpolicy_rm)).items() if k != "mix"}
    offline["name"] = "rm_offline"
    small = json.loads(json.dumps(offline))
    small["name"] = "rm_small"
    small["data"]["max_rows"] = 1000
    small["train"]["max_steps"] = 150
    stages = [by_name["sft"], by_name["onpolicy"], onpolicy_rm, offline, small]
    for label, rm in RUNS.items():
        ppo = json.loads(json.dumps(by_name["ppo"]))
        ppo.update(name=f"ppo_{label}", reward_model=rm, steps=steps, kl_coef=0.01,
                   adaptive_kl=False, learning_rate=1e-4,
                   health={"every": 4, "sample_prompts": 32})  # fmt: skip
        if label.endswith("_raw"):
            ppo.update(RAW)
        stages.append(ppo)
    return {"run": {"name": "overoptimization", "seed": seed}, "model": base["model"],
            "adapter": base["adapter"], "stages": stages}  # fmt: skip


def rm_dirs(run_dir: Path) -> dict[str, Path]:
    """Each PPO run's reward model."""
    return {label: run_dir / rm for label, rm in RUNS.items()}


def ppo_rows(run_dir: Path, scorers: dict) -> list[dict]:
    """Proxy (z) and gold against sqrt(KL) at each of PPO's health checks, per RM."""
    rows = []
    for label, scorer in scorers.items():
        samples = [json.loads(x) for x in (run_dir / f"ppo_{label}" / "samples.jsonl").open()]
        scores = scorer([s["prompt"] for s in samples], [s["completion"] for s in samples])
        by_step: dict[int, list[tuple[dict, float]]] = {}
        for s, score in zip(samples, scores, strict=True):
            by_step.setdefault(s["step"], []).append((s, score))
        start = [score for _, score in by_step[0]]
        mean0 = sum(start) / len(start)
        sd0 = math.sqrt(sum((x - mean0) ** 2 for x in start) / max(len(start) - 1, 1)) or 1.0
        for step, group in sorted(by_step.items()):
            kl = max(sum(s["kl"] for s, _ in group) / len(group), 0.0)
            rows.append({
                "method": "ppo", "rm": label, "point": step, "kl": kl, "sqrt_kl": math.sqrt(kl),
                "proxy_z": (sum(x for _, x in group) / len(group) - mean0) / sd0,
                "gold": sum(s["gold"] for s, _ in group) / len(group),
            })  # fmt: skip
    return rows


def best_of_n_rows(run_dir: Path, scorers: dict, prompts: int = 128) -> list[dict]:
    """Best-of-n by each RM over the same SFT samples (n = 16 per held-out prompt)."""
    from alignkit.builtin.task import gold_reward
    from alignkit.builtin.task import prompts as builtin_prompts
    from alignkit.rollouts import make_engine, model_source
    from alignkit.rollouts.types import SamplingSpec

    engine = make_engine("hf", model_source(stage=run_dir / "sft"), batch_size=256)
    rows_in = builtin_prompts("test", prompts)
    messages = [[{"role": "user", "content": r["prompt"]}] for r in rows_in]
    n_max = max(BEST_OF)
    batch = engine.generate(messages, SamplingSpec(n=n_max, max_new_tokens=40, seed=7))
    flat_prompts = [r["prompt"] for r in rows_in for _ in range(n_max)]
    gold = gold_reward(flat_prompts, batch.completion_text)
    rows = []
    for label, scorer in scorers.items():
        proxy = scorer(flat_prompts, batch.completion_text, finish_reason=batch.finish_reason)
        mean0 = sum(proxy) / len(proxy)
        sd0 = math.sqrt(sum((x - mean0) ** 2 for x in proxy) / (len(proxy) - 1)) or 1.0
        for n in BEST_OF:
            picked = []
            for i in range(len(rows_in)):
                block = range(i * n_max, i * n_max + n)
                best = max(block, key=lambda k: proxy[k])
                picked.append(((proxy[best] - mean0) / sd0, gold[best]))
            kl = math.log(n) - (n - 1) / n
            rows.append({
                "method": "best_of_n", "rm": label, "point": n, "kl": kl, "sqrt_kl": math.sqrt(kl),
                "proxy_z": sum(p for p, _ in picked) / len(picked),
                "gold": sum(g for _, g in picked) / len(picked),
            })  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=80, help="PPO steps per reward model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "overoptimization")
    ap.add_argument("--out", type=Path, default=ROOT / "bench")
    args = ap.parse_args()

    from rich.console import Console

    from alignkit.config import validate_pipeline
    from alignkit.pipeline import run_pipeline
    from alignkit.rewards.reward_model import RewardModelScorer
    from alignkit.stages import REGISTRY, stage_kinds

    t0 = time.time()
    cfg = validate_pipeline(pipeline(args.steps, args.seed), stage_kinds(), where="overopt")
    run_pipeline(cfg, REGISTRY, args.run_dir, Console(stderr=True))
    scorers = {label: RewardModelScorer.from_path(d) for label, d in rm_dirs(args.run_dir).items()}
    rows = ppo_rows(args.run_dir, scorers)
    rows += best_of_n_rows(args.run_dir, {k: v for k, v in scorers.items() if k in RMS})
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "overoptimization.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}
                         for r in rows)  # fmt: skip
    print_table(rows)
    plot(rows, args.out / "overoptimization.png")
    print(f"\n{time.time() - t0:.0f} s; wrote {args.out / 'overoptimization.csv'} and "
          f"{args.out / 'overoptimization.png'}", file=sys.stderr)  # fmt: skip


def print_table(rows: list[dict]) -> None:
    """Per RM and method: the start, the point of best gold, and the end."""
    print("| RM | method | start gold | best gold (at sqrt KL) | end: gold / proxy z / sqrt KL |")
    print("|---|---|---|---|---|")
    for rm in RUNS:
        for method in ("ppo", "best_of_n"):
            pts = [r for r in rows if r["rm"] == rm and r["method"] == method]
            if not pts:
                continue
            best, end = max(pts, key=lambda r: r["gold"]), pts[-1]
            print(f"| {rm} | {method} | {pts[0]['gold']:+.3f} | {best['gold']:+.3f} "
                  f"({best['sqrt_kl']:.2f}) | {end['gold']:+.3f} / {end['proxy_z']:+.2f} / "
                  f"{end['sqrt_kl']:.2f} |")  # fmt: skip


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, (gold_ax, proxy_ax) = plt.subplots(1, 2, figsize=(10, 4.2))
    colors = {"small": "tab:red", "offline": "tab:orange", "onpolicy": "tab:green",
              "small_raw": "tab:purple"}  # fmt: skip
    for rm in RUNS:
        for method, style in (("ppo", "-o"), ("best_of_n", "--s")):
            pts = [r for r in rows if r["rm"] == rm and r["method"] == method]
            if not pts:
                continue
            x = [r["sqrt_kl"] for r in pts]
            label = f"{rm.replace('_raw', '')} RM, " + (
                ("PPO, raw scores" if rm.endswith("_raw") else "PPO")
                if method == "ppo"
                else "best-of-n"
            )
            gold_ax.plot(x, [r["gold"] for r in pts], style, color=colors[rm], ms=3, label=label)
            proxy_ax.plot(x, [r["proxy_z"] for r in pts], style, color=colors[rm], ms=3)
    gold_ax.set_ylabel("held-out gold reward")
    proxy_ax.set_ylabel("proxy: the RM's score (std units on SFT samples)")
    for ax in (gold_ax, proxy_ax):
        ax.set_xlabel("sqrt(KL to SFT)  (nats per sequence)")
        ax.grid(alpha=0.3)
    gold_ax.legend(fontsize=7)
    fig.suptitle("Over-optimisation: proxy vs gold along PPO and best-of-n, per RM's data")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
