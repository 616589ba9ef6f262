"""TRL's PPO trainer (``trl.experimental.ppo``, TRL 1.12.0: the last release that shipped one) on
the inputs ``ppo_vs_trl.py`` prepared. Runs under the bench's own virtual environment (TRL 1.12
shadows the project's TRL there), in a fresh process, and prints ``RESULT {json}``.

What TRL's trainer is given, as its docs and its example script (``examples/scripts/ppo``) say:
a policy (here the SFT stage merged into the base, wrapped in a new LoRA: TRL refuses a
``PeftModel`` together with a ``peft_config`` and asks for exactly this), no ``ref_model`` (with
a peft policy TRL's reference is the policy with its adapter disabled: the merged SFT model),
and a reward model and a value model, each a full ``AutoModelForSequenceClassification``
loaded from the reward-model stage merged into the base (adapter + score head). TRL trains the
value model in full.

Two things are set here that TRL leaves to the caller: the optimizer (AdamW with our PPO's two
learning rates, policy LoRA and value model, constant; TRL's default is one rate for both) and
the reward model's scale: its score head gets ``(score - mean) / std`` of the SFT policy's first
batch, the normalisation our PPO applies (``normalize_scores: fixed``), so both trainers see
rewards in the same units and one ``kl_coef`` means the same (``--raw-scores``: TRL's scores as
the RM gives them).

Timing hooks only, no change to what TRL computes: the module's ``batch_generation``,
``forward`` and ``gc.collect`` are wrapped to mark when a step starts, when its generation ends
and its first gradient pass starts, and how long garbage collection takes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import types
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


class StepTimer:
    """Per step (from one generation to the next, so TRL's end-of-step clean-up counts):
    generation, scoring (reference log-probs, values, rewards, GAE) and update, and how much of
    the step TRL spent in ``gc.collect()`` (it calls it twice per step)."""

    def __init__(self, module):
        self.steps: list[dict] = []
        self._marks: dict[str, float] = {}
        generate, forward, collect = module.batch_generation, module.forward, module.gc.collect

        def timed_generation(*a, **kw):
            self.close()
            self._marks = {"start": time.perf_counter(), "gc": 0.0}
            out = generate(*a, **kw)
            self._marks["generated"] = time.perf_counter()
            return out

        def timed_forward(*a, **kw):
            import torch

            if torch.is_grad_enabled() and "update" not in self._marks:
                self._marks["update"] = time.perf_counter()
            return forward(*a, **kw)

        def timed_collect(*a, **kw):
            t = time.perf_counter()
            try:
                return collect(*a, **kw)
            finally:
                if self._marks:
                    self._marks["gc"] += time.perf_counter() - t

        module.batch_generation, module.forward = timed_generation, timed_forward
        module.gc = types.SimpleNamespace(collect=timed_collect)

    def close(self) -> None:
        """End the open step (at the next generation, or when training ends)."""
        m, end = self._marks, time.perf_counter()
        if not m:
            return
        self.steps.append(
            {
                "gen_seconds": m["generated"] - m["start"],
                "score_seconds": m["update"] - m["generated"],
                "update_seconds": end - m["update"],
                "step_seconds": end - m["start"],
                "gc_seconds": m["gc"],
            }
        )
        self._marks = {}


def normalised_score_head(model, mean: float, std: float):
    """``model.score`` as a linear layer giving ``(score - mean) / std``."""
    import torch
    from torch import nn

    old = model.score
    head = nn.Linear(old.in_features, 1, bias=True, dtype=old.weight.dtype)
    with torch.no_grad():
        head.weight.copy_(old.weight / std)
        head.bias.fill_(-mean / std)
    model.score = head
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--inputs", type=Path, required=True, help="dir with sft_merged/, rm_merged/")
    ap.add_argument("--settings", type=Path, required=True, help="settings.json of the bench")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--raw-scores", action="store_true")
    args = ap.parse_args()
    s = json.loads(args.settings.read_text())
    t_start = time.time()

    import torch
    import transformers
    import trl
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    from alignkit.config import AdapterSpec
    from alignkit.data.prompts import load_prompts
    from alignkit.models import peft_config
    from alignkit.rollouts.types import encode_prompts

    t0 = time.time()  # as our side's: models loaded, trainer built, trained, saved
    torch.manual_seed(s["seed"])
    sft, rm = str(args.inputs / "sft_merged"), str(args.inputs / "rm_merged")
    tokenizer = AutoTokenizer.from_pretrained(sft)
    tokenizer.padding_side = "left"  # TRL generates from left-padded queries
    policy = get_peft_model(
        AutoModelForCausalLM.from_pretrained(sft, dtype=torch.float32),
        peft_config(AdapterSpec(**s["adapter"])),
    )
    value = AutoModelForSequenceClassification.from_pretrained(rm, num_labels=1)
    reward = AutoModelForSequenceClassification.from_pretrained(rm, num_labels=1)
    if not args.raw_scores:
        reward = normalised_score_head(reward, s["score_mean"], s["score_std"])

    rows = load_prompts("builtin:prompts", "train").rows
    ids = encode_prompts(tokenizer, [r["prompt"] for r in rows])
    train = Dataset.from_dict({"input_ids": ids})
    B = s["prompts_per_step"]
    config = PPOConfig(
        output_dir=str(args.out / "trainer"),
        per_device_train_batch_size=B,  # one micro-batch per minibatch: B / num_mini_batches
        gradient_accumulation_steps=1,
        num_mini_batches=s["minibatches"],
        num_ppo_epochs=s["ppo_epochs"],
        total_episodes=s["steps"] * B,
        local_rollout_forward_batch_size=B,
        response_length=s["max_new_tokens"],
        temperature=1.0,
        stop_token="eos",
        missing_eos_penalty=1.0,
        kl_coef=s["kl_coef"],
        learning_rate=s["learning_rate"],
        lr_scheduler_type="constant",
        num_sample_generations=0,
        save_strategy="no",
        report_to=[],
        logging_steps=1,
        disable_tqdm=True,
        seed=s["seed"],
        bf16=False,
        gradient_checkpointing=False,
    )
    optimizer = torch.optim.AdamW(
        [
            {
                "params": [p for p in policy.parameters() if p.requires_grad],
                "lr": s["learning_rate"],
            },
            {"params": list(value.parameters()), "lr": s["value_learning_rate"]},
        ]
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)

    timer = StepTimer(trl_ppo)
    history: list[dict] = []

    class Record(TrainerCallback):
        def on_log(self, _args, state, control, logs=None, **kw):
            history.append(dict(logs or {}))

        def on_train_end(self, _args, state, control, **kw):
            timer.close()

    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=policy,
        ref_model=None,
        reward_model=reward,
        train_dataset=train,
        value_model=value,
        eval_dataset=train.select(range(B)),
        optimizers=(optimizer, scheduler),
        callbacks=[Record()],
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    trainer.accelerator.unwrap_model(trainer.model).policy.save_pretrained(
        str(args.out / "adapter")
    )
    train_seconds = time.time() - t0

    held = sum(p.numel() for m in (policy, value, reward) for p in m.parameters())
    result = {
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__},
        "train_seconds": train_seconds,
        "process_seconds": time.time() - t_start,
        "steps": timer.steps,
        "logs": history,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "parameters_held": held,
    }
    if torch.cuda.is_available():
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    (args.out / "result.json").write_text(json.dumps(result, indent=1))
    print("RESULT " + json.dumps({k: v for k, v in result.items() if k != "logs"}))


if __name__ == "__main__":
    sys.exit(main())
