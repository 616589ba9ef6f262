"""The shipped launch configs load as accelerate configs, with the engine their name says."""

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"
EXPECTED = {"ddp": "MULTI_GPU", "two-nodes": "MULTI_GPU", "fsdp2": "FSDP", "zero2": "DEEPSPEED",
            "zero3": "DEEPSPEED"}  # fmt: skip


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_launch_config_loads_with_its_engine(name):
    config = ClusterConfig.from_yaml_file(CONFIGS / f"{name}.yaml")
    assert str(config.distributed_type).split(".")[-1] == EXPECTED[name]
    if name.startswith("zero"):
        assert config.deepspeed_config["zero_stage"] == int(name[-1])
    if name == "fsdp2":
        assert config.fsdp_config["fsdp_version"] == 2
    if name == "two-nodes":
        assert config.num_machines == 2 and config.num_processes == 16


def test_every_shipped_launch_config_is_checked():
    assert {p.stem for p in CONFIGS.glob("*.yaml")} == set(EXPECTED)
