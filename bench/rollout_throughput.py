"""Rollout throughput: the HF engine vs the vLLM engine on the same prompts and model.

    python bench/rollout_throughput.py                      # CPU: HF only, small sizes
    python bench/rollout_throughput.py --prompts 256 --new-tokens 256   # GPU: HF and vLLM

Models need no download: ``tiny`` is builtin:tiny; ``qwen0.5b`` is Qwen2.5-0.5B's architecture
built from its config with seeded random weights (cached under $ALIGNKIT_CACHE/bench). Prompts
are random token ids; every run generates exactly ``--new-tokens`` per prompt (``ignore_eos``),
so engines do the same work. vLLM also runs the model with a random rank-16 LoRA served as an
adapter vs the same LoRA merged into the weights. Each row runs in a fresh process (memory
peaks and vLLM's GPU reservation do not leak between rows). Prints a table, writes a CSV.

Columns: generated tokens/s over the whole run; time to first batch (the first ``--batch-size``
prompts, cold: warm-up included); peak memory (GPU: torch peak for HF, device-wide use for
vLLM, which reserves ``gpu_memory_utilization`` up front; CPU: peak RSS).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

QWEN_05B = dict(  # Qwen/Qwen2.5-0.5B config.json
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    max_position_embeddings=32768,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
COLUMNS = [
    "engine",
    "model",
    "weights",
    "device",
    "prompts",
    "new_tokens",
    "tokens_per_s",
    "first_batch_s",
    "peak_mem_gib",
]


def bench_dir() -> Path:
    from alignkit.builtin.tiny import cache_root

    return cache_root() / "bench"


def build_random_model(name: str) -> Path:
    """Qwen2.5-0.5B's shape with seeded random weights, a word-level tokenizer over its vocab,
    a random LoRA adapter and the merged model: everything vLLM and HF need, on disk."""
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    root = bench_dir() / name
    if (root / "merged" / "config.json").is_file():
        return root
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**QWEN_05B)).to(torch.bfloat16)
    vocab = {f"<t{i}>": i for i in range(QWEN_05B["vocab_size"])}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<t2>")),
        pad_token="<t0>",
        eos_token="<t1>",
    )
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    lora = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    lora.save_pretrained(root / "adapter")
    tok.save_pretrained(root / "adapter")
    lora.merge_and_unload().save_pretrained(root / "merged")
    tok.save_pretrained(root / "merged")
    return root


def model_paths(model: str, weights: str) -> tuple[str, str | None]:
    """(model path, adapter dir) for a model name and ``base | lora | merged``."""
    if model == "tiny":
        from alignkit.builtin import ensure_tiny_model

        return str(ensure_tiny_model()), None
    root = build_random_model(model)
    return str(root / ("merged" if weights == "merged" else "base")), (
        str(root / "adapter") if weights == "lora" else None
    )


def run_one(args) -> dict:
    """One (engine, model, weights) measurement, in this process."""
    from alignkit.rollouts import make_engine, model_source
    from alignkit.rollouts.types import SamplingSpec
    from alignkit.rollouts.vllm import VLLMConfig

    path, adapter = model_paths(args.model, args.weights)
    source = model_source(model=path, adapter=adapter)
    vllm = VLLMConfig(gpu_memory_utilization=args.gpu_memory_utilization)
    engine = make_engine(args.engine, source, batch_size=args.batch_size, vllm=vllm)
    vocab = engine.tokenizer.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(5, vocab, (args.prompts, args.prompt_len), generator=gen).tolist()
    cfg = SamplingSpec(max_new_tokens=args.new_tokens, ignore_eos=True, seed=0)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    engine.generate(prompts[: args.batch_size], cfg)
    first_batch = time.perf_counter() - started
    started = time.perf_counter()
    batch = engine.generate(prompts, cfg)
    seconds = time.perf_counter() - started
    tokens = sum(len(c) for c in batch.completion_ids)
    assert tokens == args.prompts * args.new_tokens, (
        "ignore_eos should give every prompt all tokens"
    )
    if not torch.cuda.is_available():
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    elif args.engine == "hf":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        free, total = torch.cuda.mem_get_info()
        peak = (total - free) / 2**30
    return {
        "engine": args.engine,
        "model": args.model,
        "weights": args.weights,
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"cpu x{os.cpu_count()}",
        "prompts": args.prompts,
        "new_tokens": args.new_tokens,
        "tokens_per_s": round(tokens / seconds, 1),
        "first_batch_s": round(first_batch, 2),
        "peak_mem_gib": round(peak, 2),
    }


def plan(args) -> list[tuple[str, str, str]]:
    rows = [("hf", m, "base") for m in args.models]
    if args.vllm:
        for m in args.models:
            rows.append(("vllm", m, "base"))
            if m != "tiny":
                rows += [("vllm", m, "lora"), ("vllm", m, "merged")]
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    gpu = torch.cuda.is_available()
    p.add_argument(
        "--models", nargs="+", default=["tiny", "qwen0.5b"], choices=["tiny", "qwen0.5b"]
    )
    p.add_argument("--prompts", type=int, default=256 if gpu else 16)
    p.add_argument("--prompt-len", type=int, default=64 if gpu else 32)
    p.add_argument("--new-tokens", type=int, default=256 if gpu else 32)
    p.add_argument(
        "--batch-size", type=int, default=64 if gpu else 16, help="HF sequences per forward"
    )
    p.add_argument("--gpu-memory-utilization", type=float, default=0.8)
    p.add_argument("--csv", type=Path, default=Path("runs/bench/rollout_throughput.csv"))
    p.add_argument("--one", nargs=3, metavar=("ENGINE", "MODEL", "WEIGHTS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        args.engine, args.model, args.weights = args.one
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return

    import importlib.util

    args.vllm = gpu and importlib.util.find_spec("vllm") is not None
    if not args.vllm:
        print("vLLM rows skipped: vLLM needs a CUDA GPU and `pip install 'alignkit[vllm]'`.")
    if "tiny" in args.models and args.prompt_len + args.new_tokens > 256:
        print("tiny: prompt + new tokens exceed its 256 positions; tiny rows skipped")
        args.models = [m for m in args.models if m != "tiny"]
    results = []
    for engine, model, weights in plan(args):
        cmd = [sys.executable, __file__, "--one", engine, model, weights, *_passthrough(args)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            print(f"{engine}/{model}/{weights} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
            continue
        results.append(json.loads(lines[-1].removeprefix("RESULT ")))
        print(_row(results[-1]), flush=True)
    _report(results, args.csv)


def _passthrough(args) -> list[str]:
    keys = ("prompts", "prompt_len", "new_tokens", "batch_size", "gpu_memory_utilization")
    return [a for k in keys for a in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]


def _row(r: dict) -> str:
    return " | ".join(str(r[c]) for c in COLUMNS)


def _report(results: list[dict], path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="rollout throughput (generated tokens/s)")
    for c in COLUMNS:
        table.add_column(c)
    for r in results:
        table.add_row(*(str(r[c]) for c in COLUMNS))
    Console(width=160).print(table)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(results)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
