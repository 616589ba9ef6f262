"""Our PPO against TRL's PPO trainer (TRL 1.12.0, ``trl.experimental.ppo``: the last release that
shipped one; 1.13 removed it), side by side on the builtin task.

Both start from the same SFT stage and train on the same reward-model stage (never the gold
reward), on builtin:prompts, with the same batch, response length, steps, PPO epochs and
minibatches, learning rates and KL coefficient, LoRA on the policy; each trains in a fresh
process. Then one evaluation, in one process, samples both trained policies and the SFT policy
on the same held-out prompts with the same seed and scores them with the builtin gold reward
(and the RM). Writes ``bench/ppo_vs_trl.csv`` and prints the table.

    python bench/ppo_vs_trl.py                      # 40 steps: ~15 min on 2 busy CPU cores
    python bench/ppo_vs_trl.py --steps 5 --eval-prompts 16   # a smoke run
    python bench/ppo_vs_trl.py --run-dir runs/quickstart     # reuse its sft + reward_model

TRL 1.12 runs from its own virtual environment (``bench/.venv-trl112``, created on first use:
``python -m venv --system-site-packages`` + ``pip install --no-deps trl==1.12.0``), so the
project's own TRL pin stays; torch, transformers and peft are the project's. Steps per side
(``ours`` / ``trl`` / ``eval``) run as ``--one SIDE`` children.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
TRL_VERSION = "1.12.0"
DEFAULT_VENV = BENCH / ".venv-trl112"
DEFAULT_OUT = ROOT / "runs" / "bench" / "ppo_vs_trl"
SFT, RM = "sft", "reward_model"
COLUMNS = [
    "trainer", "steps", "s_per_step", "gen_s", "score_s", "update_s", "gc_s", "peak_mib", "memory",
    "gold_policy", "gold_sft", "gold_gain", "gold_gain_ci", "rm_gain", "kl_to_sft",
    "train_s", "vs_ours_time",
]  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=40, help="PPO steps, each side")
    ap.add_argument("--batch", type=int, default=64, help="prompts per step (one sample each)")
    ap.add_argument("--minibatches", type=int, default=4)
    ap.add_argument("--ppo-epochs", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--lr", type=float, default=3e-4, help="policy LoRA learning rate")
    ap.add_argument("--value-lr", type=float, default=1e-3, help="value model learning rate")
    ap.add_argument("--kl-coef", type=float, default=0.05, help="fixed per-token KL coefficient")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-prompts", type=int, default=128, help="held-out prompts")
    ap.add_argument("--eval-samples", type=int, default=2, help="samples per held-out prompt")
    ap.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="a run with finished sft and reward_model stages (default: build them, the "
        f"quickstart's, in {DEFAULT_OUT.relative_to(ROOT)}/stages)",
    )
    ap.add_argument("--sft", default=SFT, help="SFT stage name in --run-dir")
    ap.add_argument("--reward-model", default=RM, help="reward_model stage name in --run-dir")
    ap.add_argument(
        "--threads", type=int, default=0, help="OMP_NUM_THREADS of every child (0: inherited)"
    )
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="TRL 1.12's environment")
    ap.add_argument("--trl-raw-scores", action="store_true", help="TRL sees unnormalised RM scores")
    ap.add_argument("--only", choices=["ours", "trl"], default=None, help="train one side only")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="work directory")
    ap.add_argument("--csv", type=Path, default=BENCH / "ppo_vs_trl.csv")
    ap.add_argument("--one", choices=["stages", "ours", "merge", "eval"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for name in ("steps", "batch", "minibatches", "ppo_epochs", "max_new_tokens", "eval_prompts"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive")
    if args.batch % args.minibatches:
        ap.error(f"--batch {args.batch} must be divisible by --minibatches {args.minibatches}")
    return args


def settings(args: argparse.Namespace) -> dict:
    """What both trainers are given (written to ``settings.json`` for the children)."""
    return {
        "steps": args.steps,
        "prompts_per_step": args.batch,
        "minibatches": args.minibatches,
        "ppo_epochs": args.ppo_epochs,
        "max_new_tokens": args.max_new_tokens,
        "learning_rate": args.lr,
        "value_learning_rate": args.value_lr,
        "kl_coef": args.kl_coef,
        "seed": args.seed,
        "adapter": {"type": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"},
    }


# --- the driver --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.one:
        return run_one(args)
    args.out.mkdir(parents=True, exist_ok=True)
    s = settings(args)
    (args.out / "settings.json").write_text(json.dumps(s, indent=1))
    t0 = time.time()
    if args.run_dir is None:
        _child(args, "stages")
    results: dict[str, dict] = {}
    if args.only in (None, "ours"):
        results["ours"] = _child(args, "ours")
    if args.only in (None, "trl"):
        results["trl"] = run_trl(args)
    if any("error" not in r for r in results.values()):
        evals = _child(args, "eval")
        for side, r in results.items():
            r.update(evals.get(side, {}))
    rows = [table_row(side, r) for side, r in results.items()]
    add_ratios(rows)
    report(rows, args.csv)
    for side, r in results.items():
        if "error" in r:
            print(f"{side}: did not run: {r['error']}")
    if "trl" in results and args.trl_raw_scores:
        print("trl: trained on the RM's raw scores (ours normalises them: not the same reward)")
    print(f"{time.time() - t0:.0f} s in all; work directory {args.out}")


def _child(args, one: str) -> dict:
    """Run ``--one ONE`` in a fresh process; its ``RESULT {json}`` line."""
    return _run(
        [sys.executable, str(Path(__file__)), *_argv_of(args), "--one", one], one, args.threads
    )


def _argv_of(args) -> list[str]:
    out = []
    for key in ("steps", "batch", "minibatches", "ppo_epochs", "max_new_tokens", "lr",
                "value_lr", "kl_coef", "seed", "eval_prompts", "eval_samples", "sft",
                "reward_model", "out"):  # fmt: skip
        out += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    return out + (["--run-dir", str(args.run_dir)] if args.run_dir else [])


def _run(cmd: list[str], what: str, threads: int = 0, fatal: bool = True) -> dict:
    """``cmd``'s ``RESULT {json}``; on failure exit with its output's tail, or (``fatal``
    false) print the tail and return ``{"error": its last line}`` for the table."""
    env = os.environ | ({"OMP_NUM_THREADS": str(threads)} if threads > 0 else {})
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode == 0 and lines:
        return json.loads(lines[-1].removeprefix("RESULT "))
    tail = (done.stderr or done.stdout).strip()
    message = f"{what} failed (exit {done.returncode}):\n{tail[-4000:]}"
    if fatal:
        sys.exit(message)
    print(message, file=sys.stderr)
    return {"error": (tail.splitlines() or ["no output"])[-1]}


def run_trl(args) -> dict:
    """TRL's side: its venv (built if absent), the merged SFT and RM, then its trainer. A venv
    that cannot be built, or a trainer that fails on this stack, is reported in the table (and
    its traceback printed), not raised."""
    python = args.venv / "bin" / "python"
    reason = ensure_trl_venv(args.venv)
    if reason:
        return {"error": reason}
    _child(args, "merge")
    ours = args.out / "ours" / "ppo" / "metrics.jsonl"
    s = json.loads((args.out / "settings.json").read_text())
    s.update(first_batch_statistics(ours, args))
    (args.out / "trl_settings.json").write_text(json.dumps(s, indent=1))
    out = args.out / "trl"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cmd = [str(python), str(BENCH / "_trl_ppo.py"), "--inputs", str(args.out / "inputs"),
           "--settings", str(args.out / "trl_settings.json"), "--out", str(out)]  # fmt: skip
    cmd += ["--raw-scores"] if args.trl_raw_scores else []
    result = _run(cmd, f"TRL {TRL_VERSION}'s trainer", args.threads, fatal=False)
    if "error" in result:
        return result
    result["peak_mib"] = result.get("peak_cuda_mib", result["peak_rss_mib"])
    return result


def ensure_trl_venv(venv: Path) -> str | None:
    """Create ``venv`` with TRL 1.12.0 if it lacks it; ``None`` when ready, else why not."""
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import trl, sys; sys.exit(trl.__version__ != sys.argv[1])"]
    if (
        python.exists()
        and subprocess.run([*check, TRL_VERSION], capture_output=True).returncode == 0
    ):
        return None
    steps = [
        [sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
        [str(python), "-m", "pip", "install", "--quiet", "--no-deps", f"trl=={TRL_VERSION}"],
    ]
    for cmd in steps:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            return (
                f"could not build TRL {TRL_VERSION}'s venv ({' '.join(cmd[:4])}): "
                + (done.stderr.strip().splitlines() or ["no output"])[-1]
            )
    return None


def first_batch_statistics(metrics: Path, args) -> dict:
    """Mean and std (population) of the RM's raw scores on the SFT policy's first batch, as our
    PPO normalised them; without our run (``--only trl``), TRL gets raw scores."""
    if not metrics.exists():
        args.trl_raw_scores = True
        return {}
    first = json.loads(metrics.read_text().splitlines()[0])
    n = args.batch
    return {
        "score_mean": first["score_mean"],
        "score_std": first["score_std"] * ((n - 1) / n) ** 0.5,
    }


# --- the children ------------------------------------------------------------------------------


def run_one(args) -> None:
    result = {"stages": build_stages, "ours": train_ours, "merge": merge_inputs,
              "eval": evaluate}[args.one](args)  # fmt: skip
    print("RESULT " + json.dumps(result))


def stage_dirs(args) -> tuple[Path, Path]:
    run = args.run_dir or args.out / "stages"
    return run / args.sft, run / args.reward_model


def build_stages(args) -> dict:
    """The quickstart's sft, onpolicy and reward_model stages (a finished run is reused)."""
    import yaml
    from rich.console import Console

    from alignkit.config import validate_pipeline
    from alignkit.pipeline import run_pipeline
    from alignkit.stages import REGISTRY, stage_kinds

    quick = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    by_name = {s["name"]: s for s in quick["stages"]}
    raw = {"run": {"name": "ppo_vs_trl", "seed": args.seed}, "model": quick["model"],
           "adapter": quick["adapter"], "stages": [by_name[n] for n in (SFT, "onpolicy", RM)]}  # fmt: skip
    cfg = validate_pipeline(raw, stage_kinds(), where="ppo_vs_trl")
    run_pipeline(cfg, REGISTRY, args.out / "stages", Console(stderr=True))
    return {}


def ours_config(s: dict) -> dict:
    """Our PPO stage for the settings ``s``: a fixed KL coefficient (TRL has no adaptive one),
    one checkpoint at the end, no health probes or held-out evaluation inside the timed run."""
    return {
        "kind": "ppo", "name": "ppo", "from": SFT, "reward_model": RM,
        "data": {"source": "builtin:prompts", "split": "train"},
        "steps": s["steps"], "prompts_per_step": s["prompts_per_step"],
        "minibatches": s["minibatches"], "ppo_epochs": s["ppo_epochs"],
        "max_new_tokens": s["max_new_tokens"], "learning_rate": s["learning_rate"],
        "value_learning_rate": s["value_learning_rate"], "kl_coef": s["kl_coef"],
        "adaptive_kl": False, "checkpoint_every": s["steps"],
        "health": {"enabled": False}, "heldout": {"enabled": False},
    }  # fmt: skip


def train_ours(args) -> dict:
    """Our PPO stage on the SFT and RM stages (linked into ``<out>/ours`` as its run)."""
    import torch  # the children import the heavy libraries; the driver stays light
    from rich.console import Console

    from alignkit.config import AdapterSpec
    from alignkit.handoff import StageOutput
    from alignkit.pipeline import StageContext
    from alignkit.stages import ppo

    s = json.loads((args.out / "settings.json").read_text())
    run = args.out / "ours"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    sft_dir, rm_dir = stage_dirs(args)
    for name, target in ((SFT, sft_dir), (RM, rm_dir)):
        if StageOutput.read(target) is None:
            sys.exit(f"--run-dir: no finished stage {target.name!r} in {target.parent}")
        (run / name).symlink_to(target.resolve(), target_is_directory=True)
    cfg = ppo.PPOStageConfig.model_validate(ours_config(s))
    parent = StageOutput.read(run / SFT)
    (run / "ppo").mkdir()
    ctx = StageContext(
        name="ppo", model=parent.base, adapter=AdapterSpec(**s["adapter"]), seed=s["seed"],
        out_dir=run / "ppo", parent=parent, resume_from=None, console=Console(stderr=True),
    )  # fmt: skip
    t0 = time.time()
    ppo.run(cfg, ctx)
    train_seconds = time.time() - t0
    steps = [json.loads(x) for x in ctx.metrics_path.read_text().splitlines()]
    for st in steps:
        st["update_seconds"] = st["step_seconds"] - st["gen_seconds"] - st["score_seconds"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**20
    return {"train_seconds": train_seconds, "steps": steps, "peak_mib": peak}


def merge_inputs(args) -> dict:
    """TRL's inputs: the SFT stage and the RM stage (adapter + score head) merged into full
    models (``alignkit merge``)."""
    from alignkit.models import merge_stage

    inputs = args.out / "inputs"
    shutil.rmtree(inputs, ignore_errors=True)
    inputs.mkdir(parents=True)
    sft_dir, rm_dir = stage_dirs(args)
    merge_stage(sft_dir, inputs / "sft_merged")
    merge_stage(rm_dir, inputs / "rm_merged")
    return {}


def evaluate(args) -> dict:
    """Both trained policies and the SFT policy, sampled on the same held-out prompts with the
    same seed (``eval.heldout.evaluate_policy``), scored by the gold reward and the RM."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from alignkit.config import HeldoutSpec
    from alignkit.eval.heldout import evaluate_policy
    from alignkit.handoff import AdapterView, StageOutput
    from alignkit.models import load_adapter, load_base, load_stage_model, load_tokenizer

    sft_dir, rm_dir = stage_dirs(args)
    spec = StageOutput.read(sft_dir).base
    reference, tokenizer = load_stage_model(sft_dir, spec)
    held = HeldoutSpec(
        prompts="builtin:prompts", num_prompts=args.eval_prompts,
        samples_per_prompt=args.eval_samples, max_new_tokens=args.max_new_tokens,
        rewards=[str(rm_dir)],
    )  # fmt: skip
    policies = {}
    if (args.out / "ours" / "ppo" / "adapter").is_dir():
        base = load_base(spec, load_tokenizer(sft_dir, spec))
        policies["ours"] = load_adapter(base, args.out / "ours" / "ppo" / "adapter", False)
    if (args.out / "trl" / "adapter").is_dir():
        merged = AutoModelForCausalLM.from_pretrained(str(args.out / "inputs" / "sft_merged"))
        trl = PeftModel.from_pretrained(merged, str(args.out / "trl" / "adapter"))
        policies["trl"] = trl.merge_and_unload()
    out = {}
    for side, model in policies.items():
        m = evaluate_policy(
            AdapterView(model.eval()), AdapterView(reference.eval()), tokenizer, held,
            has_gold=True,
        )  # fmt: skip
        out[side] = {f"eval_{k}": v for k, v in m.items()}
    return out


# --- the table ---------------------------------------------------------------------------------


def table_row(side: str, r: dict) -> dict:
    """One side's row: per-step means over steps 2.. (step 1 includes one-off set-up)."""
    name = "ours" if side == "ours" else f"trl {TRL_VERSION}"
    row = {c: "" for c in COLUMNS} | {"trainer": name}
    if "error" in r:
        return row | {"s_per_step": "did not run"}
    steps = r["steps"][1:] or r["steps"]

    def mean(key: str) -> float:
        return statistics.fmean(st.get(key, 0.0) for st in steps)

    row.update(
        steps=len(r["steps"]),
        s_per_step=round(mean("step_seconds"), 3),
        gen_s=round(mean("gen_seconds"), 3),
        score_s=round(mean("score_seconds"), 3),
        update_s=round(mean("update_seconds"), 3),
        gc_s=round(mean("gc_seconds"), 3),
        peak_mib=round(r["peak_mib"]),
        train_s=round(r["train_seconds"], 1),
    )
    if "eval_gold_reward" in r:
        gold, ref = r["eval_gold_reward"], r["eval_gold_reward_ref"]
        low, high = r["eval_gold_reward_gain_ci_low"], r["eval_gold_reward_gain_ci_high"]
        row.update(
            gold_policy=round(gold, 3),
            gold_sft=round(ref, 3),
            gold_gain=round(gold - ref, 3),
            gold_gain_ci=f"[{low:+.3f}, {high:+.3f}]",
            rm_gain=round(r["eval_reward"] - r["eval_reward_ref"], 3),
            kl_to_sft=round(r["eval_kl_ref"], 2),
        )
    return row


def add_ratios(rows: list[dict]) -> None:
    """``memory`` and ``vs_ours_time``: each row over ours (x)."""
    ours = next((r for r in rows if r["trainer"] == "ours" and r["peak_mib"] != ""), None)
    for r in rows:
        if ours is None or r["peak_mib"] == "":
            continue
        r["memory"] = f"{r['peak_mib'] / ours['peak_mib']:.2f}x"
        r["vs_ours_time"] = f"{r['s_per_step'] / ours['s_per_step']:.2f}x"


def report(rows: list[dict], path: Path) -> None:
    """Print the table and write the CSV (``_common.report``)."""
    sys.path.insert(0, str(BENCH))
    from _common import report as write

    os.environ.setdefault("COLUMNS", "200")
    write("PPO: ours vs TRL's PPO trainer", COLUMNS, rows, path)


if __name__ == "__main__":
    main()
