"""The benchmark script's cheap paths: adapter sizes through the real command line, and one training
step per contender on a tiny model through ``bench.main``. Fields are checked, never timings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"


@pytest.fixture()
def bench(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))  # spawned workers inherit sys.path, so they find it too
    import bench

    return bench


def test_quick_sizes_writes_json_and_results(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench.py"), "--quick", "--only", "sizes", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "quick" / "sizes.json").read_text())
    assert data["section"] == "sizes" and data["quick"] is True
    assert {"device", "torch", "peft", "torch_threads"} <= set(data["environment"])
    models = {m["model"]: m for m in data["result"]["models"]}
    base = models["roberta-base"]
    assert base["lora_params"] == 294_912  # the paper's 0.3M: 12 layers · 2 · 8 · (768 + 768)
    # The file holds the A/B tensors as float32 plus a small header and config.
    assert 4 * base["lora_params"] < base["adapter_bytes_lora_only"] < 4 * base["lora_params"] + 65_536
    assert base["adapter_bytes_with_head"] > base["adapter_bytes_lora_only"]
    assert models["gpt2-medium"]["lora_params"] == 393_216
    results = (tmp_path / "quick" / "RESULTS.md").read_text()
    assert "## Adapter size against model size" in results
    assert "| roberta-base | 8 | 294,912 | 0.3M |" in results


def test_one_step_timing_on_a_tiny_model(bench, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = bench._plan(quick=True)
    tiny = {"speed": [("roberta-tiny", 2, 16, 1)], "same_process": ("roberta-tiny", 2, 16, 1)}
    monkeypatch.setattr(bench, "_plan", lambda quick: {**plan, **tiny})
    assert bench.main(["--quick", "--only", "speed", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "quick" / "speed.json").read_text())
    (model,) = data["result"]["models"]
    assert model["model"] == "roberta-tiny" and model["batch"] == 2 and model["seq"] == 16
    contenders = model["contenders"]
    assert set(contenders) == {"lorakit", "peft", "full", "full_fused"}
    for c in contenders.values():
        assert c["reps"] == 1 and len(c["times_s"]) == 1 and c["median_s"] > 0
        assert c["peak_memory_bytes"] > 0 and c["trainable"] > 0
    # Same targets, rank and head: both LoRA contenders train exactly the same number of parameters.
    assert contenders["lorakit"]["trainable"] == contenders["peft"]["trainable"]
    assert contenders["lorakit"]["trainable"] < contenders["full"]["trainable"]
    assert {"time_lorakit_over_peft", "time_lorakit_over_full", "memory_lorakit_over_full"} <= set(
        model["ratios"]
    )
    ab = data["result"]["same_process"]
    assert set(ab["contenders"]) == {"lorakit", "peft"} and ab["time_lorakit_over_peft"] > 0
    results = (tmp_path / "quick" / "RESULTS.md").read_text()
    assert "## Training step" in results and "## Targets" in results
    assert "Same-process check (roberta-tiny" in results
    assert "| roberta-tiny | 2 × 16 | lorakit LoRA |" in results
    assert (tmp_path / "quick" / "train_step.png").is_file()
