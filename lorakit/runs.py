"""The run directory's shared vocabulary: its file names, atomic JSON writes, and the pointer to the most
recent run that ``lorakit eval``, ``merge`` and ``generate`` fall back on when no RUN_DIR is named."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lorakit.errors import UserError
from lorakit.lora.files import atomic_write

RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.json"
LOG_FILE = "logs/train.jsonl"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` through a temporary file in the same directory and a rename: readers never see
    half a file, and a crash or a full disk leaves the old content in place."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically (``atomic_write_text``)."""
    atomic_write_text(path, json.dumps(data, indent=2, default=float) + "\n")


def lorakit_home() -> Path:
    """Where lorakit keeps what outlives a run (the latest-run pointer, caches): ``$LORAKIT_HOME``, else
    ``~/.cache/lorakit``."""
    return Path(os.environ.get("LORAKIT_HOME", Path.home() / ".cache" / "lorakit"))


def _latest_pointer() -> Path:
    return lorakit_home() / "latest_run"


def record_latest_run(run_dir: Path) -> None:
    """Remember ``run_dir`` as the most recent run."""
    atomic_write_text(_latest_pointer(), str(run_dir.resolve()) + "\n")


def latest_run() -> Path | None:
    """The most recent run directory that still exists, or None."""
    pointer = _latest_pointer()
    if not pointer.is_file():
        return None
    run = Path(pointer.read_text().strip())
    return run if (run / METRICS_FILE).is_file() or (run / RECIPE_FILE).is_file() else None


def latest_run_or_error() -> Path:
    """``latest_run()``, or a UserError telling the user to train first or name RUN_DIR."""
    latest = latest_run()
    if latest is None:
        raise UserError("no run yet: train one first, or name RUN_DIR", where="RUN_DIR")
    return latest
