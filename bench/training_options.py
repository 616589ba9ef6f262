"""SFT on the builtin task with each training option: held-out NLL and wall time.

    python bench/training_options.py              # 8 variants, ~6 min on 2 CPU cores
    python bench/training_options.py --steps 40   # a ~2 min smoke run

Each variant is the SFT stage as a pipeline runs it (a fresh run directory, builtin:tiny,
4000 builtin:sft rows, batch 16, ``--steps`` steps, lr 3e-3 for adapters and 1e-3 for full
fine-tuning); the early-stopping variant may train 4x the steps and stops itself. Columns:
``nll_base`` and ``nll`` (held-out NLL per token on 256 test rows before and after),
``steps`` (trained), ``best_step`` (early stopping), ``wall_s``. One seed: differences of
~0.01 are within run-to-run noise. The README's "Training options" table is one run of it.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

from rich.console import Console

from alignkit.config import validate_pipeline
from alignkit.pipeline import run_pipeline
from alignkit.stages import REGISTRY, stage_kinds

LORA = {"type": "lora", "r": 8, "alpha": 16}
VARIANTS = {  # name -> (adapter, learning rate, stage fields, step multiplier)
    "lora r8": (LORA, 3e-3, {}, 1),
    "lora r8 + loraplus 16": ({**LORA, "loraplus_ratio": 16}, 3e-3, {}, 1),
    "lora r8 pissa": ({**LORA, "init_lora_weights": "pissa"}, 3e-3, {}, 1),
    "lora r8 olora": ({**LORA, "init_lora_weights": "olora"}, 3e-3, {}, 1),
    "adalora r8 (init 12)": ({"type": "adalora", "r": 8, "alpha": 16}, 3e-3, {}, 1),
    "full": ({"type": "full"}, 1e-3, {}, 1),
    "full + layerwise (decay 0.5, emb 1e-4)":
        ({"type": "full"}, 1e-3, {"layerwise_lr": {"decay": 0.5, "embeddings": 1e-4}}, 1),
    "lora r8, 4x steps, early stopping":
        (LORA, 3e-3, {"early_stopping": {"every": 50, "patience": 2, "min_delta": 0.005}}, 4),
}  # fmt: skip


def pipeline(run_dir: Path, adapter: dict, lr: float, steps: int, fields: dict) -> dict:
    train = {"max_steps": steps, "per_device_train_batch_size": 16, "learning_rate": lr,
             "logging_steps": 25}  # fmt: skip
    if "early_stopping" not in fields:
        train["save_steps"] = steps  # no checkpoints mid-run: they would only cost time
    stage = {"name": "sft", "kind": "sft", "max_length": 96, "heldout": {"enabled": False},
             "data": {"source": "builtin:sft", "split": "train", "eval_split": "test",
                      "max_rows": 4000, "max_eval_rows": 256},
             "train": train, **fields}  # fmt: skip
    return {"run": {"name": "bench", "seed": 0}, "model": {"name": "builtin:tiny"},
            "adapter": adapter, "stages": [stage]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--csv", type=Path, default=Path("runs/bench/training_options.csv"))
    args = parser.parse_args()
    rows = []
    for name, (adapter, lr, fields, times) in VARIANTS.items():
        with tempfile.TemporaryDirectory() as tmp:
            raw = pipeline(Path(tmp), adapter, lr, args.steps * times, fields)
            started = time.time()
            run_pipeline(validate_pipeline(raw, stage_kinds()), REGISTRY, tmp, Console(quiet=True))
            record = json.loads((Path(tmp) / "sft" / "stage.json").read_text())
        metrics, stopped = record["metrics"], record.get("early_stopping") or {}
        rows.append({
            "variant": name, "nll_base": round(metrics["heldout_nll_base"], 3),
            "nll": round(metrics["heldout_nll"], 3), "steps": int(metrics["global_step"]),
            "best_step": stopped.get("best_step", ""), "wall_s": round(time.time() - started),
        })  # fmt: skip
        print(" | ".join(str(v) for v in rows[-1].values()), flush=True)
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with args.csv.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
