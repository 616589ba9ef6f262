"""alignkit compare and the eval stage, end to end on the builtin tiny model and task."""

import json

import jsonschema
import pytest
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from alignkit.cli import app
from alignkit.errors import UserError
from alignkit.eval.compare import compare_config, run_compare
from alignkit.eval.report import results_schema
from alignkit.models import merge_stage

PLOTS = ("reward_distributions.png", "win_rates.png", "reward_vs_kl.png")
SMALL = dict(prompts="builtin:prompts", split="test", max_prompts=32, n=2, max_new_tokens=24)


def check_outputs(out, results):
    """results.json validates, the PNGs are real images, report.md has its tables."""
    on_disk = json.loads((out / "results.json").read_text())
    jsonschema.validate(on_disk, results_schema())
    assert on_disk["comparisons"] == json.loads(json.dumps(results["comparisons"]))
    assert sorted(on_disk["plots"]) == sorted(PLOTS)
    for name in PLOTS:
        with Image.open(out / name) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 200
    report = (out / "report.md").read_text()
    assert "| model | reward | mean [95% CI] |" in report and "|---|---|---|" in report
    assert all(f"]({name})" in report for name in PLOTS)


@pytest.fixture(scope="module")
def merged_sft(trained_run, tmp_path_factory):
    """The SFT stage merged into a full model: the same function, loaded another way."""
    return merge_stage(trained_run / "sft", tmp_path_factory.mktemp("merged") / "merged")


@pytest.fixture(scope="module")
def self_comparison(trained_run, merged_sft, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "self"
    cfg = compare_config(
        base=str(merged_sft), aligned=[str(trained_run / "sft")], rewards=["gold"], out=out, **SMALL
    )
    return out, run_compare(cfg, Console(width=120))


def test_a_model_against_itself_is_a_coin_flip_with_zero_kl(self_comparison):
    out, results = self_comparison
    check_outputs(out, results)
    [c] = results["comparisons"]
    assert (c["model"], c["against"], c["reward"]) == ("sft", "base", "gold")
    assert c["ci_low"] <= 0.5 <= c["ci_high"] and c["p_value"] > 0.05
    sft = next(m for m in results["models"] if m["label"] == "sft")
    assert abs(sft["kl"]["per_token"]) < 1e-3 and sft["kl"]["against"] == "base"
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 32 * 2 and {r["model"] for r in rows} == {"sft", "base"}


def test_a_rerun_with_another_reward_loads_no_model(self_comparison, monkeypatch):
    import alignkit.rollouts as rollouts
    from alignkit.rollouts.hf import HFEngine

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded although every sample is cached")

    monkeypatch.setattr(rollouts, "load_engine", refuse)
    monkeypatch.setattr(HFEngine, "from_source", refuse)
    out, before = self_comparison
    cfg = compare_config(
        base=before["config"]["base"],
        aligned=before["config"]["aligned"],
        rewards=["gold", "length(max_words=12)"],
        out=out,
        **SMALL,
    )
    results = run_compare(cfg, Console(width=120))
    assert results["rewards"] == ["gold", "length(max_words=12)"]
    assert results["comparisons"][0] == before["comparisons"][0]  # same samples, same numbers
    check_outputs(out, results)


def test_head_to_head_without_a_base(trained_run, merged_sft, tmp_path):
    cfg = compare_config(
        aligned=[str(merged_sft), str(trained_run / "sft")],
        head_to_head=True,
        rewards=["gold"],
        out=tmp_path / "h2h",
        **SMALL,
    )
    results = run_compare(cfg, Console(width=120))
    [c] = results["comparisons"]
    assert (c["model"], c["against"]) == ("sft", "merged") and c["ci_low"] <= 0.5 <= c["ci_high"]
    assert abs(c["kl_per_sequence"]) < 1e-2
    assert results["base"] is None and all(m["kl"] is None for m in results["models"])
    jsonschema.validate(
        json.loads((tmp_path / "h2h" / "results.json").read_text()), results_schema()
    )


def test_eval_stage_shows_the_briefly_trained_sft_beating_the_base(trained_run):
    stage = trained_run / "eval"
    results = json.loads((stage / "results.json").read_text())
    check_outputs(stage, results)
    band = results["config"]["rewards"][1]  # the demonstrations' length band (conftest)
    [c] = [c for c in results["comparisons"] if c["reward"] == band]
    assert (c["model"], c["against"]) == ("sft", "base")
    assert c["ci_low"] > 0.5 and c["p_value"] < 0.01, c
    record = json.loads((stage / "stage.json").read_text())
    assert record["kind"] == "eval" and record["parent"] == "sft"
    metrics = record["metrics"]
    assert metrics[f"sft/{band}/win_rate/ci_low"] == c["ci_low"] > 0.5
    assert metrics["sft/kl"] > 0 and "sft/gold/mean" in metrics
    assert (stage / "generations" / "sft" / "rollouts-00000.jsonl").is_file()
    # builtin:sft prompts carry references: NLL (as the SFT stage measured it), BLEU, ROUGE-L
    models = {m["label"]: m for m in results["models"]}
    nll = {label: m["reference_nll"]["per_token"] for label, m in models.items()}
    sft_record = json.loads((trained_run / "sft" / "stage.json").read_text())["metrics"]
    assert nll["sft"] < nll["base"] - 0.1
    assert abs(nll["sft"] - sft_record["heldout_nll"]) < 0.15
    assert abs(nll["base"] - sft_record["heldout_nll_base"]) < 0.15
    assert all(0 <= m["bleu"] <= 100 and 0 <= m["rouge_l"] <= 1 for m in models.values())


def test_cli_prints_the_summary_from_the_cache(self_comparison):
    out, results = self_comparison
    args = ["compare", "--base", results["config"]["base"], "--out", str(out), "--reward", "gold"]
    args += ["--aligned", results["config"]["aligned"][0], "--prompts", "builtin:prompts"]
    args += ["--split", "test", "--max-prompts", "32", "--n", "2", "--max-new-tokens", "24"]
    result = CliRunner().invoke(app, args, terminal_width=160)
    assert result.exit_code == 0, result.output
    assert "compare: rewards" in result.output and "compare: drift and form" in result.output
    assert "│ gold" in result.output and "ROUGE-L" in result.output


def test_bad_configs_say_what_to_do(tmp_path):
    with pytest.raises(UserError, match="give base and at least one aligned model"):
        compare_config(aligned=["x"], prompts="builtin:prompts", rewards=["gold"], out=tmp_path)
    with pytest.raises(UserError, match="--reward: Field required"):
        compare_config(base="builtin:tiny", aligned=["x"], prompts="builtin:prompts", out=tmp_path)
    cfg = compare_config(
        base="builtin:tiny",
        aligned=["no/such/dir"],
        prompts="builtin:prompts",
        rewards=["gold"],
        out=tmp_path,
    )
    with pytest.raises(UserError, match="no/such/dir"):
        run_compare(cfg, Console())
    typo = tmp_path / "compare.yaml"
    typo.write_text("base: builtin:tiny\nalignd: [x]\nprompts: p\nrewards: [gold]\nout: o\n")
    with pytest.raises(UserError, match="alignd: unknown key \\(did you mean 'aligned'\\?\\)"):
        compare_config(typo)
