"""Loading adapters at run time, contained in ``--adapter-root``.

A client names a path relative to the root. It is refused (403) when absolute or holding ``..``; otherwise
it is resolved one component at a time from the root with ``lstat`` and ``readlink`` only, so that a
symlink pointing out of the root is refused from its own text, before anything outside is touched; the
same goes for the adapter's files inside it. What is left must be a directory, else 403. The adapter is
then checked against the served base from its files' headers (the recipe's base, the LoRA ranks, targets
and shapes, the head's size) before a tensor is read or anything allocated; only then is it loaded.
Every attempt is logged with the key id that made it, what it asked and when.
"""

from __future__ import annotations

import datetime
import logging
import os
import stat
from collections import deque
from pathlib import Path, PurePosixPath
from typing import Any

from torch import nn

from lorakit.errors import UserError
from lorakit.lora import CONFIG_NAME, PEFT_PREFIX, WEIGHTS_NAME, safetensors_shapes
from lorakit.runs import RECIPE_FILE
from lorakit.serve.limits import Rejected

audit = logging.getLogger("lorakit.serve.audit")
MAX_SYMLINK_HOPS = 40  # as the kernel's own loop limit
MAX_HEAD_ROWS = 4096  # labels a loaded head may have: bounds what a head tensor can allocate


def _escape(detail: str) -> Rejected:
    return Rejected(403, "forbidden", detail)


def resolve_inside(root: Path, relative: str) -> Path:
    """The real path of ``relative`` under ``root`` (itself a real path); Rejected (403) for an absolute
    path, a ``..``, a symlink whose target leaves the root, a loop or a missing component. Nothing outside
    the root is looked at: each component is ``lstat``-ed within the part already resolved."""
    given = PurePosixPath(relative)
    if given.is_absolute() or "\\" in relative or "\0" in relative:
        raise _escape("an absolute path: give a path relative to the adapter root")
    if ".." in given.parts:
        raise _escape(f"path {relative!r}: '..' is not allowed")
    parts, current, hops = deque(given.parts), root, 0
    while parts:
        part = parts.popleft()
        if part in ("", "."):
            continue
        if part == "..":  # from a symlink's target: resolved lexically, never above the root
            if current == root:
                raise _escape(f"path {relative!r}: a symlink in it leads out of the adapter root")
            current = current.parent
            continue
        candidate = current / part
        try:
            info = os.lstat(candidate)
        except OSError:
            raise _escape(f"path {relative!r}: not found under the adapter root") from None
        if not stat.S_ISLNK(info.st_mode):
            current = candidate
            continue
        hops += 1
        if hops > MAX_SYMLINK_HOPS:
            raise _escape(f"path {relative!r}: too many symlinks")
        target = PurePosixPath(os.readlink(candidate))
        if target.is_absolute():
            normal = Path(os.path.normpath(target))
            if normal != root and root not in normal.parents:
                raise _escape(f"path {relative!r}: a symlink in it leads out of the adapter root")
            current, target = root, PurePosixPath(normal.relative_to(root))
        parts.extendleft(reversed(target.parts))
    return current


def contained_adapter_dir(root: Path, relative: str) -> Path:
    """The adapter directory ``relative`` names under ``root``; its files, when present, must resolve
    inside the root too (403 otherwise), so that reading them reads nothing outside."""
    directory = resolve_inside(root, relative)
    if not directory.is_dir():
        raise _escape(f"path {relative!r}: not a directory")
    for name in (CONFIG_NAME, WEIGHTS_NAME, RECIPE_FILE):
        if os.path.lexists(directory / name):
            resolve_inside(root, str((directory / name).relative_to(root)))
    return directory


def _module(model: nn.Module, path: str) -> nn.Module | None:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None
    # Injected LoRA layers hold the base map in ``base_layer``; saved heads hold it in ``original``.
    return getattr(module, "base_layer", None) or getattr(module, "original", None) or module


def _io(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a linear map or an embedding (rows, width), else None."""
    from lorakit.lora.layer_base import linear_shape

    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    try:
        return linear_shape(module)
    except TypeError:
        return None


def check_against_base(model: nn.Module, directory: Path) -> None:
    """UserError unless every tensor of the adapter file fits ``model`` (from the file's header: no tensor
    is read): LoRA pairs on existing linear maps or embeddings, A's width and B's height those of the
    map, one rank per pair within the map's size; other tensors in existing parameters, as wide, with at
    most ``MAX_HEAD_ROWS`` rows."""
    shapes = {k.removeprefix(PEFT_PREFIX): s for k, s in safetensors_shapes(directory / WEIGHTS_NAME).items()}
    params = dict(model.named_parameters())
    pairs = ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B"))
    for key, shape in shapes.items():
        for a_suffix, b_suffix in pairs:
            if key.endswith(a_suffix):
                path = key[: -len(a_suffix)]
                module = _module(model, path)
                io = _io(module) if module is not None else None
                b = shapes.get(path + b_suffix)
                if io is None or b is None or len(shape) != 2 or len(b) != 2:
                    raise UserError(f"{path}: not a LoRA pair on a linear map or embedding of the base")
                rank, fan_in = shape
                if fan_in != io[0] or b[0] != io[1] or b[1] != rank or not 1 <= rank <= min(io):
                    raise UserError(
                        f"{path}: LoRA shapes {tuple(shape)}, {tuple(b)} do not fit the base's map "
                        f"{io[0]} -> {io[1]}"
                    )
        if is_lora_key(key):
            continue
        match = _parameter_for(key, params)
        if match is None or len(match) != len(shape) or list(match[1:]) != list(shape[1:]):
            raise UserError(f"tensor {key} {tuple(shape)} does not fit a parameter of the base model")
        if shape and shape[0] > max(match[0], MAX_HEAD_ROWS):
            raise UserError(f"tensor {key}: {shape[0]} rows, more than {MAX_HEAD_ROWS}")


def is_lora_key(key: str) -> bool:
    """Whether a file key is one of a LoRA pair's tensors."""
    return any(part in key for part in (".lora_A.", ".lora_B.", ".lora_embedding_A", ".lora_embedding_B"))


def _parameter_for(key: str, params: dict[str, nn.Parameter]) -> list[int] | None:
    """The shape of the model parameter a head tensor goes into: the parameter of that name, or the one
    inside a saved head (``classifier.original.out_proj.weight``: each adapter's copy has its shape)."""
    if key in params:
        return list(params[key].shape)
    parts = key.split(".")
    for i in range(1, len(parts)):
        name = ".".join([*parts[:i], "original", *parts[i:]])
        if name in params:
            return list(params[name].shape)
    return None


def same_base(a: str, b: str) -> bool:
    """The same base by name or by real path (no file of either is read)."""
    return a == b or os.path.realpath(a) == os.path.realpath(b)


def record(who: str, action: str, name: str, path: str | None, outcome: str) -> None:
    """One audit line: when (UTC), who (key id), what, and how it ended."""
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    where = f" path={path!r}" if path is not None else ""
    audit.info("admin %s by=%s at=%s adapter=%r%s: %s", action, who, when, name, where, outcome)


def relative_to_root(path: Path, root: Path | None) -> str | None:
    """``path`` relative to the root, for listings; None for an adapter outside it (given at start-up)."""
    if root is None:
        return None
    try:
        return str(Path(os.path.realpath(path)).relative_to(root))
    except ValueError:
        return None


def scrub(text: str, root: Path | None) -> str:
    """A message with the root's absolute path taken out (a 4xx detail never shows where files live)."""
    return text.replace(str(root) + os.sep, "").replace(str(root), ".") if root is not None else text


def info_for_client(info: dict[str, Any], root: Path | None) -> dict[str, Any]:
    """An adapter's listing: its path relative to the root, never absolute."""
    return {**info, "path": relative_to_root(Path(info["path"]), root)}
