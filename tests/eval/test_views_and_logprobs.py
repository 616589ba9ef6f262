"""AdapterView switches adapters without changing what trains; sequence_logprobs matches what
the HF engine recorded while sampling."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from alignkit.builtin import load_builtin
from alignkit.eval import AdapterView, sequence_logprobs
from alignkit.rollouts.hf import HFEngine
from alignkit.rollouts.types import SamplingConfig

PROMPTS = [[{"role": "user", "content": r["prompt"]}] for r in load_builtin("prompts", "test")[:6]]


def randomize_lora(model, adapter: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name and f".{adapter}." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


@pytest.fixture()
def two_adapters(tiny):
    """A fresh peft model on a copy of the base: 'default' (trainable) and 'ref' (frozen)."""
    base, tokenizer = tiny
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    model = get_peft_model(copy.deepcopy(base), config)
    model.add_adapter("ref", config)
    randomize_lora(model, "default", 0)
    randomize_lora(model, "ref", 1)
    for name, p in model.named_parameters():
        p.requires_grad_(".default." in name)
    return model, tokenizer


def logits(model, tokenizer, view: AdapterView) -> torch.Tensor:
    enc = tokenizer(["alpha beta gamma river"], return_tensors="pt")
    with torch.no_grad(), view.active() as net:
        return net(**enc).logits


def test_views_select_adapters_and_leave_trainable_set_alone(two_adapters, tiny):
    model, tokenizer = two_adapters
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    policy = logits(model, tokenizer, AdapterView(model, "default"))
    reference = logits(model, tokenizer, AdapterView(model, "ref"))
    base = logits(model, tokenizer, AdapterView.base_of(model))
    assert (policy - reference).abs().max() > 1e-3
    assert torch.equal(base, logits(tiny[0], tokenizer, AdapterView(tiny[0])))  # the plain base
    with torch.no_grad():
        assert torch.equal(
            policy, model(**tokenizer(["alpha beta gamma river"], return_tensors="pt")).logits
        )
    assert model.active_adapter == "default"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == trainable
    with pytest.raises(ValueError, match="no adapter 'value'"):
        logits(model, tokenizer, AdapterView(model, "value"))
    with pytest.raises(TypeError, match="needs a peft model"):
        logits(tiny[0], tokenizer, AdapterView(tiny[0], "ref"))


@pytest.mark.parametrize("frozen", [False, True])
def test_requires_grad_is_kept_inside_and_after_the_block(two_adapters, frozen):
    """peft's set_adapter would make 'ref' trainable inside and 'default' trainable after."""
    model, _ = two_adapters
    if frozen:  # e.g. evaluating after training, everything frozen
        model.requires_grad_(False)
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    for view in (AdapterView(model, "ref"), AdapterView.base_of(model)):
        with view.active():
            assert {n: p.requires_grad for n, p in model.named_parameters()} == trainable
        assert {n: p.requires_grad for n, p in model.named_parameters()} == trainable
    with pytest.raises(RuntimeError), AdapterView(model, "ref").active():
        raise RuntimeError("boom")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == trainable
    assert model.active_adapter == "default"


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_scored_logprobs_equal_the_engines_recorded_ones(two_adapters, temperature):
    model, tokenizer = two_adapters
    view = AdapterView(model, "ref")  # not the active adapter: the view must switch
    cfg = SamplingConfig(n=3, max_new_tokens=20, temperature=temperature, logprobs=True, seed=5)
    with view.active() as net:
        batch = HFEngine(net, tokenizer, batch_size=8).generate(PROMPTS, cfg)
    scored = sequence_logprobs(
        view, batch.sample_prompt_ids(), batch.completion_ids, temperature=temperature, batch_size=5
    )
    assert len({len(c) for c in batch.completion_ids}) > 1  # ragged: padding is exercised
    for recorded, ours in zip(batch.logprobs, scored, strict=True):
        assert ours.shape == (len(recorded),)
        assert (ours - torch.tensor(recorded)).abs().max() < 1e-4


def test_scores_do_not_depend_on_batching(tiny):
    model, tokenizer = tiny
    prompts = [[1, 5, 9, 12], [7, 8], [3, 4, 5, 6, 7, 8, 9]]
    completions = [[20, 21, 22], [30], [40, 41, 42, 43, 44]]
    together = sequence_logprobs(model, prompts, completions, batch_size=3)
    alone = [
        sequence_logprobs(model, [p], [c])[0] for p, c in zip(prompts, completions, strict=True)
    ]
    for a, b in zip(together, alone, strict=True):
        assert (a - b).abs().max() < 1e-5
