"""Rollout jobs: prompts in, n scored completions per prompt out, resumable.

``alignkit rollout`` validates a :class:`RolloutJobConfig` and calls :func:`run_rollout_job`:

1. resolve the rewards (a bad ``--reward`` fails before any model loads) and the prompts
   (:func:`alignkit.data.prompts.load_prompts`: a bad row fails with file:line);
2. open ``out`` (``job.json`` records what is generated; a different job there is refused),
   repair a torn last line a killed run left, and find the (prompt id, sample) rows present;
3. generate the missing samples chunk by chunk, score them, and append each chunk as whole
   JSONL lines, flushed and fsynced (:mod:`.shards`), with a progress bar showing tokens/s;
4. with ``best_of_n``, write ``preferences.jsonl`` from every row (:mod:`.best_of_n`).

A row: ``prompt_id``, ``sample`` (0..n-1), ``prompt`` (messages), ``completion`` (text),
``prompt_tokens``, ``completion_tokens``, ``finish_reason`` (stop/length), ``rewards``
({name: value}), ``reward`` (their weighted sum), and ``reference`` when the data has one.
Reward functions get ``prompts`` as message lists and ``completions`` as strings, with meta
``completion_ids``, ``finish_reason``, ``reference`` and ``prompt_id`` (one per completion).

The job is one process: vLLM spreads over GPUs with ``tensor_parallel_size``.
"""

from __future__ import annotations

import json
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from alignkit.config import COMPARE_SAMPLES, Strict
from alignkit.data.prompts import load_prompts
from alignkit.errors import UserError
from alignkit.rewards.registry import resolve_rewards
from alignkit.rollouts import ModelSource, make_engine, model_source
from alignkit.rollouts.best_of_n import write_preferences
from alignkit.rollouts.shards import ShardWriter, read_rollouts, repair_torn_tail, shard_paths
from alignkit.rollouts.types import EngineName, SamplingSpec
from alignkit.rollouts.vllm import VLLMConfig

JOB_FILE = "job.json"
# What the rows depend on: an existing out dir must match these to be resumed.
IDENTITY = tuple("model adapter stage dtype quantization prompts split rewards sampling".split())


class RolloutJobConfig(Strict):
    model: str | None = None
    """Base model (Hub id, path, builtin:tiny); or give ``stage``."""
    adapter: str | None = None
    """A peft adapter on ``model``."""
    stage: str | None = None
    """A finished stage ``RUN_DIR/STAGE``: its base model and adapter (or full model)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    quantization: Literal["none", "4bit", "8bit"] | None = None
    """Default: none, or what the stage was trained with."""
    prompts: str
    """Prompt source: JSONL/JSON/Parquet/CSV file, Hub dataset or ``builtin:prompts``."""
    split: str | None = None
    max_prompts: int | None = Field(None, ge=1)
    on_bad_rows: Literal["error", "skip"] = "error"
    out: str
    engine: EngineName = "hf"
    rewards: list[str] = []
    """Reward specs (``gold``, a rule, ``module:function``, an RM dir), each with ``*WEIGHT``."""
    sampling: SamplingSpec = SamplingSpec(n=COMPARE_SAMPLES)
    """How to sample (``n`` samples per prompt, temperature, top-p/top-k, stop strings, seed)."""
    best_of_n: bool = False
    """Also write ``preferences.jsonl``: best vs worst sample per prompt by ``reward``."""
    chunk_prompts: int | None = Field(None, ge=1)
    """Prompts per engine call and per durable write (a kill loses at most one chunk).
    Default: 64 for hf, 1024 for vllm (which schedules everything it is given at once)."""
    batch_size: int = Field(64, ge=1)
    """HF engine: sequences (prompts x samples) per forward."""
    rows_per_shard: int = Field(10_000, ge=1)
    vllm: VLLMConfig = VLLMConfig()


_SAMPLING_OPTIONS = ("n", "temperature", "top_p", "top_k", "max_new_tokens", "stop", "seed")
_VLLM_OPTIONS = ("gpu_memory_utilization", "tensor_parallel_size")


def job_config(**options) -> RolloutJobConfig:
    """A validated config from the CLI's flat options (``reward`` -> ``rewards``, sampling and
    vLLM flags into their blocks); a bad value is a UserError naming the flag."""
    given = {k: options.pop(k) for k in _SAMPLING_OPTIONS if k in options}
    sampling = {**RolloutJobConfig.model_fields["sampling"].default.model_dump(), **given}
    vllm = {k: v for k in _VLLM_OPTIONS if (v := options.pop(k, None)) is not None}
    rewards = options.pop("reward", None)
    options["rewards"] = rewards if rewards is not None else options.get("rewards", [])
    sampling["stop"] = sampling.get("stop") or []
    raw = {
        **{k: v for k, v in options.items() if v is not None},
        "sampling": sampling,
        "vllm": vllm,
    }
    if "out" in raw:
        raw["out"] = str(raw["out"])
    try:
        return RolloutJobConfig.model_validate(raw)
    except ValidationError as e:
        problems = [
            f"--{str(err['loc'][-1]).replace('_', '-')}: {err['msg']}" for err in e.errors()
        ]
        raise UserError("alignkit rollout: " + "; ".join(problems)) from None


def run_rollout_job(
    cfg: RolloutJobConfig, console: Console | None = None, source: ModelSource | None = None
) -> dict:
    """Run (or resume) the job; returns the summary also stored in ``out/job.json``.

    ``source``: the policy to sample, when the caller (the pipeline's rollout stage) has
    resolved it already; otherwise it comes from ``cfg.model``/``adapter``/``stage``."""
    console = console or Console(stderr=True)
    if cfg.best_of_n and (not cfg.rewards or cfg.sampling.n < 2):
        raise UserError("--best-of-n needs at least one --reward and --n 2 or more")
    rewards = resolve_rewards(cfg.rewards) if cfg.rewards else None
    rows = _unique(load_prompts(cfg.prompts, cfg.split, cfg.on_bad_rows).rows, console)
    rows = rows[: cfg.max_prompts]
    out = Path(cfg.out)
    done = _open_out_dir(out, cfg, console)
    n = cfg.sampling.n
    todo = [(r, [j for j in range(n) if j not in done.get(r["id"], ())]) for r in rows]
    todo = [(r, missing) for r, missing in todo if missing]
    console.print(
        f"rollouts: {len(rows)} prompts x {n} samples -> {out}; "
        f"{len(rows) - len(todo)} prompts already done, {len(todo)} to go"
    )
    stats = Counter()
    if todo:
        if source is None:
            source = model_source(cfg.model, cfg.adapter, cfg.stage, cfg.dtype, cfg.quantization)
        engine = make_engine(cfg.engine, source, batch_size=cfg.batch_size, vllm=cfg.vllm)
        with ShardWriter(out, cfg.rows_per_shard) as writer, _progress(console) as progress:
            task = progress.add_task(
                "rollouts", total=len(rows), completed=len(rows) - len(todo), tokps=0.0
            )
            started = time.perf_counter()
            chunk_size = cfg.chunk_prompts or (1024 if cfg.engine == "vllm" else 64)
            for chunk in _chunks(todo, chunk_size):
                new_rows = _generate_chunk(engine, chunk, cfg.sampling, rewards)
                writer.write(new_rows)
                stats["rows"] += len(new_rows)
                stats["tokens"] += sum(r["completion_tokens"] for r in new_rows)
                tokps = stats["tokens"] / (time.perf_counter() - started)
                progress.update(task, advance=len(chunk), tokps=tokps)
            stats["seconds"] = time.perf_counter() - started
    return _finish(out, cfg, rows, stats, console)


def _generate_chunk(engine, chunk, sampling: SamplingSpec, rewards) -> list[dict]:
    """Rows for one chunk. Prompts missing the same sample indices share an engine call (on
    a fresh job: all of them; after a torn write: the one prompt that was cut short)."""
    groups: dict[tuple[int, ...], list[dict]] = {}
    for row, missing in chunk:
        groups.setdefault(tuple(missing), []).append(row)
    out = []
    for missing, group in groups.items():
        seed = (
            None
            if sampling.seed is None
            else zlib.crc32(f"{sampling.seed}:{group[0]['id']}".encode())
        )
        cfg = sampling.model_copy(update={"n": len(missing), "seed": seed})
        batch = engine.generate([r["prompt"] for r in group], cfg)
        per_sample = [group[batch.prompt_index(k)] for k in range(len(batch))]
        scores = {}
        if rewards is not None:
            scores = rewards.score(
                [r["prompt"] for r in per_sample],
                batch.completion_text,
                completion_ids=batch.completion_ids,
                finish_reason=batch.finish_reason,
                reference=[r["reference"] for r in per_sample],
                prompt_id=[r["id"] for r in per_sample],
            )
        total = rewards.total(scores) if rewards is not None else None
        for k, row in enumerate(per_sample):
            record = {
                "prompt_id": row["id"],
                "sample": missing[k % len(missing)],
                "prompt": row["prompt"],
                "completion": batch.completion_text[k],
                "prompt_tokens": len(batch.prompt_ids[batch.prompt_index(k)]),
                "completion_tokens": len(batch.completion_ids[k]),
                "finish_reason": batch.finish_reason[k],
            }
            if rewards is not None:
                record["rewards"] = {name: values[k] for name, values in scores.items()}
                record["reward"] = total[k]
            if row["reference"] is not None:
                record["reference"] = row["reference"]
            out.append(record)
    return out


def _open_out_dir(out: Path, cfg: RolloutJobConfig, console: Console) -> dict[str, set[int]]:
    """Create or check ``out``; repair torn tails; return the sample indices present per prompt."""
    identity = cfg.model_dump(mode="json", include=set(IDENTITY))
    job_file = out / JOB_FILE
    if job_file.is_file():
        recorded = json.loads(job_file.read_text()).get("identity", {})
        changed = [k for k in IDENTITY if recorded.get(k) != identity.get(k)]
        if changed:
            diff = "; ".join(f"{k}: {recorded.get(k)!r} -> {identity.get(k)!r}" for k in changed)
            raise UserError(
                f"--out {out} holds rollouts of a different job ({diff}); resume with the same "
                "settings or choose a new --out"
            )
    elif out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} exists and is not a rollout directory; choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    if not job_file.is_file():
        _write_json(job_file, {"identity": identity, "config": cfg.model_dump(mode="json")})
    for path in shard_paths(out):
        note = repair_torn_tail(path)
        if note:
            console.print(f"[yellow]repaired[/] {note}")
    done: dict[str, set[int]] = {}
    for row in read_rollouts(out):
        done.setdefault(row["prompt_id"], set()).add(row["sample"])
    return done


def _finish(out: Path, cfg: RolloutJobConfig, rows: list[dict], stats: Counter, console) -> dict:
    wanted = {r["id"] for r in rows}
    written = [r for r in read_rollouts(out) if r["prompt_id"] in wanted]
    summary = {
        "prompts": len(rows),
        "rows": len(written),
        "rows_this_run": stats["rows"],
        "tokens_per_second": stats["tokens"] / stats["seconds"] if stats["seconds"] else None,
        "finish_reasons": dict(Counter(r["finish_reason"] for r in written)),
        "mean_completion_tokens": _mean([r["completion_tokens"] for r in written]),
        "shards": [p.name for p in shard_paths(out)],
    }
    if cfg.rewards:
        names = list(written[0]["rewards"]) if written else []
        summary["mean_rewards"] = {n: _mean([r["rewards"][n] for r in written]) for n in names}
        summary["mean_reward"] = _mean([r["reward"] for r in written])
    if cfg.best_of_n:
        result = write_preferences(out, written)
        summary["preferences"] = {
            "path": str(result.path),
            "pairs": result.pairs,
            "ties_dropped": result.ties,
        }
    record = json.loads((out / JOB_FILE).read_text())
    _write_json(out / JOB_FILE, {**record, "summary": summary})
    console.print(
        f"[green]done[/] {summary['rows']} rows ({summary['rows_this_run']} new) in "
        f"{len(summary['shards'])} shard(s) under {out}"
        + (
            f"; mean reward {summary['mean_reward']:.4g}"
            if summary.get("mean_reward") is not None
            else ""
        )
        + (f"; {summary['preferences']['pairs']} preference pairs" if cfg.best_of_n else "")
    )
    return summary


def _unique(rows: list[dict], console: Console) -> list[dict]:
    """First row per prompt id: identical prompts share an id (rows are keyed on it)."""
    seen, out = set(), []
    for row in rows:
        if row["id"] not in seen:
            seen.add(row["id"])
            out.append(row)
    if len(out) < len(rows):
        console.print(
            f"[yellow]note[/] {len(rows) - len(out)} rows repeat an earlier prompt id; skipped"
        )
    return out


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("prompts  {task.fields[tokps]:,.0f} tok/s"),
        TimeRemainingColumn(),
        console=console,
    )


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)
