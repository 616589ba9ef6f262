"""The pipeline the chaos test interrupts: SFT, a reward model, DPO, PPO on it, a rollout job."""

from __future__ import annotations

SFT_DATA = {"source": "builtin:sft", "split": "train", "eval_split": "test", "max_rows": 128,
            "max_eval_rows": 16}  # fmt: skip
PREF = {"source": "builtin:preference", "split": "train", "eval_split": "test", "max_rows": 128,
        "max_eval_rows": 16}  # fmt: skip


def train(steps: int) -> dict:
    return {
        "max_steps": steps,
        "per_device_train_batch_size": 8,
        "learning_rate": 3e-3,
        "logging_steps": 1,
        "save_steps": 2,
    }


def chaos_pipeline(run_dir, *, steps: int = 8, rollout_prompts: int = 48) -> dict:
    """Every kind that trains or generates, each checkpointing often, small enough to repeat
    (no rollout stage when ``rollout_prompts`` is 0)."""
    raw = {
        "run": {"name": "chaos", "dir": str(run_dir), "seed": 0},
        "model": {"name": "builtin:tiny"},
        "adapter": {"type": "lora", "r": 8, "alpha": 16},
        "stages": [
            {"name": "sft", "kind": "sft", "data": SFT_DATA, "max_length": 64,
             "heldout": {"num_prompts": 4, "samples_per_prompt": 1, "max_new_tokens": 12},
             "train": train(steps)},
            {"name": "rm", "kind": "reward_model", "data": PREF, "max_length": 64,
             "train": train(steps)},
            {"name": "dpo", "kind": "dpo", "from": "sft", "data": PREF, "max_length": 64,
             "heldout": {"num_prompts": 4, "samples_per_prompt": 1, "max_new_tokens": 12},
             "train": {**train(steps), "learning_rate": 5e-4}},
            {"name": "ppo", "kind": "ppo", "from": "sft",
             "data": {"source": "builtin:prompts", "split": "train", "max_rows": 256},
             "reward_model": "rm", "steps": steps, "prompts_per_step": 8, "minibatches": 2,
             "ppo_epochs": 1, "max_new_tokens": 12, "checkpoint_every": 1,
             "heldout": {"num_prompts": 4, "samples_per_prompt": 1, "max_new_tokens": 12}},
            {"name": "onpolicy", "kind": "rollout", "from": "ppo",
             "data": {"source": "builtin:prompts", "split": "train", "max_rows": rollout_prompts},
             "sampling": {"n": 2, "max_new_tokens": 12}, "labeller": ["gold"],
             "chunk_prompts": 8},
        ],
    }  # fmt: skip
    if not rollout_prompts:
        raw["stages"].pop()
    return raw
