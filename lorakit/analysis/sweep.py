"""``lorakit sweep SWEEP.yaml``: one base recipe, a grid of overrides, every point a normal run directory.

The sweep file (every key but ``grid`` and ``recipe`` optional; unknown keys are errors)::

    recipe: ../demo.yaml                 # the base recipe, relative to this sweep file
    set:                                 # fixed overrides for every point, as --set gives them
      task.max_train_samples: 500
    grid:                                # dotted recipe key -> the list of its values; the points are
      lora.r: [1, 2, 8]                  # every combination, the first key varying slowest
      lora.target_modules: [[query], [value], [query, value]]
      train.seed: [0, 1]
      method,train.lr: [[lora, 1.0e-3], [full, 5.0e-5]]   # linked keys: the values go together
    output_dir: runs/sweeps/NAME         # the sweep's root (relative to the working directory, as a
                                         # recipe's output_dir); default runs/sweeps/<sweep file stem>
    rows: lora.target_modules            # sweep.md's rows and columns (grid keys); default: the first
    cols: lora.r                         # and second grid key; --rows/--cols win
    resources: {num_cpus: 2, num_gpus: 1}  # each point's share of a Ray cluster (`--ray`; default 1 CPU)

Every point's recipe is resolved and validated, and every existing point directory checked, before
anything trains: a bad key or value is one line naming the sweep file and ``grid.KEY`` or ``set.KEY``.

A grid key may join several recipe keys with commas (*linked keys*): each of its values is a list with one
value per key, set together, so that a learning rate goes with its method or a data folder with its task.

A point is named by its grid values in grid order, ``r=8,target_modules=query+value,seed=0`` (the last
part of each key unless two keys share it; linked keys by their first key and its value; characters
outside ``[A-Za-z0-9._+=,-]`` become ``_``; names that would collide get a hash of their values), and
trains into ``<output_dir>/<name>`` exactly as ``lorakit train RECIPE --set ... --output-dir
<output_dir>/<name>`` would. A point whose metrics.json is
complete is reused, one holding a checkpoint but no metrics (interrupted) is resumed, so a rerun does
only what is missing; a finished point whose recipe.yaml differs from the sweep's is refused (exit 2).
A point that fails is reported in the tables and makes the exit status 1; the others still run.

``--jobs 1`` trains the points one after another in this process; ``--jobs N`` runs N ``lorakit train``
subprocesses at once (their output in ``<output_dir>/logs/<name>.log``, the CPU threads shared out).
After each point, ``sweep.json`` (every point's overrides, status, metrics and command), ``sweep.csv``
and ``sweep.md`` are rewritten (see ``lorakit.analysis.sweep_report``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lorakit.analysis.sweep_file import (
    SweepFile,
    as_override,
    check_grid,
    grid_overrides,
    linked_keys,
    read_sweep_file,
)
from lorakit.errors import UserError
from lorakit.recipe import Recipe, load_recipe
from lorakit.recipe.schema import show_value
from lorakit.runs import METRICS_FILE, RECIPE_FILE

LOGS = "logs"  # no point name can be this: every name holds '='
_SAFE = re.compile(r"[^A-Za-z0-9._+=,-]")
_MAX_NAME = 160


@dataclass
class Point:
    """One combination of grid values: its name, overrides, resolved recipe and run directory."""

    name: str
    values: dict[str, Any]  # grid key -> value, in grid order
    overrides: list[str]  # every --set item, fixed ones first, output_dir last
    recipe: Recipe
    base_recipe: Path

    @property
    def run_dir(self) -> Path:
        """Where the point trains."""
        return Path(self.recipe.output_dir)

    def train_argv(self, resume: bool) -> list[str]:
        """The ``lorakit train`` arguments that train this point."""
        argv = ["train", str(self.base_recipe), *(a for o in self.overrides for a in ("--set", o))]
        return [*argv, "--resume"] if resume else argv


@dataclass
class Sweep:
    """A loaded, validated sweep: its points and where the tables go."""

    source: Path
    base_recipe: Path
    fixed: dict[str, Any]  # the sweep file's set:, then the command line's --set
    grid: dict[str, list[Any]]
    root: Path
    rows: str | None
    cols: str | None
    points: list[Point] = field(default_factory=list)
    resources: dict[str, float] = field(default_factory=dict)  # a point's Ray resources (--ray)


def show(value: Any) -> str:
    """A grid value as point names and tables show it: lists joined with '+', YAML's null/true/false."""
    if isinstance(value, list | tuple):
        return "+".join(show(v) for v in value)
    if value is None or isinstance(value, bool):
        return show_value(value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _name_value(key: str, value: Any) -> Any:
    return value[0] if len(linked_keys(key)) > 1 else value


def _short_keys(keys: list[str]) -> dict[str, str]:
    last = [linked_keys(k)[0].rsplit(".", 1)[-1] for k in keys]
    return {
        k: short if last.count(short) == 1 else linked_keys(k)[0] for k, short in zip(keys, last, strict=True)
    }


def _digest(values: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(values, sort_keys=True).encode()).hexdigest()[:8]


def point_names(grid: dict[str, list[Any]], combos: list[dict[str, Any]]) -> list[str]:
    """Stable, readable, file-safe and distinct directory names for ``combos`` (see the module docstring)."""
    short = _short_keys(list(grid))
    names = []
    for values in combos:
        name = _SAFE.sub("_", ",".join(f"{short[k]}={show(_name_value(k, v))}" for k, v in values.items()))
        if len(name) > _MAX_NAME:
            name = f"{name[:_MAX_NAME]}-{_digest(values)}"
        names.append(name)
    counts = {n: names.count(n) for n in names}
    return [f"{n}-{_digest(v)}" if counts[n] > 1 else n for n, v in zip(names, combos, strict=True)]


def _layout_key(value: str | None, grid: dict[str, list[Any]], where: str) -> str | None:
    if value is not None and value not in grid:
        raise UserError(f"not a grid key (grid keys: {', '.join(grid)})", where=where)
    return value


def _layout(spec: SweepFile, where: str, rows: str | None, cols: str | None) -> tuple[str, str | None]:
    """sweep.md's row and column keys: --rows/--cols, else the file's (unless the command line took that
    key for the other side), else the first grid keys left."""
    grid = spec.grid
    rows, cols = _layout_key(rows, grid, "--rows"), _layout_key(cols, grid, "--cols")
    if rows is not None and rows == cols:
        raise UserError(f"rows and cols are both {rows}; choose two grid keys", where="--cols")
    file_rows = _layout_key(spec.rows, grid, f"{where}: rows")
    file_cols = _layout_key(spec.cols, grid, f"{where}: cols")
    if file_rows is not None and file_rows == file_cols:
        raise UserError(f"rows and cols are both {file_rows}; choose two grid keys", where=f"{where}: cols")
    rows = rows or (file_rows if file_rows != cols else None)
    cols = cols or (file_cols if file_cols != rows else None)
    free = [k for k in grid if k not in (rows, cols)]
    rows = rows or (free.pop(0) if free else cols)
    if rows == cols:  # a one-key grid asked to lie across: it goes down instead
        cols = None
    return rows, cols or (free[0] if free else None)


def _point_error(exc: UserError, point: dict[str, Any], fixed: list[str], source: Path) -> UserError:
    """A recipe error about a ``--set`` item, renamed after the sweep key it came from."""
    where = exc.where or ""
    if not where.startswith("--set "):
        return exc  # the base recipe's own error: it names that file and key
    message = str(exc)[len(where) + 2 :]
    key = where[len("--set ") :]

    def owns(k: str) -> bool:
        return key == k or key.startswith((f"{k}.", f"{k}[")) or k.startswith(f"{key}.")

    for k, value in point.items():
        if any(owns(part) for part in linked_keys(k)):
            shown = message if "(got " in message else f"{message} (got {show_value(value)})"
            return UserError(shown, where=f"{source}: grid.{k}")
    for k in fixed:
        if owns(k):
            return UserError(message, where=f"{source}: set.{k}")
    return exc  # the command line's own --set


def load_sweep(
    path: Path,
    cli_set: list[str] | None = None,
    output_dir: str | None = None,
    rows: str | None = None,
    cols: str | None = None,
) -> Sweep:
    """Read and validate the sweep at ``path`` and resolve every point's recipe; nothing is trained.

    ``cli_set`` (``--set K=V``) applies to every point after the sweep's ``set:``; ``output_dir``,
    ``rows`` and ``cols`` win over the file's. Raises ``UserError`` naming the file and key.
    """
    path = Path(path)
    where = str(path)
    spec = read_sweep_file(path)
    cli_set = list(cli_set or [])
    check_grid(spec, where, cli_set)
    base = Path(spec.recipe).expanduser()
    # normpath: configs/sweeps/../demo.yaml reads configs/demo.yaml in commands and tables.
    base = Path(os.path.normpath(base if base.is_absolute() else path.parent / base))
    if not base.is_file():
        raise UserError(f"recipe file not found: {base}", where=f"{where}: recipe")
    root = Path(output_dir or spec.output_dir or f"runs/sweeps/{path.stem}").expanduser()
    rows, cols = _layout(spec, where, rows, cols)
    keys = list(spec.grid)
    fixed_items = [as_override(k, v) for k, v in spec.fixed.items()] + cli_set
    cli_fixed = {item.partition("=")[0].strip(): item.partition("=")[2] for item in cli_set}
    sweep = Sweep(path, base, {**spec.fixed, **cli_fixed}, spec.grid, root, rows, cols)
    sweep.resources = {str(k): float(v) for k, v in spec.resources.items()}
    combos = [dict(zip(keys, vals, strict=True)) for vals in itertools.product(*spec.grid.values())]
    for name, values in zip(point_names(spec.grid, combos), combos, strict=True):
        overrides = [*fixed_items, *(o for k, v in values.items() for o in grid_overrides(k, v))]
        overrides.append(f"output_dir={json.dumps(str(root / name))}")
        try:
            recipe = load_recipe(base, overrides)
        except UserError as exc:
            raise _point_error(exc, values, list(spec.fixed), path) from None
        sweep.points.append(Point(name, values, overrides, recipe, base))
    return sweep


def log_error(log: Path, status: int) -> str:
    """A point's training log's own one-line error (``lorakit: error: ...``), or its exit status."""
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        lines = []
    for line in reversed(lines):
        for tag in ("lorakit: error: ", "lorakit: failed: "):
            if line.startswith(tag):
                return line[len(tag) :].strip()
    return f"lorakit train exited with status {status} (see {log})"


def finished_metrics(run_dir: Path) -> dict[str, Any] | None:
    """A run's metrics.json when it is complete (the best main metric and the parameter counts), else None."""
    try:
        metrics = json.loads((run_dir / METRICS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(metrics, dict) or not isinstance(metrics.get("parameters"), dict):
        return None
    best = metrics.get("best")
    return metrics if isinstance(best, dict) and metrics.get("main_metric") in best else None


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        return {k: v for key, item in data.items() for k, v in _flat(item, f"{prefix}{key}.").items()}
    return {prefix[:-1]: data}


def point_state(point: Point) -> str:
    """``new``, ``finished`` (metrics complete: reuse) or ``resume`` (a checkpoint, no metrics). A
    finished or resumable run trained from another recipe is a UserError naming the differing keys."""
    from lorakit.training.checkpoint import latest_checkpoint

    run_dir = point.run_dir
    if finished_metrics(run_dir) is not None:
        state = "finished"
    elif latest_checkpoint(run_dir) is not None:
        state = "resume"
    else:
        return "new"  # empty, absent, or a failed start: train decides, as it does for lorakit train
    try:
        saved_recipe = yaml.safe_load((run_dir / RECIPE_FILE).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        saved_recipe = None
    if not isinstance(saved_recipe, dict):
        raise UserError(
            f"holds a run without a readable {RECIPE_FILE}; remove it or choose another output_dir",
            where=str(run_dir),
        )
    saved, wanted = _flat(saved_recipe), _flat(point.recipe.model_dump())
    # A key the run's lorakit did not have yet ran as its default. output_dir says where, not what: a
    # sweep moved and rerun with --output-dir still matches. Training records local paths resolved and the
    # class names it read from the data (task.labels: null), so those compare as what they stand for.
    defaults = _flat(Recipe().model_dump())
    differ = sorted(
        k
        for k, v in wanted.items()
        if k not in ("output_dir", "task.labels" if v is None else "")
        and not _same_value(saved.get(k, defaults.get(k)), v)
    )
    if differ:
        shown = ", ".join(differ[:4]) + (", ..." if len(differ) > 4 else "")
        raise UserError(
            f"holds a run of another recipe ({shown} differ); remove it or choose another output_dir",
            where=str(run_dir),
        )
    return state


def _same_value(saved: Any, wanted: Any) -> bool:
    """Equal, or two spellings of one local path (relative and absolute, through a symlink)."""
    if saved == wanted:
        return True
    if isinstance(saved, str) and isinstance(wanted, str) and Path(wanted).exists():
        return Path(saved).expanduser().resolve() == Path(wanted).expanduser().resolve()
    return False


def plan_lines(sweep: Sweep) -> list[str]:
    """``--dry-run``: each point's state and run directory, and the command that trains it."""
    import shlex

    lines = [f"{len(sweep.points)} points into {sweep.root}:"]
    for p in sweep.points:
        lines.append(f"  {point_state(p):8} {p.name}")
        lines.append(f"           {shlex.join(['lorakit', *p.train_argv(resume=False)])}")
    return lines
