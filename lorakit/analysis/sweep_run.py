"""Training a sweep's points: reuse the finished, resume the interrupted, train the rest; record each.

``--jobs 1`` trains in this process, as ``lorakit train`` does (several-process points are launched as
that command launches them). ``--jobs N`` runs N ``python -m lorakit train`` subprocesses at once, each
with its output in ``<root>/logs/<point>.log`` and its share of the CPU threads. Either way a point that
fails is recorded with its one-line error and the others go on; Ctrl-C (or SIGTERM) lets the running
points write their checkpoints, writes the tables, and stops: a rerun continues from there.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lorakit.analysis.sweep import LOGS, Point, Sweep, finished_metrics, log_error, point_state
from lorakit.analysis.sweep_report import SWEEP_JSON, write_reports
from lorakit.errors import Interrupted, UserError


@dataclass
class PointResult:
    """What became of one point in this invocation."""

    point: Point
    status: str = "not run"  # done | failed | not run
    ran: str | None = None  # trained | resumed | reused
    metrics: dict[str, Any] | None = None
    wall_seconds: float | None = None
    error: str | None = None

    def record(self) -> dict[str, Any]:
        """The point as sweep.json holds it (and sweep.csv and sweep.md show it)."""
        m = self.metrics or {}
        main = m.get("main_metric")
        best, final = m.get("best") or {}, m.get("final") or {}
        return {
            "name": self.point.name,
            "run_dir": str(self.point.run_dir),
            "values": self.point.values,
            "status": self.status,
            "ran": self.ran,
            "main_metric": main,
            "best": best.get(main),
            "best_step": best.get("step"),
            "final": final.get(main),
            "parameters": m.get("parameters"),
            "train_seconds": m.get("train_seconds"),
            "wall_seconds": self.wall_seconds,
            "error": self.error,
            "command": shlex.join(["lorakit", *self.point.train_argv(resume=False)]),
        }


def _previous_walls(root: Path) -> dict[str, float]:
    """Wall times of points an earlier invocation trained (a reused point keeps its own)."""
    try:
        points = json.loads((root / SWEEP_JSON).read_text(encoding="utf-8"))["points"]
        return {p["name"]: float(p["wall_seconds"]) for p in points if p.get("wall_seconds") is not None}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _fresh_accelerate_state() -> None:
    # Accelerate keeps one process-wide state, fixed by the first Accelerator (its mixed precision, say):
    # each point starts from none, as a fresh `lorakit train` process does.
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _train_here(point: Point, resume: bool) -> None:
    from lorakit.training.launch import launch, needs_launch
    from lorakit.training.loop import train

    _fresh_accelerate_state()
    if needs_launch(point.recipe):  # several processes: launched as `lorakit train` launches them
        status = launch(point.recipe, point.train_argv(resume), resume)
        if status:
            raise RuntimeError(f"the training processes exited with status {status}")
    else:
        train(point.recipe, resume=resume)


def _error_line(exc: Exception) -> str:
    if os.environ.get("LORAKIT_DEBUG"):
        traceback.print_exc()
    text = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())


class _Recorder:
    """Keeps the results in point order and rewrites the tables after every change."""

    def __init__(self, sweep: Sweep, results: dict[str, PointResult], jobs: int) -> None:
        self.sweep, self.results, self.jobs = sweep, results, jobs

    def finish(self, result: PointResult, console: Console, done: int, total: int) -> None:
        result.metrics = finished_metrics(result.point.run_dir) if result.status == "done" else None
        if result.status == "done" and result.metrics is None:
            result.status, result.error = "failed", "training ended without a complete metrics.json"
        name = escape(result.point.name)  # names and errors are text, never rich markup
        if result.status == "done":
            m = result.metrics
            shown = f"{m['main_metric']} {m['best'][m['main_metric']]:.2f}"
            console.print(f"[{done}/{total}] [green]done[/green] {name}: {shown}", highlight=False)
        else:
            error = escape(result.error or "")
            console.print(f"[{done}/{total}] [red]failed[/red] {name}: {error}", highlight=False)
        self.write()

    def write(self) -> None:
        write_reports(self.sweep, [r.record() for r in self.results.values()], self.jobs)


class _Stop(BaseException):  # not an Exception: nothing on the way may take it for a failed point
    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


@contextmanager
def _stop_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise ``_Stop`` between points (a training in this process installs its own
    handlers for its duration, and stops at a checkpoint)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise _Stop(signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_here(todo: list[tuple[Point, bool]], rec: _Recorder, console: Console) -> None:
    for i, (point, resume) in enumerate(todo, 1):
        result = rec.results[point.name]
        verb = "resuming" if resume else "training"
        console.print(f"[{i - 1}/{len(todo)}] {verb} {escape(point.name)}", highlight=False, style="bold")
        start = time.perf_counter()
        try:
            _train_here(point, resume)
            result.status = "done"
        except Interrupted:
            raise
        except Exception as exc:  # noqa: BLE001 - a failed point is recorded; the sweep goes on
            result.status, result.error = "failed", _error_line(exc)
        result.ran = "resumed" if resume else "trained"
        result.wall_seconds = time.perf_counter() - start
        rec.finish(result, console, i, len(todo))


@dataclass
class _Child:
    point: Point
    resume: bool
    proc: subprocess.Popen[bytes]
    log: Path
    handle: IO[bytes]
    start: float


def _start(point: Point, resume: bool, root: Path, env: dict[str, str]) -> _Child:
    log = root / LOGS / f"{point.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    handle = log.open("wb")
    cmd = [sys.executable, "-m", "lorakit", *point.train_argv(resume)]
    # Its own session: a Ctrl-C reaches this process alone, which passes exactly one signal on.
    proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return _Child(point, resume, proc, log, handle, time.perf_counter())


def _run_children(todo: list[tuple[Point, bool]], rec: _Recorder, jobs: int, console: Console) -> None:
    env = dict(os.environ)
    # N trainings at once: each takes its share of the cores rather than all of them.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    queue, running, done = list(todo), [], 0
    columns = (TextColumn("[bold]sweep"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("sweep", total=len(todo))
        try:
            while queue or running:
                while queue and len(running) < jobs:
                    running.append(_start(*queue.pop(0), rec.sweep.root, env))
                for child in [c for c in running if c.proc.poll() is not None]:
                    running.remove(child)
                    child.handle.close()
                    result = rec.results[child.point.name]
                    result.ran = "resumed" if child.resume else "trained"
                    result.wall_seconds = time.perf_counter() - child.start
                    code = child.proc.returncode
                    result.status = "done" if code == 0 else "failed"
                    result.error = None if code == 0 else log_error(child.log, code)
                    done += 1
                    rec.finish(result, progress.console, done, len(todo))
                    progress.update(bar, completed=done)
                time.sleep(0.2)
        except _Stop as stop:
            # Passed on once: each child ends its step, writes a checkpoint and exits 128 + signal.
            for child in running:
                child.proc.send_signal(stop.signum)
            for child in running:
                child.proc.wait()
                child.handle.close()
            raise Interrupted("stopped", 128 + stop.signum) from None


def selected(sweep: Sweep, only: list[str] | None) -> set[str]:
    """The names of ``sweep``'s points that match one of the ``only`` globs (every point when there are
    none); a glob that matches no point is a UserError, since a typo would otherwise train nothing."""
    if not only:
        return {p.name for p in sweep.points}
    names: set[str] = set()
    for pattern in only:
        matched = {p.name for p in sweep.points if fnmatch.fnmatchcase(p.name, pattern)}
        if not matched:
            raise UserError(
                f"{pattern!r} matches none of the {len(sweep.points)} points of {sweep.source} "
                f"(named like {sweep.points[0].name!r}; `--dry-run` lists them)",
                where="--only",
            )
        names |= matched
    return names


def run_sweep(
    sweep: Sweep,
    jobs: int = 1,
    console: Console | None = None,
    ray: str | None = None,
    only: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Train every point of ``sweep`` that is not finished; returns every point's record, in point order.

    Existing point directories are checked before anything trains (``point_state``: a finished run of
    another recipe is a UserError). Failed points are recorded, not raised; the tables are written after
    each point and when the sweep is interrupted (then ``Interrupted`` says how to continue). ``ray``: a
    Ray cluster's address, ``auto`` or ``local``: the points run as Ray tasks (``analysis.sweep_ray``).
    ``only``: globs over point names; the unfinished points that match none are left ``not run``.
    """
    console = console or Console()
    if ray is not None and jobs != 1:
        raise UserError(
            "--jobs and --ray: Ray runs as many points at once as the cluster has resources for "
            "(the sweep file's `resources`); give one of them",
            where="--jobs",
        )
    if ray is not None:
        from lorakit.analysis.sweep_ray import preflight

        preflight(ray)  # Ray installed, the cluster answering: or one line before anything is written
    chosen = selected(sweep, only)
    states = {p.name: point_state(p) for p in sweep.points}
    walls = _previous_walls(sweep.root)
    results = {p.name: PointResult(p) for p in sweep.points}
    for p in sweep.points:
        if states[p.name] == "finished":
            r = results[p.name]
            r.status, r.ran, r.metrics, r.wall_seconds = (
                "done",
                "reused",
                finished_metrics(p.run_dir),
                walls.get(p.name),
            )
    unfinished = [p for p in sweep.points if states[p.name] != "finished"]
    todo = [(p, states[p.name] == "resume") for p in unfinished if p.name in chosen]
    rec = _Recorder(sweep, results, jobs)
    reused = len(sweep.points) - len(unfinished)
    left = f" ({len(unfinished) - len(todo)} left out by --only)" if len(todo) < len(unfinished) else ""
    console.print(
        f"sweep {sweep.source}: {len(sweep.points)} points, {reused} already finished, {len(todo)} to train"
        f"{left}, into {sweep.root}",
        highlight=False,
    )
    rec.write()
    try:
        with _stop_signals():
            if ray is not None:
                from lorakit.analysis.sweep_ray import run_on_ray

                run_on_ray(sweep, todo, rec, ray, console)
            elif jobs == 1:
                _run_here(todo, rec, console)
            else:
                _run_children(todo, rec, jobs, console)
    except (Interrupted, _Stop) as exc:
        rec.write()
        status = exc.exit_status if isinstance(exc, Interrupted) else 128 + exc.signum
        raise Interrupted(
            f"sweep stopped; {sweep.root / 'sweep.md'} holds what finished. Run the same `lorakit sweep` "
            "command again to continue: finished points are kept, interrupted ones resume from a checkpoint",
            status,
        ) from None
    records = [r.record() for r in results.values()]
    failed = [r for r in records if r["status"] == "failed"]
    console.print(
        f"sweep done: {len(records) - len(failed)} of {len(records)} points finished, {len(failed)} failed; "
        f"tables in {sweep.root / 'sweep.md'} and sweep.csv",
        highlight=False,
    )
    return records
