"""Faults at run time, on real files: each is one clear line naming the file or key, the right exit status,
and nothing lost or half-written. SIGTERM and SIGINT reach a real ``lorakit train`` process mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lorakit.cli import main


def _recipe(path: Path, base: Path, data: Path, out: Path, **train: object) -> Path:
    recipe = {
        "model": {"name_or_path": str(base)},
        "task": {"name": "sst2", "data_dir": str(data), "max_length": 32, "max_train_samples": 256},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"batch_size": 4, "eval_batch_size": 16, "lr": 1e-3, "log_every": 5, **train},
        "output_dir": str(out),
    }
    recipe["task"]["max_eval_samples"] = 16
    path.write_text(yaml.safe_dump(recipe))
    return path


def _step_reached(run: Path, step: int) -> bool:
    log = run / "logs" / "train.jsonl"
    if not log.is_file():
        return False
    steps = [json.loads(line).get("step", 0) for line in log.read_text().splitlines() if line.strip()]
    return max(steps, default=0) >= step


TRAIN = {"max_steps": 300, "eval_every": 150}


@pytest.fixture(scope="module")
def uninterrupted(
    tmp_path_factory: pytest.TempPathFactory, tiny_roberta_dir: Path, shared_data: Path
) -> Path:
    """The final adapter of the run trained without interruption."""
    root = tmp_path_factory.mktemp("straight")
    data = shared_data / "glue" / "SST-2"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAKIT_HOME", str(root / "home"))
        assert (
            main(["train", str(_recipe(root / "a.yaml", tiny_roberta_dir, data, root / "a", **TRAIN))]) == 0
        )
    return root / "a" / "final" / "adapter_model.safetensors"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_run_checkpoints_and_resume_ends_with_the_uninterrupted_adapter(
    sig: int,
    uninterrupted: Path,
    tiny_roberta_dir: Path,
    shared_data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data, train = shared_data / "glue" / "SST-2", TRAIN
    recipe = _recipe(tmp_path / "b.yaml", tiny_roberta_dir, data, tmp_path / "b", **train)
    env = {**os.environ, "LORAKIT_HOME": str(tmp_path / "home")}
    process = subprocess.Popen(
        [sys.executable, "-m", "lorakit", "train", str(recipe)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 120
    while not _step_reached(tmp_path / "b", 5):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + sig, err
    name = signal.Signals(sig).name
    assert f"stopped by {name} after step" in err and "--resume" in err and "Traceback" not in err
    step = int(err.split("after step ")[1].split()[0])
    assert 5 <= step < 300  # stopped mid-run, after the step in progress
    assert (tmp_path / "b" / "checkpoints" / f"step-{step}").is_dir()
    assert not (tmp_path / "b" / "metrics.json").exists()

    capsys.readouterr()
    assert main(["train", str(recipe), "--resume"]) == 0
    a = load_file(uninterrupted)
    b = load_file(tmp_path / "b" / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
