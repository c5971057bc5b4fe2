"""Training as several processes in tests: recipes sized for it, the launches, and comparing their runs.

Shared by the DDP tests (test_distributed.py) and the DeepSpeed ones (test_deepspeed.py): a tiny RoBERTa
without dropout (processes draw their own dropout masks), 60 real SST-2 rows and a constant rate.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file

from lorakit.cli import main
from lorakit.training.preflight import _LAUNCHER_VARIABLES

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5
BATCH = 4  # per process with 2 processes; one process gets 2 * BATCH
# 60 rows make 8 global batches an epoch (the last of 4 rows). The first runs stop at step 10, inside
# the second epoch, after the partial batch; the resumed ones go on to step 12.
FIRST, TOTAL = 10, 12


def write_process_recipe(
    path: Path, model_dir: Path, data_dir: Path, out: Path, processes: int, steps: int, **train: Any
) -> Path:
    recipe = {
        "model": {"name_or_path": str(model_dir)},
        # 60 rows: global batches of 8 leave a partial last batch of 4 each epoch. 37 evaluation rows in
        # batches of 8 leave the second process a short last batch, padded by Accelerate and dropped again.
        "task": {
            "name": "sst2",
            "data_dir": str(data_dir),
            "max_length": 64,
            "max_train_samples": 60,
            "max_eval_samples": 37,
        },
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {
            "max_steps": steps,
            "batch_size": BATCH * 2 // processes,
            "num_processes": processes,
            "eval_batch_size": 8,
            "lr": 2e-3,
            "log_every": 2,
            "save_every": FIRST,
            "eval_every": FIRST,
            # A constant rate: a run stopped at FIRST and resumed to TOTAL follows the same schedule.
            "scheduler": "constant",
            "warmup_steps": 0,
            **train,
        },
        "output_dir": str(out),
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def launched(*args: str, processes: int = 2) -> subprocess.CompletedProcess[str]:
    """``lorakit train ARGS --num-processes N`` as a user runs it: it launches the processes itself."""
    env = {k: v for k, v in os.environ.items() if k not in (*_LAUNCHER_VARIABLES, "RANK")}
    env["OMP_NUM_THREADS"] = "1"  # several processes on a small CI machine
    return subprocess.run(
        [sys.executable, "-m", "lorakit", "train", *args, "--num-processes", str(processes)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def two_processes(*args: str) -> subprocess.CompletedProcess[str]:
    """``lorakit train ARGS --num-processes 2``."""
    return launched(*args, processes=2)


def one_process(*args: str) -> None:
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    assert main(["train", *args]) == 0


def run_outputs(path: Path) -> dict:
    return {
        "adapter": load_file(path / "final" / "adapter_model.safetensors"),
        "metrics": json.loads((path / "metrics.json").read_text()),
    }


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)
