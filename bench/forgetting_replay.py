"""Forgetting and replay on the builtin task: what SFT and DPO cost the model's general text, and
what replaying pretraining text during SFT buys back, at what price in gold.

The quickstart's ``sft`` and ``dpo`` stages (DPO from SFT), run once per replay fraction: SFT
mixes ``builtin:pretraining`` (the very texts builtin:tiny was pretrained on) into its batches at
that fraction (0: no replay), for the same number of steps, so replay rows take the place of task
rows. Every stage records forgetting: NLL per token of 256 held-out pretraining-style texts under
the policy it started from and the one it trained. Held-out gold: 256 test prompts x 2 samples.

    python bench/forgetting_replay.py                       # ~15 min on 2 CPU cores
    python bench/forgetting_replay.py --fractions 0 0.2

Finished stages are skipped when the run directories are reused. Writes
``forgetting_replay.csv`` into ``--out`` (default ``bench/``) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = {"num_prompts": 256, "samples_per_prompt": 2}


def pipeline(fraction: float, seed: int) -> dict:
    """The quickstart's sft and dpo stages; SFT replays pretraining text at ``fraction``."""
    base = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    by_name = {s["name"]: s for s in base["stages"]}
    sft, dpo = by_name["sft"], by_name["dpo"]
    for stage in (sft, dpo):
        stage["heldout"] = dict(HELDOUT)
    if fraction > 0:
        sft["replay"] = {"source": "builtin:pretraining", "fraction": fraction}
    return {"run": {"name": f"replay-{fraction:g}", "seed": seed}, "model": base["model"],
            "adapter": base["adapter"], "stages": [sft, dpo]}  # fmt: skip


def row(run_dir: Path, fraction: float) -> dict:
    stages = {
        s: json.loads((run_dir / s / "stage.json").read_text())["metrics"] for s in ("sft", "dpo")
    }
    sft, dpo = stages["sft"], stages["dpo"]
    return {
        "replay": fraction,
        "base_nll": sft["forgetting_nll_before"],
        "sft_nll": sft["forgetting_nll_after"],
        "dpo_nll": dpo["forgetting_nll_after"],
        "sft_task_nll": sft["heldout_nll"],
        "sft_gold": sft["gold_reward"],
        "dpo_gold": dpo["gold_reward"],
        "dpo_gain": dpo["gold_reward"] - dpo["gold_reward_ref"],
        "dpo_gain_ci": f"[{dpo['gold_reward_gain_ci_low']:+.3f}, {dpo['gold_reward_gain_ci_high']:+.3f}]",
        "dpo_kl": dpo["kl_ref"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.1, 0.3])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "forgetting")
    ap.add_argument("--out", type=Path, default=ROOT / "bench")
    args = ap.parse_args()

    from _common import write_csv  # beside this script
    from rich.console import Console

    from alignkit.config import validate_pipeline
    from alignkit.pipeline import run_pipeline
    from alignkit.stages import REGISTRY, stage_kinds

    t0 = time.time()
    rows = []
    for fraction in args.fractions:
        cfg = validate_pipeline(pipeline(fraction, args.seed), stage_kinds(), where="forgetting")
        run_dir = args.run_dir / f"replay-{fraction:g}"
        run_pipeline(cfg, REGISTRY, run_dir, Console(stderr=True))
        rows.append(row(run_dir, fraction))
    write_csv(args.out / "forgetting_replay.csv", rows)
    print_table(rows)
    print(
        f"\n{time.time() - t0:.0f} s; wrote {args.out / 'forgetting_replay.csv'}", file=sys.stderr
    )


def print_table(rows: list[dict]) -> None:
    print("| SFT replay | general-text NLL: base -> SFT -> DPO | SFT task NLL | held-out gold: "
          "SFT / DPO | DPO gain over SFT [95% CI] | DPO KL |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['replay']:g} | {r['base_nll']:.3f} -> {r['sft_nll']:.3f} -> {r['dpo_nll']:.3f} "
              f"| {r['sft_task_nll']:.3f} | {r['sft_gold']:+.3f} / {r['dpo_gold']:+.3f} "
              f"| {r['dpo_gain']:+.3f} {r['dpo_gain_ci']} | {r['dpo_kl']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
