"""alignkit: SFT -> reward model -> PPO/GRPO/RLOO or DPO on LoRA/QLoRA adapters."""

__version__ = "0.1.0"
