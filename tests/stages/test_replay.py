"""Replay against forgetting: the configured share of every stage's training rows is replay."""

import json

import pytest
from rich.console import Console

from alignkit.config import AdapterSpec, DataSpec, ModelSpec, ReplaySpec
from alignkit.errors import UserError
from alignkit.pipeline import StageContext
from alignkit.stages import dpo, policy, sft

FRACTION = 0.2


class Built(Exception):
    """Raised in place of training: the test only needs the built trainer."""


def context(tmp_path, name: str) -> StageContext:
    return StageContext(
        name=name,
        model=ModelSpec(name="builtin:tiny"),
        adapter=AdapterSpec(r=8, alpha=16),
        seed=0,
        out_dir=tmp_path / name,
        parent=None,
        resume_from=None,
        console=Console(quiet=True),
    )


def batch_shares(trainer, is_replay) -> list[tuple[int, int]]:
    """(replay rows, rows) of every batch of one epoch of the trainer's own dataloader."""
    shares = []
    for batch in trainer.get_train_dataloader():
        flags = [is_replay(row) for row in batch["input_ids"].tolist()]
        shares.append((sum(flags), len(flags)))
    return shares


def test_sft_batches_hold_the_configured_share_of_replay_text(tmp_path, monkeypatch):
    def capture(cfg, ctx, built):
        raise Built(built)

    monkeypatch.setattr(policy, "train", capture)
    cfg = sft.SFTStageConfig(
        name="sft",
        data=DataSpec(source="builtin:sft", max_rows=300, eval_size=8),
        replay=ReplaySpec(source="builtin:pretraining", fraction=FRACTION),
        max_length=64,
        train={"per_device_train_batch_size": 16},
    )
    with pytest.raises(Built) as caught:
        sft.run(cfg, context(tmp_path, "sft"))
    built = caught.value.args[0]
    user = built.tokenizer.convert_tokens_to_ids("<|user|>")
    shares = batch_shares(built.trainer, lambda ids: user not in ids)  # text rows: no chat turns
    replay, rows = map(sum, zip(*shares, strict=True))
    assert rows == 375 and built.counts["replay_rows"] == 75  # 300 task rows + 75 replay
    assert abs(replay / rows - FRACTION) <= 0.02
    per_batch = [r / n for r, n in shares]
    assert abs(sum(per_batch) / len(per_batch) - FRACTION) <= 0.02
    assert sum(r > 0 for r, _ in shares) >= 0.8 * len(shares)  # mixed in, not a block at the end
    # replay text trains on every token; task rows keep their prompt masked
    pad = built.tokenizer.pad_token_id
    batch = next(iter(built.trainer.get_train_dataloader()))
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), strict=True):
        if user in ids:
            assert labels[0] == -100
        else:
            assert all(label == i for i, label in zip(ids, labels, strict=True) if i != pad)
    record = next(d for d in built.data if d["role"] == "replay")
    assert record["source"] == "builtin:pretraining" and record["rows"] == 75


def test_dpo_mixes_earlier_pairs_at_the_configured_share(tmp_path):
    earlier = tmp_path / "earlier.jsonl"
    pairs = [
        {"prompt": f"Topic: zebra {i}", "chosen": "good", "rejected": "bad"} for i in range(40)
    ]
    earlier.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    cfg = dpo.DPOStageConfig(
        name="dpo",
        data=DataSpec(source="builtin:preference", max_rows=160, eval_size=8),
        replay=ReplaySpec(source=str(earlier), fraction=FRACTION),
        max_length=64,
        heldout={"enabled": False},
        train={"per_device_train_batch_size": 8},
    )
    built = dpo.build_trainer(cfg, context(tmp_path, "dpo"))
    zebra = built.tokenizer("zebra", add_special_tokens=False)["input_ids"]

    def is_replay(ids: list[int]) -> bool:
        return any(ids[i : i + len(zebra)] == zebra for i in range(len(ids)))

    shares = []
    for batch in built.trainer.get_train_dataloader():
        ids = batch["input_ids"].tolist()  # the chosen sequences, then the rejected ones
        flags = [is_replay(row) for row in ids[: len(ids) // 2]]
        shares.append((sum(flags), len(flags)))
    replay, rows = map(sum, zip(*shares, strict=True))
    assert rows == 200 and built.counts["replay_rows"] == 40  # drawn twice through the 40 pairs
    assert abs(replay / rows - FRACTION) <= 0.02


def test_dpo_refuses_text_replay_and_sft_refuses_replay_with_packing(tmp_path):
    cfg = dpo.DPOStageConfig(
        name="dpo",
        data=DataSpec(source="builtin:preference", max_rows=16, eval_size=4),
        replay=ReplaySpec(source="builtin:pretraining", fraction=0.1),
    )
    with pytest.raises(UserError, match=r"stages\.dpo\.replay\.source"):
        dpo.build_trainer(cfg, context(tmp_path, "dpo"))
    with pytest.raises(ValueError, match="packing"):
        sft.SFTStageConfig(
            name="sft",
            data=DataSpec(source="builtin:sft"),
            packing=True,
            replay={"source": "builtin:pretraining", "fraction": 0.1},
        )
