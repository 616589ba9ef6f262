"""bench/ppo_vs_trl.py: its options, our side's stage config, the TRL child's timing and score
head, and the table + CSV. The trainers themselves run only in the slow smoke test."""

import csv
import importlib.util
import json
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load("ppo_vs_trl")
trl_side = _load("_trl_ppo")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch", "10", "--minibatches", "4"], "divisible"),
        (["--steps", "0"], "--steps must be positive"),
        (["--eval-prompts", "-1"], "--eval-prompts must be positive"),
    ],
)
def test_bad_options_exit_2_naming_the_option(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_our_side_is_a_valid_ppo_stage_with_the_shared_settings():
    from alignkit.stages.ppo import PPOStageConfig

    s = bench.settings(bench.parse_args(["--steps", "7", "--batch", "32", "--kl-coef", "0.1"]))
    cfg = PPOStageConfig.model_validate(bench.ours_config(s))
    assert (cfg.steps, cfg.prompts_per_step, cfg.kl_coef, cfg.adaptive_kl) == (7, 32, 0.1, False)
    assert cfg.reward_model == bench.RM and cfg.from_ == bench.SFT and not cfg.rewards
    assert (cfg.learning_rate, cfg.value_learning_rate) == (s["learning_rate"], 1e-3)


def test_trl_reward_head_gives_scores_in_our_normalised_units():
    model = types.SimpleNamespace(score=torch.nn.Linear(8, 1, bias=False))
    hidden = torch.randn(5, 8)
    raw = model.score(hidden)
    trl_side.normalised_score_head(model, mean=0.7, std=2.5)
    torch.testing.assert_close(model.score(hidden), (raw - 0.7) / 2.5)


def test_first_batch_statistics_are_the_population_std_our_ppo_normalises_with(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"score_mean": 1.5, "score_std": 2.0}) + "\n{}\n")
    args = bench.parse_args(["--batch", "4", "--minibatches", "2"])
    stats = bench.first_batch_statistics(metrics, args)
    assert stats == {"score_mean": 1.5, "score_std": pytest.approx(2.0 * (3 / 4) ** 0.5)}
    assert not args.trl_raw_scores
    assert bench.first_batch_statistics(tmp_path / "absent.jsonl", args) == {}
    assert args.trl_raw_scores  # without our run TRL is told it gets raw scores


def test_step_timer_splits_each_step_at_generation_end_and_first_gradient_pass():
    fake = types.SimpleNamespace(
        batch_generation=lambda: "gen",
        forward=lambda: "fwd",
        gc=types.SimpleNamespace(collect=lambda: time.sleep(0.01)),
    )
    timer = trl_side.StepTimer(fake)
    for _ in range(2):
        assert fake.batch_generation() == "gen"
        with torch.no_grad():
            fake.forward()  # scoring: no gradient
        fake.gc.collect()
        fake.forward()  # the update's first pass
        fake.forward()
        fake.gc.collect()  # TRL's clean-up after the step still belongs to it
    timer.close()
    assert len(timer.steps) == 2
    for st in timer.steps:
        parts = st["gen_seconds"] + st["score_seconds"] + st["update_seconds"]
        assert min(st.values()) >= 0 and parts == pytest.approx(st["step_seconds"])
        assert st["gc_seconds"] >= 0.02 and st["update_seconds"] >= 0.01


def test_a_failing_side_is_reported_with_its_last_error_line(capsys):
    cmd = [
        sys.executable,
        "-c",
        "import sys; print('trace', file=sys.stderr); sys.exit('ImportError: x')",
    ]
    assert bench._run(cmd, "trl", fatal=False) == {"error": "ImportError: x"}
    assert "trl failed (exit 1)" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="ImportError: x"):
        bench._run(cmd, "ours")
    ok = [sys.executable, "-c", "print('noise'); print('RESULT ' + '{\"a\": 1}')"]
    assert bench._run(ok, "eval") == {"a": 1}


def _side(step_seconds: float, peak: float, gold: float) -> dict:
    steps = [
        {"step_seconds": s, "gen_seconds": 0.1, "score_seconds": 0.2, "update_seconds": s - 0.3}
        for s in (10.0, step_seconds, step_seconds)
    ]
    return {
        "steps": steps,
        "peak_mib": peak,
        "train_seconds": 12.0,
        "eval_gold_reward": gold,
        "eval_gold_reward_ref": 0.1,
        "eval_gold_reward_gain_ci_low": gold - 0.15,
        "eval_gold_reward_gain_ci_high": gold - 0.05,
        "eval_reward": 2.0,
        "eval_reward_ref": 1.0,
        "eval_kl_ref": 1.234,
    }


def test_table_rows_skip_the_first_step_and_give_ratios_to_ours(tmp_path, capsys):
    rows = [
        bench.table_row("ours", _side(1.0, 500, 0.4)),
        bench.table_row("trl", _side(3.0, 750, 0.3)),
    ]
    rows.append(bench.table_row("trl", {"error": "no network"}))
    bench.add_ratios(rows)
    ours, trl, failed = rows
    assert ours["s_per_step"] == 1.0 and trl["s_per_step"] == 3.0  # step 1 (10 s) left out
    assert (ours["memory"], trl["memory"], trl["vs_ours_time"]) == ("1.00x", "1.50x", "3.00x")
    assert trl["gold_gain"] == 0.2 and trl["gold_gain_ci"] == "[+0.150, +0.250]"
    assert failed["s_per_step"] == "did not run" and failed["memory"] == ""
    bench.report(rows, tmp_path / "out.csv")
    with (tmp_path / "out.csv").open() as f:
        written = list(csv.DictReader(f))
    assert [r["trainer"] for r in written] == ["ours", "trl 1.12.0", "trl 1.12.0"]
    assert list(written[0]) == bench.COLUMNS and written[1]["kl_to_sft"] == "1.23"
    assert "PPO: ours vs TRL" in capsys.readouterr().out


@pytest.mark.slow
def test_trl_side_trains_two_steps_on_the_builtin_model(tmp_path):
    """TRL 1.12's trainer on this stack: the builtin base as both "SFT" and "RM" (untrained)."""
    if bench.ensure_trl_venv(bench.DEFAULT_VENV) is not None:
        pytest.skip("TRL 1.12's venv could not be built (offline?)")
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from alignkit.builtin.tiny import ensure_tiny_model
    from alignkit.models import load_tokenizer

    path = ensure_tiny_model()
    tokenizer = load_tokenizer(path)
    for cls, name in (
        (AutoModelForCausalLM, "sft_merged"),
        (AutoModelForSequenceClassification, "rm_merged"),
    ):
        model = cls.from_pretrained(path, **({"num_labels": 1} if "rm" in name else {}))
        model.config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp_path / "inputs" / name)
        tokenizer.save_pretrained(tmp_path / "inputs" / name)
    s = bench.settings(bench.parse_args(["--steps", "2", "--batch", "8", "--minibatches", "2"]))
    (tmp_path / "s.json").write_text(json.dumps(s | {"score_mean": 0.0, "score_std": 1.0}))
    python = bench.DEFAULT_VENV / "bin" / "python"
    done = subprocess.run(
        [str(python), str(ROOT / "bench" / "_trl_ppo.py"), "--inputs", str(tmp_path / "inputs"),
         "--settings", str(tmp_path / "s.json"), "--out", str(tmp_path / "out")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["versions"]["trl"] == "1.12.0" and len(result["steps"]) == 2
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
