"""Checkpoints hold no pickles: trainable weights, optimizer, scheduler and RNG states round-trip
exactly through safetensors and JSON."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import tiny_roberta
from safetensors.torch import load_file

from lorakit.lora import LoraConfig, inject_lora, mark_trainable
from lorakit.training.checkpoint import (
    LoopState,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    trainable_state,
)
from lorakit.training.optimization import build_optimizer


def _trained(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
    from transformers import get_scheduler

    torch.manual_seed(seed)
    model = tiny_roberta()
    inject_lora(model, LoraConfig(r=4, alpha=8, target_modules=["query", "value"]))
    mark_trainable(model, "none", ["classifier"])
    optimizer = build_optimizer(model, 1e-3, 0.01)
    scheduler = get_scheduler("linear", optimizer, 2, 10)
    ids = torch.randint(3, 120, (4, 9))
    for _ in range(3):
        model(input_ids=ids).logits.sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model, optimizer, scheduler


def test_a_checkpoint_is_safetensors_and_json_and_restores_exactly(tmp_path: Path) -> None:
    model, optimizer, scheduler = _trained(0)
    torch.manual_seed(123)
    state = LoopState(step=3, epoch=1, samples_in_epoch=12, global_batch_size=4, best_metric=0.5, best_step=2)
    path = save_checkpoint(tmp_path, trainable_state(model), optimizer.state_dict(), scheduler, state)
    assert path == latest_checkpoint(tmp_path)
    assert sorted(p.name for p in path.iterdir()) == [
        "loop.json",
        "state.json",
        "state.safetensors",
        "trainable.safetensors",
    ]
    for name in ("loop.json", "state.json"):
        json.loads((path / name).read_text())
    assert "optimizer.state.0.exp_avg" in load_file(path / "state.safetensors")
    expected_rng = torch.get_rng_state()

    other, other_opt, other_sched = _trained(1)  # different weights, moments and schedule position
    loaded_state, rng = load_checkpoint(path, other, other_opt, other_sched)
    assert loaded_state == state
    assert torch.equal(rng["cpu"], expected_rng)
    for (name, a), (_, b) in zip(model.named_parameters(), other.named_parameters(), strict=True):
        if a.requires_grad:
            assert torch.equal(a, b), name
    saved, restored = optimizer.state_dict(), other_opt.state_dict()
    assert saved["param_groups"] == restored["param_groups"]
    assert isinstance(restored["param_groups"][0]["betas"], tuple)
    for key, moments in saved["state"].items():
        for name, value in moments.items():
            assert torch.equal(value, restored["state"][key][name]), (key, name)
    assert scheduler.state_dict() == other_sched.state_dict()
