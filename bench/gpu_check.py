"""One GPU check, ready to run on a machine with one CUDA GPU and no hub access (≤ 10 minutes).

    python bench/gpu_check.py --out gpu_results.json          # on the GPU machine
    python bench/gpu_check.py --dry-run --out /tmp/dry.json   # anywhere: the CPU smoke form

Steps, each in its own process with a share of the time budget, results gathered in one JSON
(the README's GPU tables are filled from it):

1. ``tests``: the ``gpu``- and ``vllm``-marked tests (dry run: only collected).
2. ``rollouts``: ``bench/rollout_throughput.py``: HF vs vLLM tokens/s on 256 prompts × 256
   tokens, LoRA served as an adapter vs merged (its CSV rows).
3. ``ppo_memory``: ``bench/ppo_memory.py``: peak memory of one SFT step vs one PPO step.
4. ``qlora_sft``: the SFT stage on Qwen2.5-0.5B's shape (random weights, builtin tokenizer),
   4-bit base, LoRA r=16: training tokens/s and model FLOPs utilisation (6·N·tokens/s over the
   GPU's dense bf16 peak).
5. ``ppo_vllm``: SFT → RM → PPO with ``rollout.engine: vllm`` for 5 steps on that shape:
   seconds per step (generation / update) and the adapter hand-off to vLLM included.

``--dry-run`` runs the same steps in their CPU form (builtin:tiny or the small shape, a few
steps, the HF engine, no quantization) so the plumbing — arguments, model building, the
pipelines, result parsing and writing — is exercised in CI; vLLM-only parts say why they were
skipped. Nothing here downloads anything.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: dense bf16 peak FLOP/s by device name fragment, for MFU
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}
STEPS = ("tests", "rollouts", "ppo_memory", "qlora_sft", "ppo_vllm")
BUDGET = {"tests": 0.25, "rollouts": 0.2, "ppo_memory": 0.15, "qlora_sft": 0.15, "ppo_vllm": 0.25}


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=Path("gpu_results.json"))
    ap.add_argument("--dry-run", action="store_true", help="the CPU smoke form of every step")
    ap.add_argument("--minutes", type=float, default=10.0, help="time budget for all steps")
    ap.add_argument("--only", nargs="*", choices=STEPS, help="run only these steps")
    ap.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)  # one step, in a child
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.step:
        result = STEP_FUNCS[args.step](args.work, args.dry_run)
        (args.work / f"{args.step}.json").write_text(json.dumps(result, default=str))
        return 0
    results = run_all(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(summary(results))
    print(f"results: {args.out}")
    return 0 if all(s["status"] != "failed" for s in results["steps"].values()) else 1


def run_all(args) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    out = {"device": device, "dry_run": args.dry_run, "torch": torch.__version__,
           "vllm": _version("vllm"), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "steps": {}}  # fmt: skip
    if not cuda and not args.dry_run:
        out["steps"] = {
            s: {"status": "skipped", "why": "no CUDA GPU; use --dry-run"} for s in STEPS
        }
        return out
    deadline = time.time() + args.minutes * 60
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only or STEPS:
            left = deadline - time.time()
            share = min(left, max(30.0, args.minutes * 60 * BUDGET[name]))
            if left < 20:
                out["steps"][name] = {"status": "skipped", "why": "time budget spent"}
                continue
            out["steps"][name] = _child(name, Path(tmp), args.dry_run, share)
    return out


def _child(name: str, work: Path, dry: bool, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--step", name, "--work", str(work)] + (["--dry-run"] * dry)
    start = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "why": f"over its {timeout:.0f} s share of the budget"}
    seconds = round(time.time() - start, 1)
    path = work / f"{name}.json"
    if proc.returncode != 0 or not path.exists():
        return {"status": "failed", "seconds": seconds, "why": proc.stderr[-2000:]}
    return {"seconds": seconds, **json.loads(path.read_text())}


# --- the steps --------------------------------------------------------------------------------


def step_tests(work: Path, dry: bool) -> dict:
    marks = "gpu or vllm"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marks, "tests"]
    if dry:
        cmd.append("--collect-only")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", last)}
    if collected := re.search(r"(\d+)/\d+ tests? collected|(\d+) tests? collected", last):
        counts["collected"] = int(collected.group(1) or collected.group(2))
    ok = proc.returncode in (0, 5)  # 5: nothing collected
    return {"status": "ok" if ok else "failed", "summary": last, "counts": counts}


def step_rollouts(work: Path, dry: bool) -> dict:
    csv_path = work / "rollouts.csv"
    cmd = [sys.executable, "bench/rollout_throughput.py", "--csv", str(csv_path)]
    if dry:
        cmd += ["--models", "tiny", "--prompts", "4", "--new-tokens", "8", "--batch-size", "4"]
    else:
        cmd += ["--prompts", "256", "--new-tokens", "256"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        return {"status": "failed", "why": proc.stderr[-2000:]}
    return {"status": "ok", "rows": _csv_rows(csv_path)}


def step_ppo_memory(work: Path, dry: bool) -> dict:
    csv_path = work / "ppo_memory.csv"
    cmd = [sys.executable, "bench/ppo_memory.py", "--csv", str(csv_path)]
    cmd += ["--shape", "tiny", "--batch", "1", "--seq", "16", "--runs", "1"] if dry else []
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        return {"status": "failed", "why": proc.stderr[-2000:]}
    return {"status": "ok", "rows": _csv_rows(csv_path)}


def step_qlora_sft(work: Path, dry: bool) -> dict:
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from _common import model_spec

    model = "builtin:tiny" if dry else model_spec("qwen2.5-0.5b", None).name
    steps, batch, length = (2, 4, 64) if dry else (30, 8, 512)
    stage = {"name": "sft", "kind": "sft", "max_length": length,
             "data": {"source": "builtin:sft", "max_rows": steps * batch},
             "heldout": {"enabled": False},
             "train": {"max_steps": steps, "per_device_train_batch_size": batch,
                       "learning_rate": 1e-4, "logging_steps": 1, "save_steps": 10_000,
                       "bf16": not dry}}  # fmt: skip
    raw = {"run": {"name": "gpu-check", "seed": 0},
           "model": {"name": model, "quantization": "none" if dry else "4bit"},
           "adapter": {"type": "lora", "r": 16, "alpha": 32}, "stages": [stage]}  # fmt: skip
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    metrics = _run_pipeline(raw, work / "sft-run")["sft"]
    tokens_per_s = metrics["num_tokens"] / metrics["train_runtime"]
    params = _parameters(model)
    peak = next((v for k, v in PEAK_FLOPS.items() if k in _device()), None)
    return {
        "status": "ok",
        "model": "builtin:tiny (dry run)" if dry else "Qwen2.5-0.5B shape, 4-bit base, LoRA r=16",
        "steps": steps, "tokens_per_s": round(tokens_per_s, 1), "parameters": params,
        "mfu": round(6 * params * tokens_per_s / peak, 4) if peak else None,
        "peak_memory_gib": _peak_gib(),
    }  # fmt: skip


def step_ppo_vllm(work: Path, dry: bool) -> dict:
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from _common import model_spec

    engine = "vllm" if (torch.cuda.is_available() and _version("vllm")) else "hf"
    model = "builtin:tiny" if dry else model_spec("qwen2.5-0.5b", None).name
    train = {"max_steps": 2, "per_device_train_batch_size": 8, "learning_rate": 1e-4,
             "logging_steps": 1, "save_steps": 10_000}  # fmt: skip
    pref = {"source": "builtin:preference", "max_rows": 16, "eval_size": 0}
    raw = {"run": {"name": "gpu-check-ppo", "seed": 0}, "model": {"name": model},
           "adapter": {"type": "lora", "r": 16, "alpha": 32},
           "stages": [
               {"name": "sft", "kind": "sft", "max_length": 128, "train": train,
                "data": {"source": "builtin:sft", "max_rows": 16}, "heldout": {"enabled": False}},
               {"name": "rm", "kind": "reward_model", "max_length": 128, "train": train,
                "data": pref, "probe": False},
               {"name": "ppo", "kind": "ppo", "from": "sft", "reward_model": "rm",
                "data": {"source": "builtin:prompts", "max_rows": 256},
                "steps": 2 if dry else 5, "prompts_per_step": 8 if dry else 64,
                "max_new_tokens": 16 if dry else 128, "rollout": {"engine": engine},
                "heldout": {"enabled": False}, "health": {"enabled": False}},
           ]}  # fmt: skip
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    run_dir = work / "ppo-run"
    _run_pipeline(raw, run_dir)
    rows = [json.loads(x) for x in (run_dir / "ppo" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "step_seconds" in r]
    mean = lambda key: round(sum(r[key] for r in rows) / len(rows), 3)  # noqa: E731
    why = None if engine == "vllm" else "vLLM needs CUDA and the vllm extra: ran with hf"
    return {"status": "ok", "engine": engine, "why": why, "steps": len(rows),
            "step_seconds": mean("step_seconds"), "gen_seconds": mean("gen_seconds"),
            "gen_tokens_per_s": mean("gen_tokens_per_s"), "peak_memory_gib": _peak_gib()}  # fmt: skip


STEP_FUNCS = {"tests": step_tests, "rollouts": step_rollouts, "ppo_memory": step_ppo_memory,
              "qlora_sft": step_qlora_sft, "ppo_vllm": step_ppo_vllm}  # fmt: skip


# --- helpers ------------------------------------------------------------------------------------


def _run_pipeline(raw: dict, run_dir: Path) -> dict[str, dict]:
    from rich.console import Console

    from alignkit.config import validate_pipeline
    from alignkit.pipeline import run_pipeline
    from alignkit.rundir import RunDir
    from alignkit.stages import REGISTRY, stage_kinds

    cfg = validate_pipeline(raw, stage_kinds())
    run_pipeline(cfg, REGISTRY, run_dir, Console(quiet=True))
    rd = RunDir(run_dir)
    return {s.name: rd.stage_json(s.name)["metrics"] for s in cfg.stages}


def _parameters(model: str) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    from alignkit.builtin.tiny import ensure_tiny_model

    path = ensure_tiny_model() if model == "builtin:tiny" else model
    config = AutoConfig.from_pretrained(path)
    import torch

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


def _device() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def _peak_gib() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


def _csv_rows(path: Path) -> list[dict]:
    import csv

    with path.open() as f:
        return list(csv.DictReader(f))


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def summary(results: dict) -> str:
    lines = [f"device: {results['device']}  (dry run: {results['dry_run']})",
             "| step | status | seconds | key numbers |", "|---|---|---|---|"]  # fmt: skip
    for name, r in results["steps"].items():
        keys = {k: v for k, v in r.items() if k not in ("status", "seconds", "rows", "why")}
        note = r.get("why") if r["status"] != "ok" else None
        text = note.strip().splitlines()[-1][:80] if note else json.dumps(keys)[:120]
        lines.append(f"| {name} | {r['status']} | {r.get('seconds', '-')} | {text} |")
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
