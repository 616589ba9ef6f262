"""The HF engine on the builtin tiny model: shapes, finish reasons, seeds, log-probs, sampling."""

from __future__ import annotations

import pytest
import torch
from tokenizers.processors import TemplateProcessing

from alignkit.errors import UserError
from alignkit.rollouts.hf import HFEngine
from alignkit.rollouts.types import SamplingConfig, encode_prompts

EOS = 1  # builtin:tiny: <|end|>; pad is 0


def recomputed_logits(engine, batch, k):
    """Logits for completion k from a fresh forward over prompt + completion, left padded, with
    position ids from the attention mask. ``(len(completion), vocab)``."""
    prompt = batch.prompt_ids[batch.prompt_index(k)]
    completion = batch.completion_ids[k]
    pad = 5  # left padding must not change anything
    ids = torch.tensor([[0] * pad + prompt + completion])
    mask = torch.tensor([[0] * pad + [1] * (len(prompt) + len(completion))])
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = engine.model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
    start = pad + len(prompt) - 1
    return logits[0, start : start + len(completion)].float()


def test_n_samples_per_prompt_with_correct_finish_reasons(tiny_engine, test_prompts):
    batch = tiny_engine.generate(test_prompts, SamplingConfig(n=3, max_new_tokens=24))
    assert len(batch) == 3 * len(test_prompts) and len(batch.prompt_ids) == len(test_prompts)
    reasons = set(batch.finish_reason)
    assert reasons == {"stop", "length"}  # both happen at 24 tokens on this model
    for ids, reason, text in zip(
        batch.completion_ids, batch.finish_reason, batch.completion_text, strict=True
    ):
        if reason == "stop":
            assert ids[-1] == EOS and EOS not in ids[:-1]
        else:
            assert len(ids) == 24 and EOS not in ids
        assert "<|end|>" not in text and "<|pad|>" not in text
    # prompt-major: sample j of prompt i sits at i * n + j
    one = tiny_engine.generate(test_prompts[2:3], SamplingConfig(n=3, max_new_tokens=24))
    assert one.prompt_ids[0] == batch.prompt_ids[2]


def test_seeded_sampling_is_reproducible_and_leaves_global_rng_alone(tiny_engine, test_prompts):
    cfg = SamplingConfig(n=2, max_new_tokens=16, seed=7)
    state = torch.get_rng_state()
    a = tiny_engine.generate(test_prompts, cfg)
    assert torch.equal(state, torch.get_rng_state())
    b = tiny_engine.generate(test_prompts, cfg)
    c = tiny_engine.generate(test_prompts, cfg.model_copy(update={"seed": 8}))
    assert a.completion_ids == b.completion_ids
    assert a.completion_ids != c.completion_ids


def test_greedy_is_identical_between_batch_sizes_1_and_8(tiny_engine, test_prompts):
    cfg = SamplingConfig(temperature=0, max_new_tokens=32)
    one = HFEngine(tiny_engine.model, tiny_engine.tokenizer, batch_size=1)
    eight = HFEngine(tiny_engine.model, tiny_engine.tokenizer, batch_size=8)
    a, b = one.generate(test_prompts, cfg), eight.generate(test_prompts, cfg)
    assert a.completion_ids == b.completion_ids
    assert len({len(p) for p in a.prompt_ids}) > 1  # the batch of 8 really was padded


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 20, 1.0), (1.3, 0, 0.9)])
def test_logprobs_equal_a_recomputed_forward(tiny_engine, test_prompts, temperature, top_k, top_p):
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    cfg = SamplingConfig(
        n=2, max_new_tokens=20, logprobs=True, temperature=temperature, top_k=top_k, top_p=top_p
    )
    batch = tiny_engine.generate(test_prompts[:4], cfg)
    worst = 0.0
    for k in range(len(batch)):
        scores = recomputed_logits(tiny_engine, batch, k) / temperature
        if top_k:
            scores = TopKLogitsWarper(top_k)(None, scores)
        if top_p < 1:
            scores = TopPLogitsWarper(top_p)(None, scores)
        expected = torch.log_softmax(scores, -1).gather(
            1, torch.tensor(batch.completion_ids[k])[:, None]
        )
        assert len(batch.logprobs[k]) == len(batch.completion_ids[k])
        worst = max(worst, (expected[:, 0] - torch.tensor(batch.logprobs[k])).abs().max().item())
    assert worst < 1e-4


def test_top_k_zero_samples_outside_the_top_50(tiny_engine, test_prompts):
    def ranks(cfg):
        batch = tiny_engine.generate(test_prompts, cfg)
        out = []
        for k in range(len(batch)):
            logits = recomputed_logits(tiny_engine, batch, k)
            chosen = logits.gather(1, torch.tensor(batch.completion_ids[k])[:, None])
            out += (logits > chosen).sum(1).tolist()  # 0 = the most likely token
        return out

    assert max(ranks(SamplingConfig(n=4, max_new_tokens=24, top_k=0))) >= 50
    assert max(ranks(SamplingConfig(n=4, max_new_tokens=24, top_k=5))) < 5


def test_the_models_generation_config_does_not_leak_into_sampling(tiny_engine, test_prompts):
    cfg = SamplingConfig(n=2, max_new_tokens=16, seed=3)
    clean = tiny_engine.generate(test_prompts, cfg)
    gen_cfg = tiny_engine.model.generation_config
    gen_cfg.top_k, gen_cfg.repetition_penalty = 1, 1.5
    try:
        dirty = tiny_engine.generate(test_prompts, cfg)
    finally:
        gen_cfg.top_k, gen_cfg.repetition_penalty = None, None
    assert dirty.completion_ids == clean.completion_ids


def test_stop_strings_and_stop_ids(tiny_engine, test_prompts):
    batch = tiny_engine.generate(test_prompts, SamplingConfig(n=4, max_new_tokens=40, stop=["."]))
    assert not any("." in t for t in batch.completion_text)
    assert "stop" in batch.finish_reason
    word = tiny_engine.tokenizer.convert_tokens_to_ids("Ġthe")
    cfg = SamplingConfig(n=4, max_new_tokens=40, stop_token_ids=[word])
    batch = tiny_engine.generate(test_prompts, cfg)
    stopped = [
        ids for ids, r in zip(batch.completion_ids, batch.finish_reason, strict=True) if r == "stop"
    ]
    assert any(ids[-1] == word for ids in stopped)
    assert all(word not in ids[:-1] for ids in batch.completion_ids)


def test_eos_is_kept_when_pad_equals_eos(tiny_engine, test_prompts):
    import copy

    tok = copy.deepcopy(tiny_engine.tokenizer)
    tok.pad_token = "<|end|>"
    engine = HFEngine(tiny_engine.model, tok, batch_size=32)
    batch = engine.generate(test_prompts, SamplingConfig(n=2, max_new_tokens=40))
    for ids, reason in zip(batch.completion_ids, batch.finish_reason, strict=True):
        assert (ids[-1] == EOS) == (reason == "stop")


def test_messages_and_token_ids_give_the_same_rollouts(tiny_engine, test_prompts):
    cfg = SamplingConfig(n=2, max_new_tokens=16)
    ids = encode_prompts(tiny_engine.tokenizer, test_prompts)
    assert (
        tiny_engine.generate(ids, cfg).completion_ids
        == tiny_engine.generate(test_prompts, cfg).completion_ids
    )
    with pytest.raises(UserError, match="message list"):
        tiny_engine.generate(["Topic: river"], cfg)


def test_template_prefix_and_bos_appear_exactly_once(tiny_engine, test_prompts):
    import copy

    tok = tiny_engine.tokenizer
    for ids in encode_prompts(tok, test_prompts):
        assert ids.count(tok.convert_tokens_to_ids("<|user|>")) == 1
        assert ids.count(tok.convert_tokens_to_ids("<|assistant|>")) == 1
    # A tokenizer that adds BOS on every encode and whose template also starts with BOS
    # (Llama-style): re-tokenizing the rendered string would give two.
    bos_tok = copy.deepcopy(tok)
    bos_tok.bos_token = "<|system|>"
    bos = bos_tok.bos_token_id
    bos_tok._tokenizer.post_processor = TemplateProcessing(
        single="<|system|> $A", special_tokens=[("<|system|>", bos)]
    )
    bos_tok.chat_template = "{{ bos_token }}" + tok.chat_template
    rendered = bos_tok.apply_chat_template(
        test_prompts[0], add_generation_prompt=True, tokenize=False
    )
    assert bos_tok(rendered)["input_ids"].count(bos) == 2  # the trap
    assert encode_prompts(bos_tok, test_prompts[:1])[0].count(bos) == 1
