"""Start a pipeline on several CPU processes (gloo) with torchrun or accelerate, for the tests."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pipeline(batch: int) -> dict:
    train = {"max_steps": 2, "per_device_train_batch_size": batch, "learning_rate": 3e-3,
             "logging_steps": 1, "save_steps": 1}  # fmt: skip
    return {
        "run": {"name": "ddp", "seed": 0},
        "model": {"name": "builtin:tiny"},
        "adapter": {"type": "lora", "r": 8, "alpha": 16},
        "stages": [
            {"name": "sft", "kind": "sft", "max_length": 64, "train": train,
             "data": {"source": "builtin:sft", "max_rows": 64, "eval_split": "test",
                      "max_eval_rows": 8},
             "replay": {"source": "builtin:pretraining", "fraction": 0.2},
             "heldout": {"enabled": False}},
            {"name": "dpo", "kind": "dpo", "loss_type": "sigmoid", "max_length": 64,
             "train": {**train, "learning_rate": 1e-3},
             "data": {"source": "builtin:preference", "max_rows": 64, "eval_split": "test",
                      "max_eval_rows": 8},
             "heldout": {"enabled": False}, "health": {"enabled": False}},
        ],
    }  # fmt: skip


def launch(nproc: int, batch: int, root: Path, raw: dict | None = None,
           accelerate_config: Path | None = None, env: dict | None = None,
           timeout: int = 900) -> Path:  # fmt: skip
    """Run ``raw`` (default: :func:`pipeline` with ``batch``) on ``nproc`` processes:
    torchrun, or ``accelerate launch`` with a launch config (DeepSpeed runs on the CPU
    accelerator). The run directory is ``root/run``; each rank's trained tensors land in ``root``."""
    raw = raw or pipeline(batch)
    root.mkdir(parents=True, exist_ok=True)
    config = root / "config.json"
    config.write_text(json.dumps(raw))
    args = [str(WORKER), str(config), str(root / "run"), str(root)]
    if accelerate_config is None:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", *args]  # fmt: skip
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(accelerate_config), "--num_processes", str(nproc), "--mixed_precision", "no",
               "--main_process_port", str(free_port()), *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "DS_ACCELERATOR": "cpu", **(env or {})}  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root
