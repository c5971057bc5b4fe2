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
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from lorakit.lora import WriteFailedError, read_json_object, read_safetensors
from lorakit.lora.files import write_failure_reason

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
    weights: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    scheduler: Any,
    state: LoopState,
    keep: int = 1,
) -> Path:
    """Write ``checkpoints/step-N`` (complete or not at all) and keep only the newest ``keep``.

    ``weights`` are the trainable parameters by name and ``optimizer_state`` the optimizer's state dict,
    whole (see ``lorakit.training.zero`` for where they come from under DeepSpeed)."""
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{state.step}"
    tmp = root / f".tmp-{_PREFIX}{state.step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_checkpoint(tmp, weights, optimizer_state, scheduler, state)
    except (OSError, SafetensorError) as exc:  # a full disk, a quota: the older checkpoint stays
        shutil.rmtree(tmp, ignore_errors=True)
        kept = latest_checkpoint(run_dir)
        left = f"{kept.name} is intact" if kept else "there is no earlier checkpoint"
        raise WriteFailedError(
            f"could not write checkpoint {final}: {write_failure_reason(exc)}; {left}"
        ) from None
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_checkpoint(
    tmp: Path,
    weights: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    scheduler: Any,
    state: LoopState,
) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / _WEIGHTS))
    rng: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    tensors: dict[str, torch.Tensor] = {}
    states = {"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng": rng}
    structure = {name: _to_json(value, name, tensors) for name, value in states.items()}
    save_file(tensors, str(tmp / _STATE_TENSORS))
    (tmp / _STATE_JSON).write_text(json.dumps(structure, indent=1))
    (tmp / _LOOP_JSON).write_text(json.dumps(asdict(state), indent=1))


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


@dataclass
class Checkpoint:
    """What a checkpoint holds, read back: trainable weights, optimizer, scheduler and RNG states, and
    where the loop was."""

    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]
    loop: LoopState


def read_checkpoint(path: Path) -> Checkpoint:
    """A checkpoint directory's contents; BrokenFileError naming a missing or broken file."""
    weights, _ = read_safetensors(path / _WEIGHTS)
    tensors, _ = read_safetensors(path / _STATE_TENSORS)
    states = {k: _from_json(v, tensors) for k, v in read_json_object(path / _STATE_JSON).items()}
    loop = LoopState(**read_json_object(path / _LOOP_JSON))
    return Checkpoint(weights, states["optimizer"], states["scheduler"], states["rng"], loop)


def load_weights(path: Path, model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy a checkpoint's trainable weights into ``model``."""
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise ValueError(f"{path}: checkpoint holds parameters the model lacks: {missing[:3]}")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> tuple[LoopState, dict[str, Any]]:
    """Restore a checkpoint into ``model`` (trainable parameters), optimizer and scheduler; returns the
    loop state and the RNG states, which the loop restores itself at the point where they were saved."""
    ckpt = read_checkpoint(path)
    load_weights(path, model, ckpt.weights)
    optimizer.load_state_dict(ckpt.optimizer)
    scheduler.load_state_dict(ckpt.scheduler)
    return ckpt.loop, ckpt.rng
