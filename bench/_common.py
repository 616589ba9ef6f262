"""Pieces the step benchmarks share (``sft_packing.py``, ``dpo_precompute.py``): model shapes,
the common options, one fresh process per mode, and the table + CSV."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

SHAPES = {  # random-init Qwen2 shapes, beside the pretrained builtin:tiny (hidden 128, 2 layers)
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2, intermediate_size=1536, vocab_size=32000),
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, intermediate_size=4864, vocab_size=151936),
}  # fmt: skip


def model_spec(shape: str, attn: str | None):
    """builtin:tiny, or a random-init Qwen2 of ``shape`` with builtin:tiny's tokenizer, saved
    once under ``$ALIGNKIT_CACHE/bench`` so the stage's loaders read it like any local model."""
    from alignkit.builtin.tiny import cache_root, ensure_cached, ensure_tiny_model
    from alignkit.config import ModelSpec

    if shape == "builtin":
        return ModelSpec(name="builtin:tiny", attn_implementation=attn)

    def build(out: Path) -> None:
        import torch
        from transformers import Qwen2Config, Qwen2ForCausalLM

        from alignkit.models import load_tokenizer

        tok = load_tokenizer(ensure_tiny_model())
        dims = {**SHAPES[shape], "vocab_size": max(SHAPES[shape]["vocab_size"], len(tok))}
        config = Qwen2Config(
            **dims,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
            bos_token_id=None,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
        tok.save_pretrained(out, save_jinja_files=False)

    path = ensure_cached(cache_root() / "bench" / f"{shape}-tinytok", build)
    return ModelSpec(name=str(path), attn_implementation=attn)


def add_common_args(p, quick_help: str) -> None:
    """--shape, --batch, --max-length, --attn, --threads, --quick, --csv (default: beside ``p``'s script)."""
    p.add_argument(
        "--shape",
        default="builtin",
        choices=["builtin", *SHAPES],
        help="builtin: the pretrained builtin:tiny; others: random-init Qwen2",
    )
    p.add_argument("--batch", type=int, default=8, help="per_device_train_batch_size")
    p.add_argument("--max-length", type=int, default=256, help="builtin:tiny has 256 positions")
    p.add_argument("--attn", default=None, help="attn_implementation (default: the model's)")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0: torch's default); 1 on a busy machine",
    )
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--csv", type=Path, default=None)


def passthrough(args, keys: tuple[str, ...]) -> list[str]:
    """The child process's options: ``keys`` plus the common ones."""
    keys = ("shape", *keys, "batch", "max_length", "threads")
    out = [a for k in keys for a in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]
    return out + (["--attn", args.attn] if args.attn else [])


def run_modes(script: str, modes: tuple[str, ...], child_args: list[str]) -> list[dict]:
    """Run ``script --one MODE`` in a fresh process per mode; each prints ``RESULT {json}``."""
    rows = []
    for mode in modes:
        done = subprocess.run(
            [sys.executable, script, "--one", mode, *child_args], capture_output=True, text=True
        )
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            sys.exit(f"{mode} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(lines[-1].removeprefix("RESULT ")))
    return rows


def report(title: str, columns: list[str], rows: list[dict], path: Path) -> None:
    """Print the table and write the CSV."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="left" if c in ("mode", "shape", "device") else "right")
    for r in rows:
        table.add_row(*(str(r[c]) for c in columns))
    Console(width=200).print(table)
    write_csv(path, [{c: r[c] for c in columns} for r in rows], round_to=None)
    print(f"wrote {path}")


def write_csv(path: Path, rows: list[dict], round_to: int | None = 4) -> None:
    """``rows`` as a CSV (columns: the first row's keys), floats rounded to ``round_to``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for r in rows:
            writer.writerow({k: round(v, round_to) if isinstance(v, float) and round_to is not None
                             else v for k, v in r.items()})  # fmt: skip
