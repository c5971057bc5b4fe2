"""``lorakit sweep SWEEP.yaml --ray [ADDRESS]``: each point as a Ray task (``pip install -e ".[ray]"``).

ADDRESS is a running cluster's (``ray://HOST:10001``, ``HOST:6379``), ``auto`` (the cluster this machine
belongs to) or ``local``, what a bare ``--ray`` stands for (a Ray started for this command, stopped after).
Each task asks the sweep file's ``resources`` (``{num_cpus: 2, num_gpus: 1}``; default one CPU) and runs
``python -m lorakit train ...`` on whichever node Ray picks, exactly the command ``--jobs N`` runs, its
output in ``<root>/logs/<point>.log``.
So the sweep's root must be storage every node sees at the same path: the driver writes a token there at
start and every task checks it before training (a node that does not see it fails its point with one line
naming the node), and the driver reads each point's metrics.json from there (unreadable: a clear error).

What ``lorakit sweep`` promises holds: a task decides on its node whether its point resumes (a checkpoint,
no metrics), so an interrupted point resumes; a failed point is marked and the others go on; a task whose
worker dies is retried once (``RETRIES``), then marked failed; Ctrl-C or SIGTERM cancels the tasks, each
of which passes SIGTERM to its training (a checkpoint is written), and the tables are written.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from lorakit.analysis.sweep import LOGS, Sweep, finished_metrics, log_error
from lorakit.errors import Interrupted, UserError

TOKEN_FILE = ".lorakit-sweep-token"
RETRIES = 1  # a task whose worker process or node died runs once more (its point resumes)
TASK_NOT_SHARED = 90  # a task's status when its node does not see the sweep's root


def _train_point(
    argv: list[str], run_dir: str, root: str, token: str, log: str, threads: int
) -> tuple[int, str]:
    """The Ray task: check the shared root, resume or train the point, return (exit status, node)."""
    node = socket.gethostname()
    try:
        seen = (Path(root) / TOKEN_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        seen = ""
    if seen != token:
        return TASK_NOT_SHARED, node
    from lorakit.training.checkpoint import latest_checkpoint

    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    for name in ("LOCAL_RANK", "WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # a launcher's variables in the worker are not this training's
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    # The point's lock, inherited by its training: a retry waits until a killed worker's orphaned training
    # (stopped by _die_with_parent) has written its checkpoint and exited.
    lock = open(Path(log).with_suffix(".lock"), "wb")  # noqa: SIM115 - held by the child too
    fcntl.flock(lock, fcntl.LOCK_EX)
    resume = latest_checkpoint(Path(run_dir)) is not None and not (Path(run_dir) / "metrics.json").exists()
    command = [sys.executable, "-m", "lorakit", *argv, *(["--resume"] if resume else [])]
    with open(log, "ab") as handle, lock:
        child = subprocess.Popen(
            command,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
            pass_fds=(lock.fileno(),),
        )
        try:
            while child.poll() is None:  # in Python, not a blocking wait: Ray's cancel can reach it
                time.sleep(0.2)
            return child.returncode, node
        except BaseException:  # cancelled (Ctrl-C on the driver): the training checkpoints and stops
            child.send_signal(signal.SIGTERM)
            child.wait()
            raise


def _die_with_parent() -> None:
    """In the training child: SIGTERM when the Ray worker dies (killed), so that it checkpoints and stops
    rather than train on unwatched."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def import_ray() -> Any:
    """The ``ray`` module, or a one-line error naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise UserError('--ray needs Ray: pip install -e ".[ray]"', where="--ray") from None
    return ray


def _connect(ray: Any, address: str) -> None:
    """Join the cluster at ``address`` (``auto``: the one this machine is in), or, for ``local``, start a
    Ray of this machine's own even when another runs here (``ray.init``'s meaning of "local"); the
    ``ray.shutdown`` at the end stops that one."""
    _probe(address)
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot connect to the Ray cluster at {address}: {first}", where="--ray") from None


def _probe(address: str, timeout: float = 10.0) -> None:
    """One line when a HOST:PORT (or ray://HOST:PORT) address does not answer: ``ray.init`` would wait on
    an unreachable cluster for minutes."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # auto, local: Ray finds (or starts) the cluster itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise UserError(
            f"cannot reach the Ray cluster at {host}:{port} within {timeout:g} s ({exc.strerror or exc}): is "
            "`ray start --head` running there, and the port open?",
            where="--ray",
        ) from None


def preflight(address: str) -> None:
    """What ``run_sweep`` checks before anything is written: Ray installed, the cluster's port answering."""
    import_ray()
    _probe(address)


def run_on_ray(sweep: Sweep, todo: list[tuple[Any, bool]], rec: Any, address: str, console: Console) -> None:
    """Run ``todo``'s points as Ray tasks, recording each as it ends (``rec`` is sweep_run's recorder)."""
    ray = import_ray()
    resources = {"num_cpus": 1.0, **sweep.resources}  # checked by the sweep file's schema
    task = ray.remote(max_retries=RETRIES, retry_exceptions=False, **resources)(_train_point)
    threads = max(1, int(resources["num_cpus"]))
    root = sweep.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(8)
    (root / TOKEN_FILE).write_text(token, encoding="utf-8")
    _connect(ray, address)
    refs: dict[Any, tuple[Any, bool, float]] = {}
    for point, resume in todo:
        log = str(root / LOGS / f"{point.name}.log")
        argv = point.train_argv(resume=False)
        ref = task.remote(argv, str(point.run_dir.resolve()), str(root), token, log, threads)
        refs[ref] = (point, resume, time.perf_counter())
    console.print(f"{len(refs)} Ray tasks, each {resources}", highlight=False)
    done, stop = 0, _StopFlag()
    try:
        with stop:
            while refs and stop.signum is None:
                ready, _ = ray.wait(list(refs), num_returns=1, timeout=0.5)
                for ref in ready:
                    point, resume, start = refs.pop(ref)
                    result = rec.results[point.name]
                    result.ran = "resumed" if resume else "trained"
                    result.wall_seconds = time.perf_counter() - start
                    result.status, result.error = _outcome(ray, ref, point, root)
                    done += 1
                    rec.finish(result, console, done, len(todo))
        if stop.signum is not None:
            for ref in refs:
                ray.cancel(ref)  # the task passes SIGTERM on: its training checkpoints and stops
            _wait_cancelled(ray, list(refs))
            raise Interrupted("stopped", 128 + stop.signum)
    finally:
        ray.shutdown()


class _StopFlag:
    """SIGINT and SIGTERM noted, not raised: an exception raised inside Ray's wait would be garbled."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._note) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _note(self, signum: int, frame: object) -> None:
        self.signum = self.signum or signum


def _wait_cancelled(ray: Any, refs: list[Any], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    for ref in refs:
        with contextlib.suppress(Exception):  # cancelled or failed: what we waited for
            ray.get(ref, timeout=max(1.0, deadline - time.monotonic()))


def _outcome(ray: Any, ref: Any, point: Any, root: Path) -> tuple[str, str | None]:
    log = root / LOGS / f"{point.name}.log"
    try:
        code, node = ray.get(ref)
    except Exception as exc:  # noqa: BLE001 - the worker or node died (after the retry), or Ray failed
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return "failed", f"Ray task failed ({type(exc).__name__}): {first}"
    if code == TASK_NOT_SHARED:
        return "failed", f"node {node} does not see the sweep's directory {root}: it must be shared storage"
    if code != 0:
        return "failed", log_error(log, code)
    if finished_metrics(point.run_dir) is None:
        return "failed", (
            f"the point finished on node {node} but {point.run_dir}/metrics.json cannot be read here: the "
            "sweep's directory must be storage every node sees"
        )
    return "done", None
