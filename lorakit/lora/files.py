"""Reading and writing the files an adapter or checkpoint is made of. A missing, truncated or corrupt file
is named with what is wrong with it (``BrokenFileError``), never a bare parser message; a write that fails
(a full disk, a quota) names the file it was writing (``WriteFailedError``) and leaves the old file, if
any, in place: writes go through a temporary file and a rename."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open

T = TypeVar("T")


class BrokenFileError(OSError):
    """A file that should be there and readable is missing, truncated or not what its name says; the
    message names the file and what is wrong with it."""


class WriteFailedError(OSError):
    """Writing a file failed (no space left, a quota, a read-only disk); the message names the file, and
    what was there before is unchanged."""


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Call ``write`` on a temporary file beside ``path``, then rename it to ``path``: readers never see half
    a file, and a failure leaves the old content in place (WriteFailedError naming ``path``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, SafetensorError) as exc:
        Path(tmp).unlink(missing_ok=True)
        kept = "the old file is unchanged" if path.exists() else "nothing was written"
        raise WriteFailedError(f"could not write {path}: {write_failure_reason(exc)}; {kept}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_failure_reason(exc: BaseException) -> str:
    """The OS's words for a failed write (safetensors wraps them in its own message)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc).removeprefix("Error while serializing: ")


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


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """safetensors' own serialization of ``tensors``, with the header's metadata keys in sorted order.

    safetensors' writer keeps the metadata in a hash map whose order changes from one process to the next,
    so a file with two or more metadata keys would differ byte for byte between two identical runs. The
    header is rewritten with the same entries (tensor offsets are relative to its end), padded with spaces
    to 8 bytes as safetensors pads it."""
    from safetensors.torch import save

    raw = save(tensors, metadata=metadata)
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    meta = header.pop("__metadata__", None)
    ordered = ({"__metadata__": dict(sorted(meta.items()))} if meta else {}) | header
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + raw[8 + size :]


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    """The header metadata of a safetensors file, without reading its tensors; BrokenFileError as above."""
    return _reading(path, lambda f: dict(f.metadata() or {}))


def _reading(path: Path, read: Callable[[Any], T]) -> T:
    try:
        with safe_open(str(path), framework="pt") as f:
            return read(f)
    except FileNotFoundError:
        raise BrokenFileError(f"{path}: missing") from None
    except (SafetensorError, OSError) as exc:
        raise BrokenFileError(f"{path}: not a readable safetensors file ({exc})") from None
