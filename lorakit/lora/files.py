"""Reading the files an adapter or checkpoint is made of, so that a missing, truncated or corrupt one is
named with what is wrong with it (``BrokenFileError``), never a bare parser message."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open

T = TypeVar("T")


class BrokenFileError(OSError):
    """A file that should be there and readable is missing, truncated or not what its name says; the
    message names the file and what is wrong with it."""


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; BrokenFileError naming the file when it is missing or not one."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BrokenFileError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BrokenFileError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise BrokenFileError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Each tensor's shape in a safetensors file, from its header alone (no tensor is read);
    BrokenFileError naming it as ``read_safetensors`` does."""
    return _reading(path, lambda f: {k: list(f.get_slice(k).get_shape()) for k in f.keys()})  # noqa: SIM118


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; BrokenFileError naming it when it is missing, truncated
    or not safetensors."""
    return _reading(path, lambda f: ({k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}))  # noqa: SIM118


def _reading(path: Path, read: Callable[[Any], T]) -> T:
    try:
        with safe_open(str(path), framework="pt") as f:
            return read(f)
    except FileNotFoundError:
        raise BrokenFileError(f"{path}: missing") from None
    except (SafetensorError, OSError) as exc:
        raise BrokenFileError(f"{path}: not a readable safetensors file ({exc})") from None
