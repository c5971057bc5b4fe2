"""Output directories of ``merge``, ``analyze`` and ``resize``: refused when they hold what lorakit did not
write, and filled under a temporary name beside the target, then renamed, so nothing is ever half-written.

Each command writes a marker file, a JSON object whose ``"lorakit"`` key names the command; only a
directory holding that marker (an earlier output of the same command) is replaced.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from lorakit.errors import UserError


def is_output_of(out: Path, marker: str, command: str) -> bool:
    """True when ``out/marker`` is a JSON object written by lorakit's ``command``."""
    try:
        data = json.loads((out / marker).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and data.get("lorakit") == command


def check_out(out: Path, marker: str, command: str) -> None:
    """Refuse an ``--out`` that is a file, or a non-empty directory that is not an earlier ``command``
    output (before any work starts)."""
    if out.is_file():
        raise UserError(f"{out} is a file, not a directory", where="--out")
    if out.is_dir() and any(out.iterdir()) and not is_output_of(out, marker, command):
        raise UserError(
            f"{out} holds files lorakit did not write (no {marker} of lorakit {command}): "
            "choose an empty or new directory",
            where="--out",
        )


def write_dir(out: Path, fill: Callable[[Path], None]) -> Path:
    """Call ``fill(tmp)`` on a fresh directory beside ``out``, then put it in ``out``'s place (an earlier
    output, already checked by ``check_out``, is moved aside first and removed only once the new one is
    in). On any failure nothing of ``out`` changes."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        fill(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.{os.getpid()}.old")
            out.rename(old)
            try:
                tmp.rename(out)
            except OSError:
                old.rename(out)
                raise
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
