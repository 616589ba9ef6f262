"""Peak memory of one training step: SFT (LoRA) vs our shared-base PPO vs a four-copy PPO.

Each layout runs in a fresh process (peak RSS on CPU, peak allocated on CUDA), on a model built
from a config with random weights (default: Qwen2.5-0.5B's shape), so nothing is downloaded.

    python bench/ppo_memory.py                     # 0.5B shape, batch 4 x 128 tokens
    python bench/ppo_memory.py --shape tiny        # seconds; activations dominate there

Layouts (all LoRA r16 on every linear layer):
- sft:          base + one adapter; forward + backward.
- ppo_shared:   one base + policy, ref, value (+ head) and reward (+ head) adapters; the PPO
                step's passes: policy/ref/value/reward forwards, policy and value backwards.
- four_copies:  policy (base + LoRA), reference (base copy), value (base copy + LoRA + head) and
                reward (base copy + head) as separate models; the same passes.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
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
    elif layout == "ppo_shared":
        m = get_peft_model(base(), lora())
        for name in ("ref", "value", "reward"):
            m.add_adapter(name, lora())
        vhead, rhead = head(), head()
        models += [m, vhead, rhead]
        with torch.no_grad():
            for name in ("ref", "reward"):
                m.set_adapter(name)
                m(input_ids=ids, output_hidden_states=name == "reward")
        m.set_adapter("default")
        m(input_ids=ids, labels=ids).loss.backward()
        m.set_adapter("value")
        h = m.get_base_model().model(input_ids=ids).last_hidden_state
        vhead(h).float().pow(2).mean().backward()
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


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--csv", default="bench/ppo_memory.csv")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:  # child process: one layout, print JSON
        print(json.dumps(measure(args.one, args.shape, args.batch, args.seq)))
        return
    rows = []
    for layout in ("sft", "ppo_shared", "four_copies"):
        cmd = [sys.executable, __file__, "--one", layout, "--shape", args.shape,
               "--batch", str(args.batch), "--seq", str(args.seq)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    sft = rows[0]["peak_mib"]
    print(
        f"\nPPO memory, {args.shape} shape, batch {args.batch} x {args.seq} tokens, {rows[0]['device']}"
    )
    print(f"{'layout':<13} {'peak MiB':>10} {'vs SFT':>7} {'weights MiB':>12} {'step s':>7}")
    for r in rows:
        r["vs_sft"] = r["peak_mib"] / sft
        print(
            f"{r['layout']:<13} {r['peak_mib']:>10.0f} {r['vs_sft']:>6.2f}x {r['weights_mib']:>12.0f} {r['seconds']:>7.1f}"
        )
    with open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
