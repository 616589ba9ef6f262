"""Every number of a comparison, from the samples: the content of ``results.json``.

Per model: each reward's mean (95% bootstrap CI over prompts), spread and percentiles; response
length mean and percentiles; EOS rate; KL to the base per sequence (with a CI) and per token;
NLL of the reference answers; BLEU (sacrebleu) and ROUGE-L (rouge-score) against them.
Per comparison (model vs base, or head to head) and reward: win/tie/loss over prompts, the win
rate with its CI, sign-test and Wilcoxon p-values, the mean gain with its CI, and the examples
with the largest gains and losses.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import sacrebleu
from rouge_score import rouge_scorer

from alignkit import __version__
from alignkit.eval.scoring import ModelSamples
from alignkit.eval.stats import bootstrap_mean_ci, length_summary, paired_comparison, summarize

SCHEMA_VERSION = 1


def build_results(
    cfg,
    rows: list[dict],
    data: dict[str, ModelSamples],
    base: str | None,
    pairs,
    forgetting: dict[str, dict | None] | None = None,
) -> dict:
    """``forgetting``: per model label, what its stage recorded of forgetting (or ``None``)."""
    seed, resamples = cfg.seed, cfg.resamples
    models = [_model_metrics(s, rows, base, cfg) for s in data.values()]
    for m in models:
        m["forgetting"] = (forgetting or {}).get(m["label"])
    comparisons, examples = [], []
    for model, against in pairs:
        kl = data[model].kl(against)
        for reward in data[model].rewards:
            ours, theirs = (
                _prompt_means(data[model].rewards[reward]),
                _prompt_means(data[against].rewards[reward]),
            )
            result = paired_comparison(ours, theirs, resamples, seed)
            if result["n_prompts"] == 0:
                continue  # the reward applied to none of these samples
            comparisons.append(
                {
                    "model": model,
                    "against": against,
                    "reward": reward,
                    **result,
                    "kl_per_sequence": None if kl is None else float(kl.mean()),
                }
            )
            if cfg.examples:
                examples += _examples(
                    rows, data[model], data[against], reward, ours - theirs, cfg.examples
                )
    return {
        "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "alignkit_version": __version__,
        "config": cfg.model_dump(mode="json"),
        "base": base,
        "n_prompts": len(rows),
        "samples_per_prompt": cfg.n,
        "rewards": list(next(iter(data.values())).rewards),
        "models": models,
        "comparisons": comparisons,
        "examples": examples,
    }


def _prompt_means(per_sample: np.ndarray) -> np.ndarray:
    """Mean over each prompt's samples, ignoring NaN (NaN where none was scored)."""
    counts = (~np.isnan(per_sample)).sum(axis=1)
    sums = np.nansum(per_sample, axis=1)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def _model_metrics(s: ModelSamples, rows: list[dict], base: str | None, cfg) -> dict:
    out: dict = {
        "label": s.label,
        "role": "base" if s.label == base else "aligned",
        "rewards": {
            name: summarize(values, cfg.resamples, cfg.seed) for name, values in s.rewards.items()
        },
        "length": length_summary(s.tokens),
        "eos_rate": float(s.eos.mean()),
        "kl": None,
        "reference_nll": None,
        "bleu": None,
        "rouge_l": None,
    }
    kl = s.kl(base) if base and s.label != base else None
    if kl is not None:
        low, high = bootstrap_mean_ci(kl.mean(axis=1), cfg.resamples, cfg.seed)
        out["kl"] = {
            "against": base,
            "per_sequence": {"mean": float(kl.mean()), "ci_low": low, "ci_high": high},
            "per_token": float(kl.sum() / max(int(s.tokens.sum()), 1)),
        }
    if s.reference_nll is not None:
        nll, tokens = s.reference_nll[:, 0], s.reference_nll[:, 1]
        known = tokens > 0
        out["reference_nll"] = {
            "per_token": float(nll[known].sum() / tokens[known].sum()),
            "per_sequence": float(nll[known].mean()),
            "n_references": int(known.sum()),
        }
        out["bleu"], out["rouge_l"] = _overlap(rows, s)
    return out


def _overlap(rows: list[dict], s: ModelSamples) -> tuple[float | None, float | None]:
    """Corpus BLEU (sacrebleu, 0-100) and mean ROUGE-L F1 (rouge-score, 0-1) of every sample
    against its prompt's reference."""
    logging.getLogger("absl").setLevel(
        logging.WARNING
    )  # rouge-score logs every tokenizer it builds

    n = len(s.rows) // len(rows)
    pairs = [
        (s.rows[i * n + j]["completion"], row["reference"])
        for i, row in enumerate(rows)
        if row["reference"]
        for j in range(n)
    ]
    if not pairs:
        return None, None
    hypotheses, references = zip(*pairs, strict=True)
    bleu = sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = np.mean([scorer.score(r, h)["rougeL"].fmeasure for h, r in pairs])
    return float(bleu), float(rouge)


def _examples(
    rows, model: ModelSamples, against: ModelSamples, reward: str, gain, k: int
) -> list[dict]:
    """The ``k`` prompts with the largest gains and the ``k`` with the largest losses (first
    sample of each model shown)."""
    order = np.argsort(gain, kind="stable")
    picks = [("gain", i) for i in order[::-1][:k] if gain[i] > 0]
    picks += [("loss", i) for i in order[:k] if gain[i] < 0]
    n = model.rewards[reward].shape[1]
    return [
        {
            "model": model.label,
            "against": against.label,
            "reward": reward,
            "kind": kind,
            "prompt_id": rows[i]["id"],
            "prompt": _prompt_text(rows[i]["prompt"]),
            "gain": float(gain[i]),
            "model_completion": model.rows[i * n]["completion"],
            "model_reward": float(model.rewards[reward][i, 0]),
            "against_completion": against.rows[i * n]["completion"],
            "against_reward": float(against.rewards[reward][i, 0]),
        }
        for kind, i in picks
    ]


def _prompt_text(messages: list[dict]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def write_samples(out: Path, rows: list[dict], data: dict[str, ModelSamples]) -> Path:
    """``samples.jsonl``: one line per model and sample, with its rewards and KL to each model
    it was scored under."""
    path = Path(out) / "samples.jsonl"
    tmp = path.with_name(".samples.jsonl.tmp")
    with tmp.open("w") as f:
        for s in data.values():
            n = len(s.rows) // len(rows)
            kls = {b: s.kl(b) for b in s.logprobs if b != s.label}
            for k, r in enumerate(s.rows):
                i, j = divmod(k, n)
                record = {
                    "model": s.label,
                    "prompt_id": r["prompt_id"],
                    "prompt": _prompt_text(rows[i]["prompt"]),
                    "sample": r["sample"],
                    "completion": r["completion"],
                    "tokens": int(s.tokens[i, j]),
                    "finish_reason": r["finish_reason"],
                    "rewards": {name: _num(v[i, j]) for name, v in s.rewards.items()},
                    "kl": {b: _num(v[i, j]) for b, v in kls.items() if v is not None},
                }
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def _num(v) -> float | None:
    return None if np.isnan(v) else float(v)
