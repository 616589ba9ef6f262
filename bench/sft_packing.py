"""SFT throughput with and without packing, on chat rows whose lengths vary widely.

    python bench/sft_packing.py                   # builtin:tiny, 2048 rows of 4-200 words, ~1-2 min
    python bench/sft_packing.py --quick           # 256 rows: a ~20 s smoke test
    python bench/sft_packing.py --shape small     # random-init 40M Qwen2: compute, not Python
    python bench/sft_packing.py --data builtin    # builtin:sft rows (8-20 words): little padding

What runs is the SFT stage's trainer (stages/sft.py): an ``SFTStageConfig`` (``packing`` off,
then on) turned into TRL's ``SFTConfig`` by ``trl_args`` with the stage's settings, the policy
from ``load_policy`` (base + a new LoRA r16 on every linear layer), loss on assistant turns only.
Each mode trains one epoch over the same rows in a fresh process, so both see the same real
tokens (checked) and peak memory does not leak between rows. Rows: the builtin task's prompts
with completions of ``--min-words``..``--max-words`` task words, log-uniform (many short answers,
a long tail), one token per word on the builtin tokenizer; or ``--data builtin``.

Columns: ``steps``; ``real_tok`` (non-pad tokens fed to the model) and ``loss_tok`` (of them,
assistant tokens with a loss); ``pad_%`` (pad slots / all slots in the batches); ``train_s``
(wall time of ``trainer.train()``, dataset preparation and model loading excluded);
``real_tok_s`` (real tokens / train_s); ``peak_mib`` (CPU: peak RSS of the process; CUDA: torch
peak allocated during training); ``leak`` (packed rows only: max |logit difference| between an
example inside a packed row and the same example run alone: ~1e-6 in float32 is rounding, so
no attention across the examples packed together; attention across them shows as ~0.1-1).

What ``packing=True`` does in TRL 1.16 (sft_trainer.py, data_utils.pack_dataset):
- Labels (with the assistant-only mask) are built per example first, then examples are packed
  best-fit-decreasing (``packing_strategy="bfd"``) into rows of at most ``max_length`` tokens;
  an example longer than that is truncated, as without packing.
- ``bfd`` switches on ``padding_free`` whatever the config says: the collator concatenates the
  whole batch (``per_device_train_batch_size`` packed rows) into ONE row of up to
  batch x max_length tokens, with ``position_ids`` restarting at 0 for each example, no
  ``attention_mask`` (and ``cu_seq_lens_*`` for flash-attention's varlen kernels). The first label
  of each example is masked. TRL checks nothing about the attention implementation.
- Without flash-attention (CPU; ``sdpa`` or ``eager``) it is still correct: transformers 5's
  ``create_causal_mask`` sees restarting ``position_ids`` with no attention mask and no KV cache
  and builds a block-diagonal causal mask (``find_packed_sequence_indices``). The ``leak``
  column checks it on every run. It holds only without a cache: SFTTrainer passes
  ``use_cache=False``; a plain ``model(**batch)`` in eval mode (cache on by default) lets the
  examples of a packed row attend to each other (logits off by ~0.4 on builtin:tiny).
- The price without flash-attention: attention is dense over the flattened row, so it costs
  O((batch x max_length)^2) instead of O(batch x max_length^2), mostly masked-out work.
  flash_attention_2 (``--attn flash_attention_2`` on a GPU with flash-attn) avoids it.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import tempfile
import time
from pathlib import Path

from _common import add_common_args, model_spec, passthrough, report, run_modes

COLUMNS = ["mode", "shape", "device", "rows", "batch", "max_length", "steps", "real_tok",
           "loss_tok", "pad_%", "train_s", "real_tok_s", "vs_unpacked", "peak_mib", "leak"]  # fmt: skip


def write_rows(args, path: Path) -> None:
    """Chat rows: builtin prompts + completions of log-uniform length (seeded)."""
    from alignkit.builtin import load_builtin
    from alignkit.builtin.task import all_words

    rng = random.Random(0)
    words = all_words()
    prompts = [r["prompt"] for r in load_builtin("prompts")]
    lo, hi = math.log(args.min_words), math.log(args.max_words + 1)
    with path.open("w") as f:
        for i in range(args.rows):
            n = int(math.exp(rng.uniform(lo, hi)))
            completion = " ".join(rng.choice(words) for _ in range(n)) + "."
            messages = [
                {"role": "user", "content": prompts[i % len(prompts)]},
                {"role": "assistant", "content": completion},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")


class CountingCollator:
    """Wraps the trainer's collator; counts real (non-pad), loss and all token slots fed."""

    def __init__(self, inner, pad_id: int):
        self.inner, self.pad_id = inner, pad_id
        self.real = self.loss = self.slots = 0

    def __call__(self, examples):
        batch = self.inner(examples)
        ids = batch["input_ids"]
        self.real += int((ids != self.pad_id).sum())
        self.loss += int((batch["labels"] != -100).sum())
        self.slots += ids.numel()
        return batch


def packed_leak(trainer) -> float:
    """Max |logit diff| between the examples of the first packed row and each run alone."""
    import torch

    row = trainer.train_dataset[0]
    batch = trainer.data_collator.inner([row])
    model = trainer.model.eval()
    dev = next(model.parameters()).device
    with torch.no_grad():
        inputs = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}
        inputs.pop("labels")
        packed = model(**inputs, use_cache=False).logits[0].float()
        worst, start = 0.0, 0
        for n in row["seq_lengths"]:
            ids = torch.tensor([row["input_ids"][start : start + n]], device=dev)
            alone = model(input_ids=ids, use_cache=False).logits[0].float()
            worst = max(worst, (packed[start : start + n] - alone).abs().max().item())
            start += n
    return worst


def measure(args, mode: str) -> dict:
    """One epoch of SFT with ``packing`` on or off, in this process."""
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from alignkit.config import AdapterSpec, DataSpec
    from alignkit.data.sft import load_sft
    from alignkit.data.split import train_eval_rows
    from alignkit.models import load_policy
    from alignkit.stages.sft import SFTStageConfig
    from alignkit.training import trl_args

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="sft-packing-"))
    if args.data == "mixed":
        write_rows(args, tmp / "rows.jsonl")
        source = str(tmp / "rows.jsonl")
    else:
        source = "builtin:sft"
    cfg = SFTStageConfig(
        name="sft",
        data=DataSpec(source=source, eval_size=0, max_rows=args.rows),
        packing=mode == "packed",
        max_length=args.max_length,
        train={
            "per_device_train_batch_size": args.batch,
            "num_train_epochs": 1,
            "save_strategy": "no",
            "disable_tqdm": True,
            "learning_rate": 1e-4,
        },
    )
    rows, _ = train_eval_rows(cfg.data, load_sft, seed=0)
    spec = model_spec(args.shape, args.attn)
    model, tokenizer = load_policy(spec, AdapterSpec(), None)
    # as the stage does: the builtin chat template marks assistant turns, so messages + mask
    dataset = Dataset.from_list([{"messages": r["messages"]} for r in rows])
    sft_args = trl_args(
        SFTConfig,
        cfg.train,
        output_dir=tmp / "checkpoints",
        seed=0,
        where="bench",
        max_length=cfg.max_length,
        packing=cfg.packing,
        eval_packing=False,
        assistant_only_loss=True,
    )
    trainer = SFTTrainer(
        model=model, args=sft_args, train_dataset=dataset, processing_class=tokenizer
    )
    counter = CountingCollator(trainer.data_collator, tokenizer.pad_token_id)
    trainer.data_collator = counter
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer.train()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    leak = packed_leak(trainer) if cfg.packing else None
    return {
        "mode": mode,
        "shape": args.shape,
        "device": torch.cuda.get_device_name() if cuda else f"cpu x{torch.get_num_threads()}",
        "rows": len(rows),
        "batch": args.batch,
        "max_length": args.max_length,
        "steps": trainer.state.global_step,
        "real_tok": counter.real,
        "loss_tok": counter.loss,
        "pad_%": round(100 * (1 - counter.real / counter.slots), 1),
        "train_s": round(seconds, 2),
        "real_tok_s": round(counter.real / seconds, 1),
        "peak_mib": round(peak),
        "leak": "" if leak is None else f"{leak:.1e}",
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(p, "256 rows: a ~20 s smoke test")
    p.add_argument("--data", default="mixed", choices=["mixed", "builtin"])
    p.add_argument("--rows", type=int, default=2048, help="training rows (one epoch)")
    p.add_argument("--min-words", type=int, default=4)
    p.add_argument("--max-words", type=int, default=200)
    p.add_argument("--one", choices=["unpacked", "packed"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.rows = 256
    if args.one:  # child process: one mode, print JSON
        print("RESULT " + json.dumps(measure(args, args.one)), flush=True)
        return

    rows = run_modes(
        __file__,
        ("unpacked", "packed"),
        passthrough(args, ("data", "rows", "min_words", "max_words")),
    )
    unpacked, packed = rows
    for r in rows:
        r["vs_unpacked"] = round(r["real_tok_s"] / unpacked["real_tok_s"], 2)
    if unpacked["real_tok"] != packed["real_tok"]:
        print(f"warning: real tokens differ ({unpacked['real_tok']} vs {packed['real_tok']})")
    report(
        f"SFT packing: {args.shape}, {args.data} data, one epoch",
        COLUMNS,
        rows,
        args.csv or Path(__file__).with_suffix(".csv"),
    )
    print(
        f"packed / unpacked: {packed['vs_unpacked']:.2f}x real tokens/s, "
        f"{packed['steps'] / unpacked['steps']:.2f}x steps, "
        f"{packed['peak_mib'] / unpacked['peak_mib']:.2f}x peak memory"
    )


if __name__ == "__main__":
    main()
