"""FSDP through the shipped config, on the GPUs of the machine (Accelerate runs FSDP on CUDA devices only;
scripts/gpu_check.sh runs these). The claims match the DeepSpeed ones (test_deepspeed.py): FSDP trains the
adapter a plain run with the same global batch trains, saves it whole under plain names, and writes a
checkpoint in the one-process layout that resumes without FSDP.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from processes import (
    FIRST,
    REPO,
    TOLERANCE,
    TOTAL,
    launched,
    max_difference,
    one_process,
    run_outputs,
    write_process_recipe,
)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="Accelerate runs FSDP on CUDA devices only"),
]


def test_fsdp_trains_saves_whole_and_its_checkpoint_resumes_without_it(
    tmp_path: Path, no_dropout_roberta: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path / "home"))
    n = torch.cuda.device_count()
    data = shared_data / "glue" / "SST-2"
    # The shipped file, with as many processes as there are GPUs (one GPU: one process, still sharded
    # through FSDP's wrappers, gathers and optimizer state dicts).
    config = yaml.safe_load((REPO / "configs" / "distributed" / "fsdp.yaml").read_text())
    config["num_processes"] = n
    fsdp_file = tmp_path / "fsdp.yaml"
    fsdp_file.write_text(yaml.safe_dump(config))

    def recipe(name: str, processes: int, steps: int, **train: object) -> Path:
        path = tmp_path / f"{name}.yaml"
        return write_process_recipe(
            path, no_dropout_roberta, data, tmp_path / name, processes, steps, **train
        )

    one_process(str(recipe("plain", 1, FIRST, batch_size=8)))
    one_process(str(recipe("straight", 1, TOTAL, batch_size=8)))
    fsdp = recipe("fsdp", n, FIRST, batch_size=8 // n, distributed=str(fsdp_file))
    done = launched(str(fsdp), processes=n)
    assert done.returncode == 0, done.stderr[-3000:]
    plain, sharded = run_outputs(tmp_path / "plain"), run_outputs(tmp_path / "fsdp")
    assert not any("_fsdp_wrapped_module" in k for k in sharded["adapter"])
    assert max_difference(plain["adapter"], sharded["adapter"]) <= TOLERANCE
    step = f"checkpoints/step-{FIRST}"
    ours, theirs = tmp_path / "fsdp" / step, tmp_path / "plain" / step
    assert json.loads((ours / "state.json").read_text()) == json.loads((theirs / "state.json").read_text())
    shutil.copytree(tmp_path / "fsdp", tmp_path / "resumed")
    args = ["--resume", "--output-dir", str(tmp_path / "resumed"), "--set", f"train.max_steps={TOTAL}"]
    one_process(str(tmp_path / "plain.yaml"), *args)
    resumed, straight = run_outputs(tmp_path / "resumed"), run_outputs(tmp_path / "straight")
    assert max_difference(resumed["adapter"], straight["adapter"]) <= TOLERANCE
