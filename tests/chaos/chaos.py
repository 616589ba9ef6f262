"""Interrupt a pipeline at random, re-run it until it finishes, and compare it with a clean run.

Used by ``test_chaos.py`` and runnable on its own to print the summary the README quotes::

    python tests/chaos/chaos.py --kills 20 --seed 0

A *kill* starts ``alignkit run`` (which resumes whatever the previous attempt left), waits until
the targeted stage is under way, sleeps a random time and sends SIGKILL (to the process group,
like the OOM killer or a lost node), SIGTERM (to the process, like a scheduler's preemption) or
SIGINT (to the process group, like Ctrl-C). After the last kill the run is left to finish. The
fingerprint compares the parts of the run directory that must not depend on interruptions:
every adapter and head byte for byte, each stage's ``stage.json`` metrics, each logged metrics
row, PPO's samples and health log, and the rollout stage's preference pairs, leaving out only
wall-clock fields (runtimes, throughputs).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from pipeline import chaos_pipeline  # noqa: E402

SIGNALS = (signal.SIGKILL, signal.SIGTERM, signal.SIGINT)
WALL_CLOCK = re.compile(r"runtime|per_second|_seconds|tokens_per_s$")
HEADER = re.compile(r"(\S+) \(\w+\): (?:run|resume|rerun)\b")  # a stage starting, in the log
LOGS = ("metrics.jsonl", "samples.jsonl", "health.json", "preferences.jsonl")


@dataclass
class Kill:
    target: str
    signal: str
    delay: str  # when it was sent: after the stage's start, after a checkpoint, or a file
    hit: str | None  # the stage under way when the signal was sent, None if the run had ended
    returncode: int
    next_action: str | None = None  # what the next attempt did with the stage hit (resume, run)


def write_config(path: Path, run_dir: Path, **sizes) -> Path:
    path.write_text(yaml.safe_dump(chaos_pipeline(run_dir, **sizes)))
    return path


def alignkit_run(cfg: Path, log: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    return subprocess.Popen(
        [sys.executable, "-m", "alignkit", "run", str(cfg)],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=env,
        **kw,
    )


def stage_under_way(run_dir: Path) -> str | None:
    partial = sorted(run_dir.glob(".*.partial"))
    return partial[0].name[1 : -len(".partial")] if partial else None


def interrupt(proc: subprocess.Popen, sig: signal.Signals) -> None:
    if sig == signal.SIGTERM:
        proc.send_signal(sig)
    else:
        os.killpg(proc.pid, sig)


def kill_once(cfg: Path, run_dir: Path, targets: list[str], sig, when, log: Path) -> Kill:
    """One attempt, interrupted once it reaches the first of ``targets`` it runs (the scheduled
    stage, or a later one if that finished already), ``when`` being:

    - seconds: that long after the stage starts (often before its first checkpoint);
    - ``("checkpoint", seconds)``: that long after the stage writes a new checkpoint (a resume
      is then certain unless the stage finishes first); a rollout stage's shards are written
      continuously, so there it counts from the stage's start;
    - a path relative to the run directory: as soon as that file exists.
    """
    proc = alignkit_run(cfg, log)
    deadline = time.time() + 300
    started, seen = None, set()
    while proc.poll() is None and time.time() < deadline:
        if isinstance(when, str):
            if (run_dir / when).exists():
                break
        elif started is None:
            found = [m.group(1) for m in HEADER.finditer(log.read_text(errors="replace"))]
            started = next((name for name in found if name in targets), None)
            checkpoints = run_dir / f".{started}.partial" / "checkpoints"
            seen = set(checkpoints.glob("checkpoint-*"))
        elif not isinstance(when, tuple) or _new_checkpoint(run_dir, started, seen):
            time.sleep(when[1] if isinstance(when, tuple) else when)
            break
        time.sleep(0.02)
    hit = stage_under_way(run_dir) if proc.poll() is None else None
    if proc.poll() is None:
        interrupt(proc, sig)
    try:
        rc = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:  # a graceful signal that hangs is a failure, not a skip
        os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
    if isinstance(when, tuple):
        delay = f"{when[1]:.2f} after a checkpoint"
    else:
        delay = when if isinstance(when, str) else f"{when:.2f} after the start"
    return Kill(targets[0], sig.name, delay, hit, rc)


def _new_checkpoint(run_dir: Path, stage: str, seen: set) -> bool:
    partial = run_dir / f".{stage}.partial"
    if (partial / "rollouts").is_dir() or not partial.exists():  # rollout shards; or it ended
        return True
    return any(c not in seen for c in (partial / "checkpoints").glob("checkpoint-*/"))


def run_with_kills(cfg: Path, run_dir: Path, schedule, logs: Path) -> tuple[list[Kill], int]:
    """Kill per ``schedule`` ([(stage, signal, when)]), then run to the end; (kills, final rc)."""
    order = [s["name"] for s in yaml.safe_load(cfg.read_text())["stages"]]
    kills = []
    for i, (target, sig, when) in enumerate(schedule):
        targets = order[order.index(target) :]
        kills.append(kill_once(cfg, run_dir, targets, sig, when, logs / f"attempt-{i}.log"))
    final_log = logs / "final.log"
    final = alignkit_run(cfg, final_log).wait()
    texts = [(logs / f"attempt-{i}.log").read_text() for i in range(1, len(kills))]
    texts.append(final_log.read_text())
    for kill, after in zip(kills, texts, strict=True):
        found = kill.hit and re.search(rf"{re.escape(kill.hit)} \(\w+\): (\w+)", after)
        kill.next_action = found.group(1) if found else None
    return kills, final


def schedule(stages: list[str], kills: int, seed: int, max_delay: float):
    """``kills`` interruptions spread over ``stages`` in order, each with a random signal; every
    other one a random time into the stage, the rest a random time after a new checkpoint."""
    rng = random.Random(seed)
    per = [kills // len(stages) + (i < kills % len(stages)) for i in range(len(stages))]
    plan = []
    for stage, n in zip(stages, per, strict=True):
        for _ in range(n):
            delay = rng.uniform(0.0, max_delay)
            when = delay if len(plan) % 2 == 0 else ("checkpoint", delay / 2)
            plan.append((stage, rng.choice(SIGNALS), when))
    return plan


def _rows(path: Path) -> list:
    if path.suffix == ".json":
        return [json.loads(path.read_text())]
    return [json.loads(line) for line in path.read_text().splitlines()]


def _drop_wall_clock(value):
    if isinstance(value, dict):
        return {k: _drop_wall_clock(v) for k, v in value.items() if not WALL_CLOCK.search(k)}
    if isinstance(value, list):
        return [_drop_wall_clock(v) for v in value]
    return value


def fingerprint(run_dir: Path) -> dict:
    """What an interruption must not change, per stage: weights, metrics, logs."""
    out = {}
    for stage_json in sorted(run_dir.glob("*/stage.json")):
        stage = stage_json.parent
        record = json.loads(stage_json.read_text())
        weights = {
            str(f.relative_to(stage)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(stage.rglob("*.safetensors"))
        }
        logs = {
            name: _drop_wall_clock(_rows(stage / name)) for name in LOGS if (stage / name).exists()
        }
        if "preferences.jsonl" in logs:  # shards finish in any order after a resume
            logs["preferences.jsonl"] = sorted(logs["preferences.jsonl"], key=json.dumps)
        out[stage.name] = {
            "weights": weights,
            "metrics": _drop_wall_clock(record["metrics"]),
            "logs": logs,
        }
    return out


def differences(clean: dict, chaos: dict) -> list[str]:
    found = []
    for stage in sorted(set(clean) | set(chaos)):
        a, b = clean.get(stage), chaos.get(stage)
        if a is None or b is None:
            found.append(f"{stage}: only in the {'chaos' if a is None else 'clean'} run")
            continue
        for part in ("weights", "metrics", "logs"):
            for key in sorted(set(a[part]) | set(b[part])):
                if a[part].get(key) != b[part].get(key):
                    found.append(f"{stage}: {part} {key} differ")
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--prompts", type=int, default=1536, help="the rollout stage's prompts")
    ap.add_argument("--max-delay", type=float, default=4.0)
    ap.add_argument("--keep", type=Path, help="work here and keep the runs and logs")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.keep or Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        sizes = {"steps": args.steps, "rollout_prompts": args.prompts}
        clean_cfg = write_config(tmp / "clean.yaml", tmp / "clean", **sizes)
        start = time.time()
        assert alignkit_run(clean_cfg, tmp / "clean.log").wait() == 0
        clean_s = time.time() - start
        cfg = write_config(tmp / "chaos.yaml", tmp / "chaos", **sizes)
        stages = [s["name"] for s in chaos_pipeline(tmp)["stages"]]
        start = time.time()
        plan = schedule(stages, args.kills, args.seed, args.max_delay)
        kills, final = run_with_kills(cfg, tmp / "chaos", plan, tmp)
        chaos_s = time.time() - start
        diff = differences(fingerprint(tmp / "clean"), fingerprint(tmp / "chaos"))
    print("| # | target | signal | sent (s) | stage hit | exit | next attempt |")
    print("|---|---|---|---|---|---|---|")
    for i, k in enumerate(kills):
        print(f"| {i} | {k.target} | {k.signal} | {k.delay} | {k.hit} | {k.returncode} | "
              f"{k.next_action} |")  # fmt: skip
    print(f"\nclean run {clean_s:.0f} s; with {len(kills)} kills {chaos_s:.0f} s; final exit "
          f"{final}; differences: {diff or 'none'}")  # fmt: skip
    return 0 if final == 0 and not diff else 1


if __name__ == "__main__":
    sys.exit(main())
