"""Peak memory of one training step: SFT (LoRA) vs our PPO vs a four-copy PPO.

Each layout runs in ``--runs`` fresh processes (peak RSS on CPU, peak allocated on CUDA; the
table shows the median), on a model built from a config with random weights (default:
Qwen2.5-0.5B's shape), so nothing is downloaded.

    python bench/ppo_memory.py                     # 0.5B shape, batch 4 x 128 tokens, 3 runs
    python bench/ppo_memory.py --shape tiny        # seconds; activations dominate there
    python bench/ppo_memory.py --default-malloc    # glibc's adaptive mmap threshold (see below)

On CPU the children run with ``MALLOC_MMAP_THRESHOLD_`` fixed at 1 MiB: glibc otherwise raises its
mmap threshold as large blocks are freed, so later large tensors come from the heap, freed memory
stays mapped, and peak RSS depends on allocation history (measured: the same PPO step 6035-7356
MiB over three runs, SFT 5409-5543) rather than on what is live. With the threshold fixed, large
blocks are mapped and unmapped each time and RSS follows the live tensors. The setting is yours
to use in training too (it is an environment variable; nothing in alignkit sets it).

Layouts (all LoRA r16 on every linear layer):
- sft:          base + one adapter; forward + backward with labels (what a TRL SFT step runs).
- ppo:          our PPO step, run by its own code (``alignkit.stages.ppo_model`` and
                ``ppo_update``): one base with policy, ref, value (+ head) and reward (+ head)
                adapters; the reward model's score, the sampling policy's and the reference's
                log-probs and the values (no grad), then the update's policy and value backwards.
                The prompt is the first half of the sequence, the completion the second.
- four_copies:  a sketch of the layout we avoid: policy (base + LoRA), reference (base copy),
                value (base copy + LoRA + head) and reward (base copy + head) as separate
                models; the same passes, written inline (one run: it only shows the scale).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import time

SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, intermediate_size=4864, vocab_size=151936),
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=512, vocab_size=1000),
}  # fmt: skip


def measure(layout: str, shape: str, batch: int, seq: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    config = Qwen2Config(**SHAPES[shape], tie_word_embeddings=True, max_position_embeddings=4096)

    def base():
        return Qwen2ForCausalLM(config).to(dev, dtype).requires_grad_(False)

    def lora():
        return LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")

    def head():
        return torch.nn.Linear(config.hidden_size, 1, bias=False).to(dev, dtype)

    ids = torch.randint(0, config.vocab_size, (batch, seq), device=dev)
    models = []
    t0 = time.time()
    if layout == "sft":
        m = get_peft_model(base(), lora())
        models.append(m)
        m(input_ids=ids, labels=ids).loss.backward()
    elif layout == "ppo":
        models.append(_ppo_step(base(), lora, head, ids))
    elif layout == "four_copies":
        policy, value = get_peft_model(base(), lora()), get_peft_model(base(), lora())
        ref, reward = base(), base()
        vhead, rhead = head(), head()
        models += [policy, value, ref, reward, vhead, rhead]
        with torch.no_grad():
            ref(input_ids=ids)
            rhead(reward.model(input_ids=ids).last_hidden_state)
        policy(input_ids=ids, labels=ids).loss.backward()
        h = value.get_base_model().model(input_ids=ids).last_hidden_state
        vhead(h).float().pow(2).mean().backward()
    else:
        raise SystemExit(f"unknown layout {layout}")
    seconds = time.time() - t0
    seen: set[int] = set()
    weight_bytes = 0
    for mod in models:
        for p in mod.parameters():
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                weight_bytes += p.numel() * p.element_size()
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"layout": layout, "shape": shape, "device": dev, "batch": batch, "seq": seq,
            "peak_mib": peak / 2**20, "weights_mib": weight_bytes / 2**20, "seconds": seconds}  # fmt: skip


def _ppo_step(model, lora, head, ids):
    """One PPO step's passes on ``ids`` through our PPO code; returns the model."""
    import torch
    from accelerate import Accelerator
    from peft import get_peft_model

    from alignkit.stages import ppo_core as core
    from alignkit.stages import ppo_update as update
    from alignkit.stages.ppo import PPOStageConfig
    from alignkit.stages.ppo_model import POLICY, REFERENCE, REWARD, VALUE, PPOModel

    peft = get_peft_model(model, lora(), adapter_name=POLICY)
    for name in (REFERENCE, VALUE, REWARD):
        peft.add_adapter(name, lora())
    peft.set_adapter(POLICY)
    ppo = PPOModel(peft, head(), {REWARD: head()})
    ppo.set_trainable()
    B, L = ids.shape
    P = L // 2
    attn = torch.ones_like(ids)
    pos = torch.arange(L, device=ids.device).expand(B, L)
    with torch.no_grad(), ppo.role(REWARD):  # the reward model's score of each sequence
        ppo.reward_heads[REWARD](ppo.hidden(ids, attn, pos)[:, -1])
    old_logp, ref_logp, values = update.price(ppo, ids, attn, pos, P, 1.0)
    T = L - P
    cmask = torch.ones(B, T, device=ids.device)
    rewards = core.token_rewards(
        torch.randn(B, device=ids.device), old_logp - ref_logp, cmask, 0.05
    )
    advantages, returns = core.gae(rewards, values, cmask, 1.0, 0.95)
    exp = core.Experience(ids, attn, pos, cmask, P, old_logp, values, advantages, returns,
                          torch.zeros(B), {}, 0.0)  # fmt: skip
    ppo.train()
    update.backward(Accelerator(cpu=ids.device.type == "cpu"), ppo, PPOStageConfig(name="ppo", data={"source": "builtin:prompts"}),
                    exp, torch.arange(B), 1.0, True, lambda *_: None)  # fmt: skip
    return ppo


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3, help="fresh processes per layout")
    ap.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc's adaptive mmap threshold on (peak RSS then varies run to run)",
    )
    ap.add_argument("--csv", default="bench/ppo_memory.csv")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:  # child process: one layout, print JSON
        print(json.dumps(measure(args.one, args.shape, args.batch, args.seq)))
        return
    env = dict(os.environ)
    if not args.default_malloc:
        env["MALLOC_MMAP_THRESHOLD_"] = str(2**20)
    rows = []
    for layout in ("sft", "ppo", "four_copies"):
        runs = []
        for _ in range(1 if layout == "four_copies" else args.runs):
            cmd = [sys.executable, __file__, "--one", layout, "--shape", args.shape,
                   "--batch", str(args.batch), "--seq", str(args.seq)]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
        peaks = sorted(r["peak_mib"] for r in runs)
        row = {**runs[0], "runs": len(runs), "malloc": "default" if args.default_malloc else "mmap_1MiB", "peak_mib": statistics.median(peaks),
               "peak_min_mib": peaks[0], "peak_max_mib": peaks[-1],
               "seconds": statistics.median(r["seconds"] for r in runs)}  # fmt: skip
        rows.append(row)
    sft = rows[0]["peak_mib"]
    print(
        f"\nPPO memory, {args.shape} shape, batch {args.batch} x {args.seq} tokens, "
        f"{rows[0]['device']}, median of {args.runs} fresh processes (four_copies: 1), "
        f"{'default malloc' if args.default_malloc else 'MALLOC_MMAP_THRESHOLD_=1MiB'}"
    )
    print(
        f"{'layout':<13} {'peak MiB':>10} {'range':>13} {'vs SFT':>7} {'weights MiB':>12} {'step s':>7}"
    )
    for r in rows:
        r["vs_sft"] = r["peak_mib"] / sft
        spread = f"{r['peak_min_mib']:.0f}-{r['peak_max_mib']:.0f}"
        print(
            f"{r['layout']:<13} {r['peak_mib']:>10.0f} {spread:>13} {r['vs_sft']:>6.2f}x "
            f"{r['weights_mib']:>12.0f} {r['seconds']:>7.1f}"
        )
    with open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
