"""Layer-wise learning rates and LoRA+: every trainable parameter lands in the intended optimizer
group at the intended rate, read back from the optimizer the TRL trainer trained with."""

import pytest

import alignkit.training as training
from alignkit.config import validate_pipeline
from alignkit.errors import UserError
from alignkit.pipeline import run_pipeline
from alignkit.stages import REGISTRY, stage_kinds


def optimizer_groups(monkeypatch) -> dict[str, dict[str, tuple[str, float, float]]]:
    """Per stage (its checkpoint dir's stage): trainable parameter name -> (group name, initial
    learning rate, weight decay), from the optimizer as the first step ended."""
    seen: dict[str, dict[str, tuple[str, float, float]]] = {}
    real = training.FiniteGuard.on_step_end

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        names = {id(p): n for n, p in model.named_parameters()}
        stage = args.output_dir.split("/")[-2].strip(".").removesuffix(".partial")
        seen.setdefault(stage, {})
        for group in optimizer.param_groups:
            for p in group["params"]:
                entry = (group.get("name"), group["initial_lr"], group["weight_decay"])
                seen[stage][names[id(p)]] = entry
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == seen[stage].keys()  # every trainable parameter, once
        return real(self, args, state, control, model=model, **kwargs)

    monkeypatch.setattr(training.FiniteGuard, "on_step_end", on_step_end)
    return seen


def one_step(raw):
    for stage in raw["stages"]:
        stage["train"].update(max_steps=1, weight_decay=0.01)
        stage["heldout"] = {"enabled": False}
    return raw


def test_layerwise_rates_by_depth_for_full_fine_tuning(tmp_path, monkeypatch, tiny_pipeline_cfg):
    seen = optimizer_groups(monkeypatch)
    raw = one_step(tiny_pipeline_cfg(tmp_path / "run", adapter="full"))
    raw["stages"][0]["layerwise_lr"] = {"embeddings": 1e-5, "head": 1e-3, "decay": 0.5}
    run_pipeline(validate_pipeline(raw, stage_kinds()), REGISTRY, tmp_path / "run")

    groups = seen["sft"]
    # the tiny model: 2 blocks, tied embeddings (one tensor, in the embeddings group)
    assert groups["model.embed_tokens.weight"] == ("embeddings", 1e-5, 0.01)
    assert groups["model.norm.weight"] == ("head", 1e-3, 0.0)  # norms get no weight decay
    for name, (group, lr, decay) in groups.items():
        if ".layers." in name:
            depth = int(name.split(".layers.")[1].split(".")[0])
            assert (group, lr) == (f"layer.{depth}", pytest.approx(1e-3 * 0.5 ** (2 - depth)))
            assert decay == (0.0 if "norm" in name or name.endswith("bias") else 0.01), name
    assert {g for g, _, _ in groups.values()} == {"embeddings", "layer.0", "layer.1", "head"}


def test_loraplus_b_matrices_learn_ratio_times_faster_in_sft_and_the_dpo_after_it(
    tmp_path, monkeypatch, tiny_pipeline_cfg
):
    seen = optimizer_groups(monkeypatch)
    raw = tiny_pipeline_cfg(tmp_path / "run")
    raw["adapter"]["loraplus_ratio"] = 16
    raw["stages"].append(
        {"name": "dpo", "kind": "dpo", "max_length": 64, "health": {"enabled": False},
         "data": {"source": "builtin:preference", "max_rows": 16, "eval_size": 0},
         "train": {"per_device_train_batch_size": 8, "learning_rate": 1e-4}}
    )  # fmt: skip
    run_pipeline(validate_pipeline(one_step(raw), stage_kinds()), REGISTRY, tmp_path / "run")

    for stage, lr in (("sft", 3e-3), ("dpo", 1e-4)):
        groups = seen[stage]
        assert groups and all(".default." in n for n in groups)  # never DPO's frozen "ref"
        for name, (group, rate, _) in groups.items():
            expected = ("lora_B", 16 * lr) if "lora_B" in name else ("lora_A", lr)
            assert (group, rate) == (expected[0], pytest.approx(expected[1])), (stage, name)


def test_layerwise_rates_on_an_adapter_are_refused(tmp_path, tiny_pipeline_cfg):
    raw = one_step(tiny_pipeline_cfg(tmp_path / "run"))
    raw["stages"][0]["layerwise_lr"] = {"decay": 0.8}
    with pytest.raises(UserError, match=r"layerwise_lr: .*full fine-tuning.*loraplus_ratio"):
        run_pipeline(validate_pipeline(raw, stage_kinds()), REGISTRY, tmp_path / "run")
    raw["stages"][0].pop("layerwise_lr")
    raw["adapter"].update(type="ia3", loraplus_ratio=4)
    with pytest.raises(UserError, match="loraplus_ratio applies to type: lora, not 'ia3'"):
        validate_pipeline(raw, stage_kinds())
