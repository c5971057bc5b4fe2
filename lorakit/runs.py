"""The run directory's shared vocabulary: its file names, atomic JSON writes, and the registry of recent
runs from which ``lorakit eval``, ``merge`` and ``generate`` pick this project's latest run when no
RUN_DIR is named."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
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
    """Where lorakit keeps what outlives a run (the run registry, caches): ``$LORAKIT_HOME``, else
    ``~/.cache/lorakit``."""
    return Path(os.environ.get("LORAKIT_HOME", Path.home() / ".cache" / "lorakit"))


# The registry of recent runs: a JSON list of {run, cwd, time}, oldest first. The latest run is chosen
# per project from it, so a run trained in another folder does not change what `lorakit eval` means here.
REGISTRY_FILE = "runs.json"
REGISTRY_SIZE = 200
# The single pointer older lorakit wrote; still written and read last, so that versions can share a home.
_POINTER_FILE = "latest_run"
# Where `lorakit train` puts a recipe's run by default (runs/<recipe stem>), and how deep sweeps nest
# their points in it (runs/sweeps/<sweep>/<point>).
RUNS_ROOT = "runs"
_RUNS_DEPTH = 3


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` is a run directory that still exists (it holds metrics.json or recipe.yaml)."""
    return (path / METRICS_FILE).is_file() or (path / RECIPE_FILE).is_file()


def _read_registry() -> list[dict[str, Any]]:
    """The registry's entries, oldest first; a missing, unreadable or corrupt registry reads as empty
    (it is a convenience: losing it must never stop a command)."""
    try:
        data = json.loads((lorakit_home() / REGISTRY_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeError, ValueError):
        return []
    if not isinstance(data, list):
        return []
    return [e for e in data if isinstance(e, dict) and isinstance(e.get("run"), str) and e.get("run")]


@contextmanager
def _registry_lock() -> Iterator[None]:
    # Two trainings finishing their set-up at once (a parallel sweep, two terminals) would otherwise
    # each write the list they read, and one entry would be lost.
    home = lorakit_home()
    home.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic write still keeps the file whole
        yield
        return
    with open(home / f".{REGISTRY_FILE}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def record_latest_run(run_dir: Path) -> None:
    """Remember ``run_dir`` as the most recent run, with the folder it was trained from."""
    run = str(run_dir.resolve())
    entry = {"run": run, "cwd": str(Path.cwd().resolve()), "time": time.time()}
    with _registry_lock():
        # A resumed run moves to the end instead of appearing twice.
        entries = [e for e in _read_registry() if e["run"] != run] + [entry]
        write_json(lorakit_home() / REGISTRY_FILE, entries[-REGISTRY_SIZE:])
    atomic_write_text(lorakit_home() / _POINTER_FILE, run + "\n")


def _newest_under(root: Path) -> Path | None:
    """The run directory under ``root`` (sweep points included) whose metrics.json or recipe.yaml was
    written last, or None."""
    found: list[tuple[float, Path]] = []
    level = [root] if root.is_dir() else []
    for _ in range(_RUNS_DEPTH):
        below: list[Path] = []
        for folder in level:
            try:
                children = [c for c in folder.iterdir() if c.is_dir()]
            except OSError:
                continue
            for child in children:
                stamps = [
                    f.stat().st_mtime for f in (child / METRICS_FILE, child / RECIPE_FILE) if f.is_file()
                ]
                if stamps:
                    found.append((max(stamps), child))
                else:  # a run's own subfolders (checkpoints, final, eval) are not looked into
                    below.append(child)
        level = below
    return max(found, key=lambda item: item[0])[1] if found else None


def _from_pointer() -> Path | None:
    try:
        run = Path((lorakit_home() / _POINTER_FILE).read_text(encoding="utf-8").strip())
    except (OSError, UnicodeError):
        return None
    # An empty pointer reads as Path("."), which must not pass for a run.
    return run if run.is_absolute() and is_run_dir(run) else None


def latest_run() -> Path | None:
    """The latest run of this project, or None when there is no run anywhere.

    In order: the newest recorded run that still exists and was trained from the current folder or lies
    under it; else the newest run under ``./runs/``; else the newest recorded run anywhere that still
    exists (and, last, the pointer older lorakit versions wrote).
    """
    cwd = Path.cwd().resolve()
    existing = [
        (Path(e["run"]), e.get("cwd")) for e in reversed(_read_registry()) if is_run_dir(Path(e["run"]))
    ]
    for run, trained_from in existing:
        if trained_from == str(cwd) or run.is_relative_to(cwd):
            return run
    return _newest_under(cwd / RUNS_ROOT) or (existing[0][0] if existing else None) or _from_pointer()


def latest_run_or_error() -> Path:
    """``latest_run()``, or a UserError telling the user to train first or name RUN_DIR."""
    latest = latest_run()
    if latest is None:
        raise UserError("no run yet: train one first, or name RUN_DIR", where="RUN_DIR")
    return latest
