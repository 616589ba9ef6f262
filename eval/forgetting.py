"""Forgetting, measured: NLL per token of general text under the policy a stage started from and
under the one it trained.

Every policy stage calls :func:`forgetting_metrics` after training (see
:func:`alignkit.stages.common.forgetting_evaluation`). The texts are ones no stage trains on (the
builtin's held-out pretraining text, WikiText-2, or the user's file), so a rise in their NLL is
what the stage cost the model's language modelling elsewhere: catastrophic forgetting, as the
fine-tuning guides name it. Each text is scored from its second token on (its first, or the BOS
token the tokenizer adds, is the context), the same way for both models.
"""

from __future__ import annotations

import logging

from alignkit.config import ForgettingSpec
from alignkit.data.sft import load_sft
from alignkit.errors import UserError
from alignkit.eval.logprobs import sequence_logprobs
from alignkit.handoff import AdapterView

log = logging.getLogger(__name__)

#: General text for models other than builtin:tiny (the perplexity set most reports use).
DEFAULT_TEXT_SOURCE = "Salesforce/wikitext:wikitext-2-raw-v1"
BUILTIN_TEXT_SOURCE = "builtin:pretraining"


def general_texts(
    spec: ForgettingSpec, builtin_model: bool, where: str
) -> tuple[list[str], str] | None:
    """The texts ``spec`` names and the source they came from (``None`` when the default source
    for a non-builtin model cannot be loaded: a warning says so). A source the user named that
    cannot be read is a :class:`UserError`."""
    source = spec.source or (BUILTIN_TEXT_SOURCE if builtin_model else DEFAULT_TEXT_SOURCE)
    try:
        # general text sets have empty lines and headings: skip what is not text, quietly
        data = load_sft(source, spec.split, on_bad_rows="skip", max_bad_fraction=0.9)
    except UserError as e:
        if spec.source is not None:
            raise UserError(f"{where}.forgetting.source: {e}") from None
        log.warning(
            "%s: forgetting not measured: the default general text %s could not be loaded (%s); "
            "set forgetting.source to a local text file, or forgetting.enabled: false",
            where,
            source,
            str(e).splitlines()[0],
        )
        return None
    texts = [_text(row) for row in data.rows]
    texts = [t for t in texts if t.strip()][: spec.max_rows]
    if not texts:
        raise UserError(f"{where}.forgetting: {source} holds no text")
    return texts, source


def _text(row: dict) -> str:
    if "text" in row:
        return row["text"]
    return "\n".join(str(m["content"]) for m in row["messages"])


def general_text_nll(
    model: AdapterView, tokenizer, texts: list[str], max_length: int, batch_size: int = 8
) -> tuple[float, int]:
    """(mean NLL per token, tokens scored) of ``texts`` under ``model``. Memory per batch:
    ``batch_size x max_length x vocab`` floats."""
    prompts, completions = [], []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"][:max_length]
        if len(ids) >= 2:
            prompts.append(ids[:1])
            completions.append(ids[1:])
    if not completions:
        raise UserError("forgetting: every text is a single token; nothing to score")
    logps = sequence_logprobs(model, prompts, completions, batch_size=batch_size)
    tokens = sum(len(c) for c in completions)
    return -float(sum(lp.sum() for lp in logps)) / tokens, tokens


def forgetting_metrics(
    policy: AdapterView, start: AdapterView, tokenizer, texts: list[str], max_length: int
) -> dict[str, float]:
    """``forgetting_nll_before`` (the starting policy), ``forgetting_nll_after`` (the trained
    one), ``forgetting_nll_increase`` (after - before: > 0 is forgetting), ``forgetting_texts``,
    ``forgetting_tokens``."""
    before, tokens = general_text_nll(start, tokenizer, texts, max_length)
    after, _ = general_text_nll(policy, tokenizer, texts, max_length)
    return {
        "forgetting_nll_before": before,
        "forgetting_nll_after": after,
        "forgetting_nll_increase": after - before,
        "forgetting_texts": float(len(texts)),
        "forgetting_tokens": float(tokens),
    }
