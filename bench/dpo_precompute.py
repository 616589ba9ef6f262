"""DPO step time with the reference's log-probs computed at every step vs precomputed once.

    python bench/dpo_precompute.py                  # builtin:tiny, 2048 builtin:preference pairs, ~1-2 min
    python bench/dpo_precompute.py --quick          # 128 pairs: a ~20 s smoke test
    python bench/dpo_precompute.py --epochs 3       # the live reference forward repeats per epoch
    python bench/dpo_precompute.py --shape small    # random-init 40M Qwen2: compute, not Python

What runs is the DPO stage's trainer: ``stages.dpo.build_trainer`` on a ``DPOStageConfig`` with
``precompute_ref_log_probs`` off (``live``), then on (``precomputed``), each in a fresh process,
one epoch over the same pairs. The stage without a parent: the policy is a new LoRA (r16, every
linear layer) on the base and TRL adds a frozen "ref" copy of it (zero-initialised, so it
computes the base); the reference forward runs the same adapter-carrying model as it would
after an SFT stage, so the cost is the stage's. ``live``: every step runs the policy forward
and backward plus a no-grad reference forward on the ``ref`` adapter. ``precomputed``: TRL runs
one reference pass over the whole train set inside the trainer's constructor (batches of
``precompute_ref_batch_size``, default the train batch size) and the steps read the stored
log-probs. The cached result lives in a temporary directory of the in-memory dataset, so a
fresh process always recomputes it.

Columns: ``steps``; ``precompute_s`` (the one-off reference pass, timed around TRL's
``_precompute_ref_logps``); ``train_s`` (wall time of ``trainer.train()``); ``step_ms``
(train_s / steps); ``total_s`` (precompute_s + train_s); ``step_speedup`` and
``total_speedup`` (live / this row); ``peak_mib`` (CPU: peak RSS of the process; CUDA: torch
peak allocated over precompute and training). With one epoch the precompute pass runs the same
reference forwards the live steps would, so the total gain is small; with ``--epochs N`` the
live run repeats them every epoch while the pass runs once.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from _common import add_common_args, model_spec, passthrough, report, run_modes

COLUMNS = ["mode", "shape", "device", "pairs", "batch", "epochs", "steps", "precompute_s",
           "train_s", "step_ms", "total_s", "step_speedup", "total_speedup", "peak_mib"]  # fmt: skip


def measure(args, mode: str) -> dict:
    """Build the stage's DPO trainer (precomputing or not) and train, in this process."""
    import torch
    from rich.console import Console
    from trl import DPOTrainer

    from alignkit.config import AdapterSpec, DataSpec
    from alignkit.pipeline import StageContext
    from alignkit.stages.dpo import DPOStageConfig, build_trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    # TRL precomputes inside DPOTrainer.__init__: time that pass by wrapping it (this process only)
    precompute_s: list[float] = []
    original = DPOTrainer._precompute_ref_logps

    def timed(self, *a, **kw):
        started = time.perf_counter()
        out = original(self, *a, **kw)
        precompute_s.append(time.perf_counter() - started)
        return out

    DPOTrainer._precompute_ref_logps = timed

    cfg = DPOStageConfig(
        name="dpo",
        data=DataSpec(source="builtin:preference", eval_size=0, max_rows=args.pairs),
        precompute_ref_log_probs=mode == "precomputed",
        max_length=args.max_length,
        train={
            "per_device_train_batch_size": args.batch,
            "num_train_epochs": args.epochs,
            "save_strategy": "no",
            "disable_tqdm": True,
            "learning_rate": 1e-4,
        },
    )
    ctx = StageContext(
        name="dpo",
        model=model_spec(args.shape, args.attn),
        adapter=AdapterSpec(),
        seed=0,
        out_dir=Path(tempfile.mkdtemp(prefix="dpo-precompute-")),
        parent=None,
        resume_from=None,
        console=Console(quiet=True),
    )
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer, _, _, n_pairs, _ = build_trainer(cfg, ctx)
    if (mode == "precomputed") != bool(precompute_s):
        raise RuntimeError(f"{mode}: TRL ran {len(precompute_s)} precompute passes")
    started = time.perf_counter()
    trainer.train()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    steps = trainer.state.global_step
    return {
        "mode": mode,
        "shape": args.shape,
        "device": torch.cuda.get_device_name() if cuda else f"cpu x{torch.get_num_threads()}",
        "pairs": n_pairs,
        "batch": args.batch,
        "epochs": args.epochs,
        "steps": steps,
        "precompute_s": round(sum(precompute_s), 2),
        "train_s": round(seconds, 2),
        "step_ms": round(1000 * seconds / steps, 1),
        "total_s": round(sum(precompute_s) + seconds, 2),
        "peak_mib": round(peak),
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(p, "128 pairs: a ~20 s smoke test")
    p.add_argument("--pairs", type=int, default=2048, help="builtin:preference training pairs")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--one", choices=["live", "precomputed"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.pairs = 128
    if args.one:  # child process: one mode, print JSON
        print("RESULT " + json.dumps(measure(args, args.one)), flush=True)
        return

    rows = run_modes(__file__, ("live", "precomputed"), passthrough(args, ("pairs", "epochs")))
    live, pre = rows
    for r in rows:
        r["step_speedup"] = round(live["step_ms"] / r["step_ms"], 2)
        r["total_speedup"] = round(live["total_s"] / r["total_s"], 2)
    report(
        f"DPO reference log-probs: live vs precomputed, {args.shape}",
        COLUMNS,
        rows,
        args.csv or Path(__file__).with_suffix(".csv"),
    )
    print(
        f"precomputed / live: {pre['step_speedup']:.2f}x faster steps, "
        f"{pre['total_speedup']:.2f}x faster in total (precompute pass {pre['precompute_s']:.1f} s "
        f"= {pre['precompute_s'] / pre['train_s']:.0%} of its training time)"
    )


if __name__ == "__main__":
    main()
