"""``builtin:tiny``: a small Qwen2 model with a tokenizer trained on the builtin task's text.

It stands in for a pretrained Hub base on machines without a hub: built on first use (a
byte-level BPE tokenizer, a seeded Qwen2 init, then a brief full-parameter pretraining on
plain word sequences of the task's vocabulary, see :func:`~alignkit.builtin.task.pretraining_texts`)
and cached under ``$ALIGNKIT_CACHE/builtin/tiny-<version>``. The folder is an ordinary
``save_pretrained`` directory: plain ``AutoModelForCausalLM`` / ``AutoTokenizer`` load it.
The pretraining loop is a few lines of torch by hand: it runs once, on CPU, and needs no trainer.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from alignkit.builtin import task
from alignkit.errors import UserError

logger = logging.getLogger(__name__)

VERSION = "v2"  # bump whenever the recipe below changes: the cache folder is keyed on it
SEED = 1234
SPECIAL_TOKENS = ("<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>")
PAD, EOS = "<|pad|>", "<|end|>"

# Turns render as "<|role|>\n{content}<|end|>\n"; an assistant turn's content and its <|end|>
# sit in a generation block so TRL's assistant_only_loss (and return_assistant_tokens_mask)
# can find them.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{%- elif message['role'] in ['user', 'system'] -%}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{%- else -%}"
    "{{ raise_exception('builtin:tiny knows the roles system, user and assistant, not '"
    " + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}"
)

# Model shape and pretraining recipe (builtin-task-facts.md, second prototype).
MODEL_SHAPE = dict(
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=512,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)
# Every document starts with a newline, so the model learns to predict a text's first word after
# one, as the chat template asks it to ("<|assistant|>\n" + answer). Without it the first word of
# a document is never a target: 46% of the SFT policy's samples then began with a word fragment
# ("erous", "ain", a stray byte), the no-space tokens BPE keeps as pieces of longer words.
DOC_START = "\n"
PRETRAIN_STEPS = 400  # loss is flat from ~100 steps, but the tail on unseen tokens keeps falling
PRETRAIN_BATCH = 32
PRETRAIN_LR = 3e-3
PRETRAIN_WARMUP = 20
EXPECTED_BUILD_SECONDS = 25


#: Texts of ``builtin:pretraining``'s test split: held out from pretraining (another seed).
HELDOUT_TEXTS = 2000


def pretraining(split: str) -> list[dict]:
    """``builtin:pretraining``: plain text rows ``{"text"}`` as ``builtin:tiny`` learned them
    (``DOC_START`` + text; the EOS is the trainer's to add). ``train``: the very texts it was
    pretrained on; ``test``: texts of the same distribution it never saw (forgetting is
    measured there)."""
    if split not in task.SPLITS:
        raise UserError(f"unknown builtin split {split!r}; valid splits: {', '.join(task.SPLITS)}")
    if split == "train":
        texts = task.pretraining_texts(PRETRAIN_STEPS * PRETRAIN_BATCH, seed=SEED)
    else:
        texts = task.pretraining_texts(HELDOUT_TEXTS, seed=SEED + 1)
    return [{"text": DOC_START + t} for t in texts]


def cache_root() -> Path:
    """``$ALIGNKIT_CACHE``, default ``~/.cache/alignkit``."""
    return Path(os.environ.get("ALIGNKIT_CACHE") or Path.home() / ".cache" / "alignkit")


def ensure_tiny_model() -> Path:
    """The directory of ``builtin:tiny``, building and caching it on first use."""
    return ensure_cached(cache_root() / "builtin" / f"tiny-{VERSION}", build_tiny_model)


def ensure_cached(final_dir: Path, build: Callable[[Path], None]) -> Path:
    """Return ``final_dir``, first filling it with ``build(tmp_dir)`` if it does not exist.

    The build writes into a temporary sibling that is renamed into place, so a reader never
    sees half a folder; a lock file makes concurrent processes (e.g. ranks under
    ``accelerate launch``) wait for the one that builds.
    """
    if final_dir.is_dir():
        return final_dir
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(final_dir.parent / f".{final_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if final_dir.is_dir():  # another process built it while we waited
                return final_dir
            tmp_dir = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}-", dir=final_dir.parent))
            try:
                tmp_dir.chmod(0o755)  # mkdtemp makes it private; the cache is readable by all
                build(tmp_dir)
                os.replace(tmp_dir, final_dir)
            except BaseException:
                shutil.rmtree(tmp_dir, ignore_errors=True)
                raise
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return final_dir


def build_tokenizer():
    """A byte-level BPE over the task's text (every task word one token), with chat template.

    Built as a ``Qwen2Tokenizer`` because that is what ``AutoTokenizer`` makes of any folder
    whose config says ``qwen2``: it rebuilds the BPE from vocab and merges with Qwen2's
    normalizer and pre-tokenizer, so we train with exactly those and the tokenizer we build is
    the one that loads. ``unk_token=None`` is explicit: Qwen2Tokenizer's default would add an
    ``<|endoftext|>`` token beyond the model's vocabulary.
    """
    # torch, tokenizers, transformers (seconds): only when builtin:tiny is first built, not to read its path
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers.trainers import BpeTrainer
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    words = task.all_words()
    # Each word both at a line start and after a space, so both forms become single tokens.
    corpus = [" ".join(words), "\n".join(words)]
    corpus += [row["prompt"] for row in task.prompts("train", 2000)]
    corpus += [row["messages"][1]["content"] for row in task.sft("train", 2000)]
    corpus += task.pretraining_texts(2000, seed=SEED)
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=1000,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    trained = json.loads(bpe.to_str())["model"]
    tokenizer = Qwen2Tokenizer(
        vocab=trained["vocab"],
        merges=[tuple(merge) for merge in trained["merges"]],
        unk_token=None,
        bos_token=None,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=[t for t in SPECIAL_TOKENS if t not in (PAD, EOS)],
        chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL_SHAPE["max_position_embeddings"],
    )
    if len(tokenizer) != bpe.get_vocab_size():
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens, BPE {bpe.get_vocab_size()}")
    return tokenizer


def build_tiny_model(out_dir: Path) -> None:
    """Tokenizer, seeded Qwen2 init, brief pretraining; saved into ``out_dir``."""
    # torch, tokenizers, transformers (seconds): only when builtin:tiny is first built, not to read its path
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    logger.info("building builtin:tiny (one-time, ~%d s) ...", EXPECTED_BUILD_SECONDS)
    start = time.perf_counter()
    tokenizer = build_tokenizer()
    eos_id, pad_id = tokenizer.convert_tokens_to_ids([EOS, PAD])
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        **MODEL_SHAPE,
    )
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state as it was
        torch.manual_seed(SEED)
        torch.set_num_threads(max(1, min(threads, len(os.sched_getaffinity(0)))))
        try:
            model = Qwen2ForCausalLM(config)
            loss = pretrain(model, tokenizer)
        finally:
            torch.set_num_threads(threads)
    model.generation_config = GenerationConfig(
        eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=None
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
    seconds = time.perf_counter() - start
    meta = {
        "name": "builtin:tiny",
        "version": VERSION,
        "seed": SEED,
        "parameters": sum(p.numel() for p in model.parameters()),
        "pretrain_steps": PRETRAIN_STEPS,
        "pretrain_final_loss": round(loss, 4),
        "build_seconds": round(seconds, 2),
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    logger.info("built builtin:tiny in %.1f s (pretraining loss %.3f)", seconds, loss)


def pretrain(model, tokenizer, steps: int = PRETRAIN_STEPS) -> float:
    """Full-parameter next-token training on plain task text + EOS; returns the final loss.

    AdamW with linear warmup and cosine decay; the reported loss is the mean of the last
    20 steps (padding excluded from the loss).
    """
    import torch  # as above: only when the model is built

    texts = task.pretraining_texts(steps * PRETRAIN_BATCH, seed=SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR, weight_decay=0.01)

    def lr_factor(step: int) -> float:
        if step < PRETRAIN_WARMUP:
            return (step + 1) / PRETRAIN_WARMUP
        progress = (step - PRETRAIN_WARMUP) / max(1, steps - PRETRAIN_WARMUP)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    losses = []
    for step in range(steps):
        docs = [
            DOC_START + t + tokenizer.eos_token
            for t in texts[step * PRETRAIN_BATCH :][:PRETRAIN_BATCH]
        ]
        batch = tokenizer(docs, return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return sum(losses[-20:]) / len(losses[-20:])
