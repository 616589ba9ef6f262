"""PPO's one-base, many-adapters model: policy, reference, value and (optionally) reward.

Every role is a peft adapter on the same frozen base weights; switching the active adapter,
not the model, gives each forward pass. peft's ``set_adapter`` also rewrites ``requires_grad``
(it freezes every adapter but the active one), so :meth:`PPOModel.role` restores the trainable
set after each switch, and the loop runs each backward before switching away.
"""

from __future__ import annotations

import functools
import inspect
import json
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn

from alignkit.config import AdapterSpec, ModelSpec
from alignkit.errors import UserError
from alignkit.handoff import ADAPTER_DIR, POLICY_ADAPTER, REFERENCE_ADAPTER
from alignkit.models import load_base, load_tokenizer, peft_config

POLICY, REFERENCE, VALUE, REWARD = POLICY_ADAPTER, REFERENCE_ADAPTER, "value", "reward"
HELDOUT_REWARD = "heldout_reward"  # a second RM that only watches (never trained on)


class PPOModel(nn.Module):
    def __init__(self, peft_model, value_head: nn.Linear, reward_heads: dict[str, nn.Linear]):
        super().__init__()
        self.peft = peft_model
        self.value_head = value_head
        self.reward_heads = nn.ModuleDict(reward_heads)
        """Score heads of the reward adapters on this base, by adapter name."""
        self._trainable = {n: p.requires_grad for n, p in self.named_parameters()}

    @property
    def decoder(self):
        """The transformer body (below the LM head) of the wrapped causal LM."""
        return self.peft.get_base_model().model

    def set_trainable(self) -> None:
        """Policy and value adapters and the value head train; base, reference and reward don't."""
        for name, p in self.named_parameters():
            p.requires_grad_(
                f".{POLICY}." in name or f".{VALUE}." in name or name.startswith("value_head")
            )
        self._trainable = {n: p.requires_grad for n, p in self.named_parameters()}

    @contextmanager
    def role(self, adapter: str):
        self.peft.set_adapter(adapter)
        try:
            yield
        finally:
            self.peft.set_adapter(POLICY)
            for name, p in self.named_parameters():
                p.requires_grad_(self._trainable[name])

    def policy_parameters(self):
        return [p for n, p in self.named_parameters() if f".{POLICY}." in n and p.requires_grad]

    def value_parameters(self):
        return [
            p
            for n, p in self.named_parameters()
            if (f".{VALUE}." in n or n.startswith("value_head")) and p.requires_grad
        ]

    def forward(self, ids, attn, pos, prompt_width: int, part: str):
        """One part of the update's forward: the policy's logits over the completion positions
        (``part`` POLICY, ``[B, T, V]``) or the value estimates there (VALUE, ``[B, T]``). The
        update runs the two one after the other, each with its own backward, so only one pass's
        activations are held at a time (the parts share no trainable parameter). This is what
        DDP wraps: gradients are synchronised only for what runs through the wrapper's forward,
        never for :meth:`completion_logits`/:meth:`hidden` called on the inner module."""
        if part == POLICY:
            return self.completion_logits(ids, attn, pos, prompt_width)
        if part != VALUE:
            raise ValueError(f"part must be {POLICY!r} or {VALUE!r}, not {part!r}")
        T = ids.shape[1] - prompt_width
        with self.role(VALUE):  # restores the trainable flags before any backward
            hidden = self.hidden(ids, attn, pos)[:, prompt_width - 1 : prompt_width - 1 + T]
        return self.value_head(hidden.float()).squeeze(-1)

    def completion_logits(self, ids, attn, pos, prompt_width: int):
        """The active adapter's logits at the positions that predict the completion tokens,
        ``[B, T, V]``. Where the model's forward takes ``logits_to_keep`` (every current decoder
        in transformers) only those positions go through the LM head, so the prompt's logits
        over the vocabulary are never made."""
        T = ids.shape[1] - prompt_width
        kwargs = dict(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False)
        if self._keeps_logits:
            return self.peft(**kwargs, logits_to_keep=T + 1).logits[:, :-1]
        return self.peft(**kwargs).logits[:, prompt_width - 1 : prompt_width - 1 + T]

    @functools.cached_property
    def _keeps_logits(self) -> bool:
        forward = self.peft.get_base_model().forward
        return "logits_to_keep" in inspect.signature(forward).parameters

    def hidden(self, ids, attn, pos):
        return self.decoder(
            input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False
        ).last_hidden_state


class SharedBaseRewardModel(nn.Module):
    """The reward model as an adapter + score head on PPO's base, with a sequence classifier's
    interface (``.logits`` read at the last non-pad token), so :class:`RewardModelScorer` drives it."""

    def __init__(self, ppo: PPOModel, pad_token_id: int, adapter: str = REWARD):
        super().__init__()
        self.ppo, self.pad, self.adapter = ppo, pad_token_id, adapter

    def forward(self, input_ids, attention_mask):
        pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        with self.ppo.role(self.adapter):
            hidden = self.ppo.hidden(input_ids, attention_mask, pos)
        last = attention_mask.sum(1) - 1  # right-padded by the scorer
        scores = self.ppo.reward_heads[self.adapter](hidden[torch.arange(len(last)), last])
        return type("Out", (), {"logits": scores})()


def build_ppo_model(
    spec: ModelSpec,
    sft_dir: Path,
    value_adapter: AdapterSpec,
    reward_dirs: dict[str, Path] | None = None,
) -> tuple[PPOModel, object]:
    """Base + policy (SFT adapter, trainable) + ref (SFT adapter, frozen) + value (new LoRA, head
    from the RM's score head when there is one, else zeros) + one frozen adapter with its score
    head per reward model in ``reward_dirs`` (adapter name -> reward_model stage dir)."""
    if not (sft_dir / ADAPTER_DIR).is_dir():
        raise UserError(f"PPO needs a LoRA policy stage to start from; {sft_dir} has no adapter/")
    tokenizer = load_tokenizer(sft_dir, spec)
    base = load_base(spec, tokenizer)
    base.requires_grad_(False)
    model = PeftModel.from_pretrained(
        base, str(sft_dir / ADAPTER_DIR), adapter_name=POLICY, is_trainable=True
    )
    model.load_adapter(str(sft_dir / ADAPTER_DIR), adapter_name=REFERENCE, is_trainable=False)
    model.add_adapter(VALUE, peft_config(value_adapter))
    hidden = base.config.get_text_config().hidden_size
    value_head = nn.Linear(hidden, 1, bias=False)
    nn.init.zeros_(value_head.weight)
    heads = {
        name: _add_reward_adapter(model, name, rm_dir, value_adapter, hidden)
        for name, rm_dir in (reward_dirs or {}).items()
    }
    if REWARD in heads:
        with torch.no_grad():  # the value head starts from the RM's score head
            value_head.weight.copy_(heads[REWARD].weight)
    model.set_adapter(POLICY)
    ppo = PPOModel(model, value_head, heads)
    ppo.set_trainable()
    return ppo, tokenizer


def _add_reward_adapter(model, name: str, rm_dir: Path, like: AdapterSpec, hidden: int):
    """Load a reward_model stage's LoRA as adapter ``name`` (frozen); return its score head."""
    rm_state = load_file(str(rm_dir / ADAPTER_DIR / "adapter_model.safetensors"))
    head_key = next((k for k in rm_state if k.endswith("score.weight")), None)
    if head_key is None:
        raise UserError(f"{rm_dir}: the reward adapter has no saved score head")
    rm_config = json.loads((rm_dir / ADAPTER_DIR / "adapter_config.json").read_text())
    lora = like.model_copy(
        update={
            "type": "lora",
            "r": rm_config["r"],
            "alpha": rm_config["lora_alpha"],
            "target_modules": rm_config["target_modules"],
            "modules_to_save": [],
            "use_rslora": rm_config.get("use_rslora", False),
            "use_dora": rm_config.get("use_dora", False),
        }
    )
    model.add_adapter(name, peft_config(lora))
    lora_state = {k: v for k, v in rm_state.items() if "lora_" in k}
    result = set_peft_model_state_dict(model, lora_state, adapter_name=name)
    if result.unexpected_keys:
        raise UserError(
            f"{rm_dir}: reward adapter does not fit the base: {result.unexpected_keys[:3]}"
        )
    head = nn.Linear(hidden, 1, bias=False)
    with torch.no_grad():
        head.weight.copy_(rm_state[head_key])
    head.requires_grad_(False)
    return head
