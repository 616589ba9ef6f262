"""A comparison's outputs for people: ``results.json`` (validated against
``results.schema.json``), ``report.md`` and the summary table on the console (rich)."""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path

import jsonschema
from rich.console import Console
from rich.table import Table

from alignkit.rundir import write_json_atomic

SCHEMA_FILE = "results.schema.json"


def results_schema() -> dict:
    return json.loads(resources.files("alignkit.eval").joinpath(SCHEMA_FILE).read_text())


def validate_results(results: dict) -> None:
    """Raise ``jsonschema.ValidationError`` when ``results`` does not fit the schema."""
    jsonschema.validate(results, results_schema())


def write_results(out: Path, results: dict) -> Path:
    """Validate, then write ``results.json`` (a NaN, e.g. a reward that never applied, is null)."""
    clean = _no_nan(results)
    validate_results(clean)
    path = Path(out) / "results.json"
    write_json_atomic(path, clean)
    return path


def _no_nan(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return value


# --- the summary tables (console and markdown share their rows) --------------------------------


def reward_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """One row per model and reward: mean [CI] and the win rate vs the base [CI], p."""
    base = results["base"]
    header = ["model", "reward", "mean [95% CI]"]
    header += [f"win rate vs {base} [95% CI]", "p"] if base else []
    wins = {(c["model"], c["reward"]): c for c in results["comparisons"] if c["against"] == base}
    rows = []
    for m in results["models"]:
        for reward in results["rewards"]:
            r = m["rewards"][reward]
            row = [
                _model(m),
                reward_label(reward),
                f"{_f(r['mean'])} [{_f(r['ci_low'])}, {_f(r['ci_high'])}]",
            ]
            c = wins.get((m["label"], reward))
            if base:
                row += (
                    [
                        f"{_f(c['win_rate'], 2)} [{_f(c['ci_low'], 2)}, {_f(c['ci_high'], 2)}]",
                        _p(c["p_value"]),
                    ]
                    if c
                    else ["-", "-"]
                )
            rows.append(row)
    return header, rows


def drift_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """One row per model: KL to the base, length, EOS rate, reference NLL, BLEU, ROUGE-L."""
    header = [
        "model",
        "KL/seq [CI]",
        "KL/tok",
        "length (p50/p90)",
        "EOS",
        "ref NLL",
        "BLEU",
        "ROUGE-L",
    ]
    rows = []
    for m in results["models"]:
        kl, length, nll = m["kl"], m["length"], m["reference_nll"]
        seq = kl["per_sequence"] if kl else None
        rows.append(
            [
                _model(m),
                f"{_f(seq['mean'], 2)} [{_f(seq['ci_low'], 2)}, {_f(seq['ci_high'], 2)}]"
                if seq
                else "-",
                _f(kl["per_token"], 4) if kl else "-",
                f"{_f(length['mean'], 1)} ({_f(length['p50'], 0)}/{_f(length['p90'], 0)})",
                _f(m["eos_rate"], 2),
                _f(nll["per_token"]) if nll else "-",
                _f(m["bleu"], 2) if m["bleu"] is not None else "-",
                _f(m["rouge_l"]) if m["rouge_l"] is not None else "-",
            ]
        )
    return header, rows


def comparison_rows(results: dict, code: bool = False) -> tuple[list[str], list[list[str]]]:
    """One row per comparison: wins/ties/losses, win rate [CI], both tests' p, gain [CI], KL
    (``code``: the reward as markdown code)."""
    header = ["model", "against", "reward", "wins / ties / losses", "win rate [95% CI]",
              "p (sign)", "p (Wilcoxon)", "gain [95% CI]", "KL/seq"]  # fmt: skip
    rows = [
        [
            c["model"],
            c["against"],
            f"`{c['reward']}`" if code else reward_label(c["reward"]),
            f"{c['wins']} / {c['ties']} / {c['losses']}",
            f"{_f(c['win_rate'], 3)} [{_f(c['ci_low'], 3)}, {_f(c['ci_high'], 3)}]",
            _p(c["p_value"]),
            _p(c["p_value_wilcoxon"]),
            f"{_f(c['gain']['mean'])} [{_f(c['gain']['ci_low'])}, {_f(c['gain']['ci_high'])}]",
            _f(c["kl_per_sequence"]) if c["kl_per_sequence"] is not None else "-",
        ]
        for c in results["comparisons"]
    ]
    return header, rows


def forgetting_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """One row per model whose stage measured forgetting: general-text NLL per token of the
    policy the stage started from and of its own (empty when none did)."""
    header = ["model", "general text", "NLL before", "NLL after", "change"]
    rows = [
        [
            _model(m),
            f"{f['source']} ({f['texts']} texts)",
            _f(f["nll_before"]),
            _f(f["nll_after"]),
            f"{f['increase']:+.3f}",
        ]
        for m in results["models"]
        if (f := m.get("forgetting"))
    ]
    return header, rows


def print_summary(results: dict, console: Console) -> None:
    title = f"{results['n_prompts']} prompts x {results['samples_per_prompt']} samples"
    tables = [("rewards", reward_rows(results)), ("drift and form", drift_rows(results))]
    if forgetting_rows(results)[1]:
        tables.append(("forgetting, from each stage's stage.json", forgetting_rows(results)))
    for name, (header, rows) in tables:
        table = Table(title=f"compare: {name} ({title})", show_edge=False)
        for col in header:
            table.add_column(col)
        for row in rows:
            table.add_row(*row)
        console.print(table)
    for c in results["comparisons"]:
        if c["against"] != results["base"]:
            console.print(
                f"head to head: {c['model']} vs {c['against']} ({reward_label(c['reward'])}): win rate "
                f"{_f(c['win_rate'], 2)} [{_f(c['ci_low'], 2)}, {_f(c['ci_high'], 2)}], p {_p(c['p_value'])}"
            )


def write_report(out: Path, results: dict) -> Path:
    cfg = results["config"]
    lines = [
        "# Aligned vs base",
        "",
        f"{results['n_prompts']} prompts from `{cfg['prompts']}`"
        + (f" (split `{cfg['split']}`)" if cfg.get("split") else "")
        + f", {results['samples_per_prompt']} samples per prompt and model, temperature "
        f"{cfg['temperature']}, top-p {cfg['top_p']}, at most {cfg['max_new_tokens']} new tokens, "
        f"seed {cfg['seed']}. Confidence intervals: 95% bootstrap over prompts "
        f"({cfg['resamples']} resamples). KL: nats, estimated from each model's own samples.",
        "",
        "## Summary",
        "",
        *_markdown_table(*reward_rows(results)),
        "",
        *_markdown_table(*drift_rows(results)),
        "",
        (f"KL: to `{results['base']}`, from each model's own samples. " if results["base"] else "")
        + "Length: completion tokens, EOS "
        "included. ref NLL: nats per token of the prompts' reference answers. BLEU (sacrebleu, "
        "0-100) and ROUGE-L F1 (rouge-score): samples against those references.",
        "",
        *_forgetting_section(results),
        "## Win rates",
        "",
        "A prompt is a win when the model's mean reward over its samples beats the other's; a tie counts half. "
        "p: two-sided sign test on wins vs losses; Wilcoxon: signed-rank test on the per-prompt differences.",
        "",
    ]
    lines += _markdown_table(*comparison_rows(results, code=True)) + [""]
    titles = {
        "reward_distributions.png": "Reward distributions",
        "win_rates.png": "Win rates",
        "reward_vs_kl.png": "Reward vs KL to the base",
    }
    lines += ["## Plots", ""] + [f"![{titles.get(p, p)}]({p})\n" for p in results.get("plots", [])]
    if results["examples"]:
        lines += [
            "## Examples: largest gains and losses",
            "",
            "Gain: the difference of the two models' mean rewards on the prompt; the first sample "
            "of each model is shown.",
            "",
        ]
        for e in results["examples"]:
            lines += [
                f"**{e['model']} vs {e['against']}, `{e['reward']}`, {e['kind']} {e['gain']:+.3f}** "
                f"(prompt `{e['prompt_id']}`)",
                "",
                "> " + e["prompt"].replace("\n", "\n> "),
                "",
                *_markdown_table(
                    ["", "first sample", "reward"],
                    [
                        [e["model"], _cell(e["model_completion"]), _f(e["model_reward"])],
                        [e["against"], _cell(e["against_completion"]), _f(e["against_reward"])],
                    ],
                ),
                "",
            ]
    path = Path(out) / "report.md"
    path.write_text("\n".join(lines))
    return path


def _forgetting_section(results: dict) -> list[str]:
    header, rows = forgetting_rows(results)
    if not rows:
        return []
    return [
        "## Forgetting",
        "",
        "Measured by each stage after training (its stage.json): NLL per token of general text, "
        "which no stage trains on, under the policy the stage started from (before) and under "
        "its own (after). A rise is what the stage cost the model outside its task.",
        "",
        *_markdown_table(header, rows),
        "",
    ]


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ") or " "


def _f(value, digits: int = 3) -> str:
    return (
        "n/a"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{value:.{digits}f}"
    )


def _p(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2g}" if value >= 1e-4 else "<1e-4"


def reward_label(name: str) -> str:
    """How tables name a reward: a reward-model path by its last part."""
    path = Path(name).expanduser()
    return path.resolve().name if path.is_dir() else name


def _model(m: dict) -> str:
    return m["label"] + (" (base)" if m["role"] == "base" and m["label"] != "base" else "")
