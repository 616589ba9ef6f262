"""builtin:tiny: a cached, plainly loadable, briefly pretrained Qwen2 with a task tokenizer.

The model is built once per cache ($ALIGNKIT_CACHE, default ~/.cache/alignkit; ~15 s on
2 cores) and shared with every other test that uses it; the cache logic itself is tested
with a trivial build in a temporary folder.
"""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignkit.builtin import ensure_tiny_model, task, tiny


@pytest.fixture(scope="module")
def tiny_dir() -> Path:
    return ensure_tiny_model()


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


def test_ensure_cached_builds_once_atomically(tmp_path):
    calls = []

    def build(out: Path) -> None:
        calls.append(out)
        time.sleep(0.2)  # long enough for the other thread to wait on the lock
        (out / "done.txt").write_text("ok")

    final = tmp_path / "cache" / "thing-v1"
    threads = [threading.Thread(target=tiny.ensure_cached, args=(final, build)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and calls[0] != final
    assert (final / "done.txt").read_text() == "ok"
    assert tiny.ensure_cached(final, build) == final and len(calls) == 1
    assert sorted(p.name for p in final.parent.iterdir()) == [".thing-v1.lock", "thing-v1"]


def test_failed_build_leaves_nothing(tmp_path):
    def build(out: Path) -> None:
        (out / "half.txt").write_text("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        tiny.ensure_cached(tmp_path / "x-v1", build)
    assert [p.name for p in tmp_path.iterdir()] == [".x-v1.lock"]


def test_cached_folder(tiny_dir, monkeypatch):
    assert tiny_dir.name == f"tiny-{tiny.VERSION}"
    start = time.perf_counter()
    assert ensure_tiny_model() == tiny_dir
    assert time.perf_counter() - start < 0.5
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (tiny_dir / name).is_file(), name
    assert (
        "{% generation %}"
        in json.loads((tiny_dir / "tokenizer_config.json").read_text())["chat_template"]
    )
    meta = json.loads((tiny_dir / "meta.json").read_text())
    assert meta["version"] == tiny.VERSION and meta["build_seconds"] > 0
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tiny_dir.parent.parent))
    assert tiny.cache_root() == tiny_dir.parent.parent


def test_loads_with_plain_transformers(tiny_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.config.tie_word_embeddings and model.config.hidden_size == 128
    assert model.config.vocab_size == len(tokenizer)  # no token beyond the embeddings
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.eos_token == "<|end|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.bos_token is None and tokenizer.unk_token is None
    assert model.config.eos_token_id == model.generation_config.eos_token_id
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer("river is lovely").input_ids[-1] != tokenizer.eos_token_id  # no auto EOS


def test_every_task_word_is_one_token(tokenizer):
    for word in task.all_words():
        assert len(tokenizer(word).input_ids) == 1, word
        assert len(tokenizer(" " + word).input_ids) == 1, word
    for special in tiny.SPECIAL_TOKENS:
        assert len(tokenizer(special).input_ids) == 1, special


def test_chat_template_and_assistant_mask(tokenizer):
    messages = [
        {"role": "user", "content": "Topic: river garden"},
        {"role": "assistant", "content": "the river is lovely."},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert (
        text == "<|user|>\nTopic: river garden<|end|>\n<|assistant|>\nthe river is lovely.<|end|>\n"
    )
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>\nTopic: river garden<|end|>\n<|assistant|>\n"
    out = tokenizer.apply_chat_template(
        messages, return_assistant_tokens_mask=True, return_dict=True, tokenize=True
    )
    masked = [i for i, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(masked) == "the river is lovely.<|end|>"
    assert masked == tokenizer("the river is lovely.<|end|>").input_ids


def test_pretraining_did_something(tiny_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    texts = task.pretraining_texts(64, seed=10_000)  # not the seed it was trained on
    batch = tokenizer([t + tokenizer.eos_token for t in texts], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        loss = model(**batch, labels=labels).loss.item()
    assert loss < math.log(len(tokenizer)) - 1.5  # ln V = 6.67; ~4.7 after pretraining
