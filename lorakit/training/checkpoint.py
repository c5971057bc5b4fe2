"""Resumable training state: the trainable weights, optimizer, scheduler, RNG and loop position.

Only trainable parameters are stored (for LoRA a few MB, not the frozen base). Nothing is pickled: the
tensors of the optimizer, scheduler and RNG states go into ``state.safetensors`` and the rest of their
structure (numbers, strings, lists, dicts with integer keys, tuples) into ``state.json``, each tensor
named there by its key, so reading a checkpoint runs no code and puts back exactly what was saved. A
checkpoint is written under a temporary name and renamed when complete, so ``latest_checkpoint`` never
returns a half-written one.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from lorakit.lora import read_json_object, read_safetensors

CHECKPOINTS = "checkpoints"
_PREFIX = "step-"
_WEIGHTS = "trainable.safetensors"
_STATE_TENSORS = "state.safetensors"  # optimizer, scheduler and RNG tensors
_STATE_JSON = "state.json"  # their structure, tensors named by key
_LOOP_JSON = "loop.json"  # LoopState


@dataclass
class LoopState:
    """Where the training loop is: enough to continue exactly where it stopped."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    # Rows of ``epoch`` already trained on, over all processes: a position that does not depend on how
    # many processes share each global batch, so a run saved on N processes resumes on M.
    samples_in_epoch: int = 0
    global_batch_size: int = 0  # rows per global batch when saved (N processes × batch_size)
    samples_seen: int = 0
    train_seconds: float = 0.0
    best_metric: float | None = None
    best_step: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name, detached, on the CPU."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    run_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: LoopState,
    keep: int = 1,
) -> Path:
    """Write ``checkpoints/step-N`` (complete or not at all) and keep only the newest ``keep``."""
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{state.step}"
    tmp = root / f".tmp-{_PREFIX}{state.step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(trainable_state(model), str(tmp / _WEIGHTS))
    rng: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    tensors: dict[str, torch.Tensor] = {}
    states = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng}
    structure = {name: _to_json(value, name, tensors) for name, value in states.items()}
    save_file(tensors, str(tmp / _STATE_TENSORS))
    (tmp / _STATE_JSON).write_text(json.dumps(structure, indent=1))
    (tmp / _LOOP_JSON).write_text(json.dumps(asdict(state), indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _to_json(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` as JSON, each tensor moved into ``tensors`` under a key built from its path. JSON has only
    string keys and lists, so integer-keyed dicts (the optimizer's per-parameter state) and tuples (Adam's
    betas) are tagged to come back as they were."""
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: _to_json(v, f"{key}.{k}", tensors) for k, v in value.items()}
        return {"__items__": [[k, _to_json(v, f"{key}.{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [_to_json(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_to_json(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{key}: cannot store a {type(value).__name__} in a checkpoint")


def _from_json(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of ``_to_json``."""
    if isinstance(value, list):
        return [_from_json(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__items__" in value:
        return {k: _from_json(v, tensors) for k, v in value["__items__"]}
    if "__tuple__" in value:
        return tuple(_from_json(v, tensors) for v in value["__tuple__"])
    return {k: _from_json(v, tensors) for k, v in value.items()}


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX) :]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def restore_rng(rng: dict[str, Any]) -> None:
    """Put back the random number generator states saved with a checkpoint."""
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> tuple[LoopState, dict[str, Any]]:
    """Restore a checkpoint into ``model`` (trainable parameters), optimizer and scheduler; returns the
    loop state and the RNG states, which the loop restores itself at the point where they were saved."""
    weights, _ = read_safetensors(path / _WEIGHTS)
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise ValueError(f"{path}: checkpoint holds parameters the model lacks: {missing[:3]}")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    tensors, _ = read_safetensors(path / _STATE_TENSORS)
    states = {k: _from_json(v, tensors) for k, v in read_json_object(path / _STATE_JSON).items()}
    optimizer.load_state_dict(states["optimizer"])
    scheduler.load_state_dict(states["scheduler"])
    return LoopState(**read_json_object(path / _LOOP_JSON)), states["rng"]
