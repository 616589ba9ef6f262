"""Early stopping: evaluation every N steps, stop after `patience` evaluations without an
improvement, save the best checkpoint's weights (not the last), record where in stage.json."""

import json

import pytest
import torch
from safetensors.torch import load_file
from trl import SFTTrainer

import alignkit.training as training
from alignkit.config import validate_pipeline
from alignkit.errors import UserError
from alignkit.pipeline import run_pipeline
from alignkit.stages import REGISTRY, stage_kinds

#: eval_loss by step (0: the baseline before training): best at step 4, then three evaluations
#: that do not beat it by more than min_delta (4.95 improves, but by less than 0.1)
SCRIPT = {0: 9.0, 2: 6.0, 4: 5.0, 6: 5.5, 8: 4.95, 10: 5.2, 12: 3.0}


def scripted_eval(monkeypatch):
    real = SFTTrainer.evaluation_loop

    def loop(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        out.metrics["eval_loss"] = SCRIPT[self.state.global_step]
        return out

    monkeypatch.setattr(SFTTrainer, "evaluation_loop", loop)


def weights_by_step(monkeypatch, kill_at: int) -> dict[int, dict[str, torch.Tensor]]:
    """The trainable tensors after every step (FiniteGuard's step-end check sees them all); the
    first time step ``kill_at`` ends, a Ctrl-C."""
    seen: dict[int, dict[str, torch.Tensor]] = {}
    real = training.FiniteGuard.on_step_end

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == kill_at and kill_at not in seen:
            seen[kill_at] = {}
            raise KeyboardInterrupt
        seen[state.global_step] = {
            n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
        }
        return real(self, args, state, control, model=model, **kwargs)

    monkeypatch.setattr(training.FiniteGuard, "on_step_end", on_step_end)
    return seen


def scripted_sft(tmp_path, tiny_pipeline_cfg):
    """20 SFT steps, evaluated every 2 (the scripted losses), stopping after 3 evaluations
    that miss min_delta 0.1; checkpoints at the evaluations."""
    raw = tiny_pipeline_cfg(tmp_path / "run", steps=20)
    stage = raw["stages"][0]
    stage["heldout"] = {"enabled": False}
    del stage["train"]["save_steps"]
    stage["early_stopping"] = {"metric": "loss", "patience": 3, "min_delta": 0.1, "every": 2}
    return validate_pipeline(raw, stage_kinds())


def test_stops_at_the_expected_step_and_saves_the_best_checkpoint_across_a_resume(
    tmp_path, monkeypatch, tiny_pipeline_cfg
):
    scripted_eval(monkeypatch)
    seen = weights_by_step(monkeypatch, kill_at=7)
    cfg = scripted_sft(tmp_path, tiny_pipeline_cfg)
    with pytest.raises(KeyboardInterrupt):  # killed after step 7, checkpoints at 2, 4, 6
        run_pipeline(cfg, REGISTRY, tmp_path / "run")
    # resumed from step 6 with one evaluation (6) already past the best: a resume that forgot
    # it would stop only at 12 (whose 3.0 then resets the count)
    run_pipeline(cfg, REGISTRY, tmp_path / "run")

    record = json.loads((tmp_path / "run" / "sft" / "stage.json").read_text())
    assert record["resumed_from"] == "checkpoint-6"
    stopped = record["early_stopping"]
    # evaluations at 6, 8 and 10 miss min_delta: the third one stops training at step 10;
    # the best value is 4.95 at step 8 (an improvement, only too small to reset the patience)
    assert stopped["stopped_at"] == 10 and stopped["stopped_early"] and stopped["max_steps"] == 20
    assert (stopped["best_step"], stopped["best_metric"]) == (8, 4.95)
    assert stopped["metric"] == "eval_loss" and record["metrics"]["global_step"] == 10

    saved = load_file(tmp_path / "run" / "sft" / "adapter" / "adapter_model.safetensors")
    best, last = seen[8], seen[10]
    assert len(saved) == len(best) > 0
    for name, tensor in saved.items():
        live = name.replace(".weight", ".default.weight")
        assert torch.equal(tensor, best[live]), name
    assert any(not torch.equal(best[n], last[n]) for n in best)  # the last step differs


def test_a_kill_after_the_stopping_checkpoint_resumes_before_it(
    tmp_path, monkeypatch, tiny_pipeline_cfg
):
    """Killed once checkpoint-10 (the step that stopped training) is saved, before the stage
    completes: transformers resumed from it would train on to the next evaluation."""
    scripted_eval(monkeypatch)
    seen = weights_by_step(monkeypatch, kill_at=-1)
    real_save = training.FiniteGuard.on_save

    def on_save(self, args, state, control, **kwargs):
        real_save(self, args, state, control, **kwargs)
        if state.global_step == 10 and not (tmp_path / "killed").exists():
            (tmp_path / "killed").touch()
            raise KeyboardInterrupt

    monkeypatch.setattr(training.FiniteGuard, "on_save", on_save)
    cfg = scripted_sft(tmp_path, tiny_pipeline_cfg)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg, REGISTRY, tmp_path / "run")
    assert (tmp_path / "run" / ".sft.partial" / "checkpoints" / "checkpoint-10").is_dir()
    run_pipeline(cfg, REGISTRY, tmp_path / "run")

    record = json.loads((tmp_path / "run" / "sft" / "stage.json").read_text())
    assert record["resumed_from"] == "checkpoint-8"
    assert record["early_stopping"]["stopped_at"] == 10 == record["metrics"]["global_step"]
    assert record["early_stopping"]["best_step"] == 8
    saved = load_file(tmp_path / "run" / "sft" / "adapter" / "adapter_model.safetensors")
    for name, tensor in saved.items():
        assert torch.equal(tensor, seen[8][name.replace(".weight", ".default.weight")]), name


def test_a_metric_the_evaluation_does_not_report_fails_before_training(tmp_path, tiny_pipeline_cfg):
    raw = tiny_pipeline_cfg(tmp_path / "run", steps=4)
    del raw["stages"][0]["train"]["save_steps"]
    raw["stages"][0]["early_stopping"] = {"metric": "eval_acuracy", "every": 2}
    with pytest.raises(UserError, match=r"early_stopping.metric: .*no 'eval_acuracy'.*eval_loss"):
        run_pipeline(validate_pipeline(raw, stage_kinds()), REGISTRY, tmp_path / "run")
    assert not list((tmp_path / "run").glob(".sft.partial/checkpoints/checkpoint-*"))


def test_options_early_stopping_sets_are_refused_in_train(tiny_pipeline_cfg, tmp_path):
    raw = tiny_pipeline_cfg(tmp_path / "run")
    raw["stages"][0]["early_stopping"] = {"every": 2}  # the fixture sets train.save_steps
    with pytest.raises(UserError, match="'train.save_steps' is set by early_stopping"):
        validate_pipeline(raw, stage_kinds())


def test_reward_model_and_dpo_stop_on_their_own_metrics(tmp_path, tiny_pipeline_cfg):
    pairs = {"source": "builtin:preference", "max_rows": 32, "eval_split": "test",
             "max_eval_rows": 8}  # fmt: skip
    train = {"max_steps": 4, "per_device_train_batch_size": 8, "learning_rate": 1e-3}
    raw = tiny_pipeline_cfg(tmp_path / "run")
    raw["stages"] = [
        {"name": "rm", "kind": "reward_model", "max_length": 64, "data": pairs, "train": train,
         "probe": False, "early_stopping": {"metric": "accuracy", "patience": 1, "every": 1}},
        {"name": "dpo", "kind": "dpo", "max_length": 64, "data": pairs, "train": train,
         "health": {"enabled": False}, "heldout": {"enabled": False},
         "early_stopping": {"metric": "eval_rewards/margins", "patience": 2, "every": 2}},
    ]  # fmt: skip
    run_pipeline(validate_pipeline(raw, stage_kinds()), REGISTRY, tmp_path / "run")
    for stage, metric, evals in (
        ("rm", "eval_accuracy", (1, 2, 3, 4)),
        ("dpo", "eval_rewards/margins", (2, 4)),
    ):
        record = json.loads((tmp_path / "run" / stage / "stage.json").read_text())
        stopped = record["early_stopping"]
        assert stopped["metric"] == metric and stopped["greater_is_better"]
        assert stopped["best_step"] in evals and stopped["stopped_at"] <= 4
        assert stopped["stopped_at"] == record["metrics"]["global_step"]
        # the stage's final evaluation is of the best checkpoint it saved
        assert record["metrics"][metric] == pytest.approx(stopped["best_metric"])
