"""Log-probs of given completions under a model: the scorer behind KL estimates and NLL.

Every forward is left padded with position ids taken from the attention mask, so a sequence
scores the same in any batch (an absolute-position model would otherwise shift by the padding).
Only the last ``max completion length + 1`` positions' logits are computed (``logits_to_keep``):
with left padding every completion ends at the last column.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from alignkit.handoff import AdapterView


@torch.no_grad()
def sequence_logprobs(
    model: AdapterView | nn.Module,
    prompt_ids: Sequence[list[int]],
    completion_ids: Sequence[list[int]],
    *,
    temperature: float = 1.0,
    batch_size: int = 16,
) -> list[torch.Tensor]:
    """``out[k][t] = log p(completion_ids[k][t] | prompt_ids[k] + completion_ids[k][:t])``.

    One float32 CPU tensor of ``len(completion_ids[k])`` per sequence. ``temperature`` scales the
    logits first (1 or 0: the model's own distribution), so samples drawn at temperature T score
    under the distribution they were drawn from. Memory per batch: ``batch_size x longest
    completion x vocab`` floats.
    """
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
    view = model if isinstance(model, AdapterView) else AdapterView(model)
    scale = temperature if temperature > 0 else 1.0
    order = sorted(
        range(len(prompt_ids)), key=lambda k: -len(prompt_ids[k]) - len(completion_ids[k])
    )
    out: list[torch.Tensor | None] = [None] * len(prompt_ids)
    with view.active() as net:
        was_training = net.training
        net.eval()
        device = next(net.parameters()).device
        try:
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                rows = _score_batch(
                    net,
                    [prompt_ids[k] for k in idx],
                    [completion_ids[k] for k in idx],
                    scale,
                    device,
                )
                for k, row in zip(idx, rows, strict=True):
                    out[k] = row
        finally:
            net.train(was_training)
    return out  # type: ignore[return-value]


def _score_batch(net, prompts, completions, scale: float, device) -> list[torch.Tensor]:
    seqs = [list(p) + list(c) for p, c in zip(prompts, completions, strict=True)]
    width = max(len(s) for s in seqs)
    longest = max(len(c) for c in completions)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)  # the pad id is masked: any id works
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[r, width - len(s) :] = 1
    if longest == 0:
        return [torch.zeros(0) for _ in seqs]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = net(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        use_cache=False,
        logits_to_keep=longest + 1,
    ).logits
    # (batch, longest, vocab): the logits at position t predict token t + 1
    logp = torch.log_softmax(logits[:, -longest - 1 : -1].float() / scale, dim=-1)
    targets = ids[:, width - longest :].to(device)
    taken = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).cpu()
    return [taken[r, longest - len(c) :].clone() for r, c in enumerate(completions)]


def reference_completion_ids(
    tokenizer, prompt: list[dict], prompt_ids: list[int], reference: str
) -> list[int]:
    """Token ids of ``reference`` as the assistant's reply to ``prompt``, through its EOS: the
    chat template rendered over prompt + reply, minus the prompt's own rendering, cut after the
    first EOS. A template whose rendering of the prompt is not a prefix of that falls back to
    the reply's text + EOS."""
    if getattr(tokenizer, "chat_template", None):
        full = tokenizer.apply_chat_template(
            [*prompt, {"role": "assistant", "content": reference}],
            tokenize=True,
            return_dict=False,
        )
        full = [int(t) for t in full]
        reply = full[len(prompt_ids) :]
        if full[: len(prompt_ids)] == list(prompt_ids) and reply:
            # a template may add text after the end of turn ("\n"): not the model's to say
            eos = tokenizer.eos_token_id
            return reply[: reply.index(eos) + 1] if eos in reply else reply
    ids = tokenizer(reference, add_special_tokens=False)["input_ids"]
    return [*ids, tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else ids
