"""``lorakit sweep --ray``: the points as Ray tasks.

Default suite (no Ray started, under a second): the bare ``--ray`` flag, ``--jobs`` with ``--ray``, the
sweep file's ``resources`` key, and the shared-storage checks of a task and of the driver. ``make test-all``
(slow): a real local Ray cluster (``ray start --head`` on 127.0.0.1 with 2 CPUs, stopped after) against
``--jobs 2``, a killed worker, the stop signal; and a bare ``--ray`` that starts a Ray of its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_multinode import free_port
from test_sweep import base_recipe, read_csv, same_but_numbers, write_sweep

from lorakit.analysis import sweep_ray
from lorakit.analysis.sweep import load_sweep
from lorakit.cli import main
from lorakit.train_flags import bare_ray

RAY = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"


# ---------------------------------------------------------------------------------------------------------
# Without a cluster


def test_a_bare_ray_flag_means_a_ray_started_for_the_command() -> None:
    assert bare_ray(["sweep", "s.yaml", "--ray"]) == ["sweep", "s.yaml", "--ray=local"]
    assert bare_ray(["sweep", "s.yaml", "--ray", "--dry-run"])[2] == "--ray=local"
    assert bare_ray(["sweep", "s.yaml", "--ray", "auto"]) == ["sweep", "s.yaml", "--ray", "auto"]
    assert bare_ray(["sweep", "s.yaml", "--ray=h:6379"]) == ["sweep", "s.yaml", "--ray=h:6379"]
    assert bare_ray(["train", "r.yaml", "--ray"]) == ["train", "r.yaml", "--ray"]  # sweep's option only


def test_ray_with_jobs_and_bad_resources_are_one_line_errors(
    tmp_path: Path, tiny_roberta_dir: Path, shared_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base_recipe(tmp_path / "base.yaml", tiny_roberta_dir, shared_data)
    out = tmp_path / "o"
    sweep = write_sweep(tmp_path / "s.yaml", recipe="base.yaml", grid={"lora.r": [2]}, output_dir=str(out))
    assert main(["sweep", str(sweep), "--ray", "--jobs", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--jobs" in err and "--ray" in err, err
    port = free_port()  # nothing listens there: told at once, not after Ray's minutes of retrying
    assert main(["sweep", str(sweep), "--ray", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert f"cannot reach the Ray cluster at 127.0.0.1:{port}" in err[-1] and "Traceback" not in str(err)
    bad_resources = [
        ({"gpus": 1}, "resources.gpus: Input should be 'num_cpus', 'num_gpus' or 'memory'"),
        ({"num_gpus": -1}, "resources.num_gpus:"),
        ({"num_gpus": 1.5}, "resources: num_gpus above 1 is a whole number"),  # Ray's rule, checked at once
    ]
    for resources, expected in bad_resources:
        bad = write_sweep(
            tmp_path / "bad.yaml",
            recipe="base.yaml",
            grid={"lora.r": [2]},
            resources=resources,
            output_dir=str(out),
        )
        assert main(["sweep", str(bad), "--ray"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{bad}: {expected}" in err, err
    assert not out.exists()  # nothing ran, nothing written
    ok = write_sweep(
        tmp_path / "ok.yaml", recipe="base.yaml", grid={"lora.r": [2]}, resources={"num_gpus": 1}
    )
    assert load_sweep(ok).resources == {"num_gpus": 1.0}


def test_a_node_that_does_not_see_the_sweep_directory_fails_its_point_in_one_line(tmp_path: Path) -> None:
    """The task's check (a token the driver wrote in the root) and the driver's (the point's metrics)."""
    root, run_dir = tmp_path / "root", tmp_path / "root" / "p"
    root.mkdir()
    (root / sweep_ray.TOKEN_FILE).write_text("written-by-another-sweep")
    log = str(root / "logs" / "p.log")
    code, node = sweep_ray._train_point(["train", "x.yaml"], str(run_dir), str(root), "mine", log, 1)
    assert code == sweep_ray.TASK_NOT_SHARED and node and not run_dir.exists()  # trained nothing

    class Point:  # what _outcome reads of a sweep point
        name, run_dir = "p", tmp_path / "root" / "p"

    class Ray:  # a finished task's result as ray.get returns it
        def __init__(self, result: tuple[int, str]) -> None:
            self.result = result

        def get(self, ref: object) -> tuple[int, str]:
            return self.result

    status, error = sweep_ray._outcome(Ray((code, "node-7")), None, Point, root)
    assert status == "failed" and f"node node-7 does not see the sweep's directory {root}" in error
    # The task says it finished but the driver cannot read the point's metrics.json: not "done".
    status, error = sweep_ray._outcome(Ray((0, "node-7")), None, Point, root)
    assert status == "failed" and "metrics.json cannot be read here" in error and "every node" in error
    assert "\n" not in error


# ---------------------------------------------------------------------------------------------------------
# On a real local Ray cluster (slow)


# No token authentication: Ray 2.5x turns it on by default and keeps the token in ~/.ray, which a test must
# neither read nor write.
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A one-node Ray cluster with 2 CPUs on 127.0.0.1, in its own temporary directory; its address."""
    temp = tmp_path_factory.mktemp("ray")
    port, client_port = free_port(), free_port()
    start = [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2"]
    start += ["--include-dashboard=false", f"--temp-dir={temp}", "--disable-usage-stats"]
    start += [f"--ray-client-server-port={client_port}"]
    with pytest.MonkeyPatch.context() as mp:
        for name, value in RAY_ENV.items():
            mp.setenv(name, value)  # for the sweeps the tests run in this process too
        try:
            subprocess.run(start, check=True, env=dict(os.environ), capture_output=True, timeout=120)
            yield f"127.0.0.1:{port}"
        finally:
            _stop_cluster(temp, client_port)


def _stop_cluster(temp: Path, client_port: int) -> None:
    """Stop this cluster's processes and theirs, found by its directory and its client port: `ray stop`
    would stop every Ray on the machine. SIGTERM, then SIGKILL what is left, as `ray stop --force`."""
    roots = set(_processes(str(temp).encode()))
    roots |= set(_processes(b"ray.util.client.server", f"--port={client_port}".encode()))
    family = roots | _descendants(roots)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in family:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 5
        while any(_alive(pid) for pid in family) and time.monotonic() < deadline:
            time.sleep(0.2)
    assert not any(_alive(pid) for pid in family)


def _descendants(pids: set[int]) -> set[int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parents[int(entry)] = int(
                    Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]
                )
    found, frontier = set(), set(pids)
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    """Running, and not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_ray_gives_the_sweep_md_of_jobs_2_and_marks_a_failed_point(
    tmp_path: Path, tiny_roberta_dir: Path, shared_data: Path, cluster: str
) -> None:
    base_recipe(tmp_path / "base.yaml", tiny_roberta_dir, shared_data)
    grid = {"lora.target_modules": [["query"], ["nosuch"]], "lora.r": [2, 4]}
    sweep = write_sweep(
        tmp_path / "s.yaml",
        recipe="base.yaml",
        grid=grid,
        set={"train.seed": 1},
        resources={"num_cpus": 1},
    )
    jobs, on_ray = tmp_path / "jobs", tmp_path / "ray"
    assert main(["sweep", str(sweep), "--output-dir", str(jobs), "--jobs", "2"]) == 1
    assert main(["sweep", str(sweep), "--output-dir", str(on_ray), "--ray", cluster]) == 1
    assert same_but_numbers((jobs / "sweep.md").read_text(), (on_ray / "sweep.md").read_text())
    for name in ("target_modules=query,r=2", "target_modules=query,r=4"):
        here, there = (load_file(d / name / "adapter_model.safetensors") for d in (jobs, on_ray))
        assert here.keys() == there.keys()
        assert all(torch.allclose(here[k], there[k], rtol=0, atol=1e-6) for k in here)
        assert (on_ray / "logs" / f"{name}.log").is_file()
    status = {r["point"]: (r["status"], r["ran"]) for r in read_csv(on_ray / "sweep.csv")}
    assert status["target_modules=query,r=2"] == ("done", "trained")
    assert status["target_modules=nosuch,r=4"] == ("failed", "trained")
    failed = [r for r in read_csv(on_ray / "sweep.csv") if r["status"] == "failed"]
    assert all("nosuch" in r["error"] for r in failed)
    # A rerun reuses what finished and retries the failed points only.
    assert main(["sweep", str(sweep), "--output-dir", str(on_ray), "--ray", cluster]) == 1
    ran = {r["point"]: r["ran"] for r in read_csv(on_ray / "sweep.csv")}
    assert ran["target_modules=query,r=4"] == "reused" and ran["target_modules=nosuch,r=2"] == "trained"


def _long_sweep(tmp_path: Path, tiny_roberta_dir: Path, shared_data: Path, steps: int = 4000) -> Path:
    """One point that trains long enough to be stopped (about 80 steps a second here)."""
    base_recipe(tmp_path / "base.yaml", tiny_roberta_dir, shared_data)
    fixed = {
        "train.max_steps": steps,
        "train.eval_every": steps,
        "train.save_every": 20,
        "train.log_every": 5,
    }
    return write_sweep(
        tmp_path / "s.yaml",
        recipe="base.yaml",
        grid={"lora.r": [2]},
        set=fixed,
        output_dir=str(tmp_path / "out"),
        resources={"num_cpus": 1},
    )


def _sweep_process(sweep: Path, cluster: str, tmp_path: Path) -> subprocess.Popen[str]:
    env = {**os.environ, **RAY_ENV, "LORAKIT_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "lorakit", "sweep", str(sweep), "--ray", cluster],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_step(log: Path, process: subprocess.Popen[str], step: int) -> None:
    deadline = time.monotonic() + 240
    while not (log.is_file() and f'"step": {step},' in log.read_text()):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.1)


def _processes(*needles: bytes) -> list[int]:
    """The processes whose command line holds every one of ``needles`` (this test's, by their paths)."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if all(any(needle in part for part in cmd) for needle in needles):
                found.append(int(pid))
    return found


def _training_pids(run_dir: Path) -> list[int]:
    """The `lorakit train` processes of the point."""
    return _processes(b"train", str(run_dir).encode())


@pytest.mark.slow
def test_a_killed_workers_point_is_retried_and_resumes(
    tmp_path: Path, tiny_roberta_dir: Path, shared_data: Path, cluster: str
) -> None:
    sweep = _long_sweep(tmp_path, tiny_roberta_dir, shared_data, steps=400)
    process = _sweep_process(sweep, cluster, tmp_path)
    run_dir = tmp_path / "out" / "r=2"
    _wait_for_step(run_dir / "logs" / "train.jsonl", process, 30)
    (child,) = _training_pids(run_dir)
    worker = int(Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[1])
    os.kill(worker, signal.SIGKILL)  # the Ray worker running the task dies
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, out[-3000:] + err[-3000:]
    rows = read_csv(tmp_path / "out" / "sweep.csv")
    assert rows[0]["status"] == "done"
    log = (tmp_path / "out" / "logs" / "r=2.log").read_text()
    assert "stopped by SIGTERM" in log  # the orphaned training checkpointed, the retry resumed it
    steps = [json.loads(line)["step"] for line in (run_dir / "logs" / "train.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 400  # resumed, never started again


@pytest.mark.slow
def test_a_stop_signal_cancels_the_tasks_writes_the_tables_and_a_rerun_resumes(
    tmp_path: Path, tiny_roberta_dir: Path, shared_data: Path, cluster: str
) -> None:
    sweep = _long_sweep(tmp_path, tiny_roberta_dir, shared_data)
    process = _sweep_process(sweep, cluster, tmp_path)
    run_dir = tmp_path / "out" / "r=2"
    _wait_for_step(run_dir / "logs" / "train.jsonl", process, 30)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 130, out[-3000:] + err[-3000:]
    assert "sweep stopped" in err and "Traceback" not in err
    assert _training_pids(run_dir) == []  # the task was cancelled and its training ended with it
    assert read_csv(tmp_path / "out" / "sweep.csv")[0]["status"] == "not run"
    assert "1 points: 0 done, 0 failed, 1 not run." in (tmp_path / "out" / "sweep.md").read_text()
    assert any((run_dir / "checkpoints").iterdir())
    assert not (run_dir / "metrics.json").exists()
    assert "stopped by SIGTERM" in (tmp_path / "out" / "logs" / "r=2.log").read_text()
    # The rerun resumes the point (here told to stop at the next checkpoint, to keep the test short).
    stopped = max(
        int(step) for step in re.findall(r'"step": (\d+),', (run_dir / "logs" / "train.jsonl").read_text())
    )
    process = _sweep_process(sweep, cluster, tmp_path)
    _wait_for_step(run_dir / "logs" / "train.jsonl", process, stopped + 10)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 130, out[-3000:] + err[-3000:]
    assert (tmp_path / "out" / "logs" / "r=2.log").read_text().count("stopped by SIGTERM") == 2
    # Resumed, not started again: the append-only log's steps never go back.
    steps = [json.loads(line)["step"] for line in (run_dir / "logs" / "train.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] >= stopped + 10


@pytest.mark.slow
def test_a_bare_ray_starts_a_ray_for_the_command_and_a_point_is_the_run_lorakit_train_makes(
    tmp_path: Path, tiny_roberta_dir: Path, shared_data: Path
) -> None:
    base_recipe(tmp_path / "base.yaml", tiny_roberta_dir, shared_data)
    out = tmp_path / "out"
    sweep = write_sweep(tmp_path / "s.yaml", recipe="base.yaml", grid={"lora.r": [2]}, output_dir=str(out))
    rays = set(_processes(b"raylet"))  # the module's cluster, if running, is not this command's
    env = {**os.environ, **RAY_ENV, "LORAKIT_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    # The Ray's files in a short folder of the test's own (a socket's path is at most 107 bytes).
    with tempfile.TemporaryDirectory(prefix="lk-ray-") as ray_tmp:
        done = subprocess.run(
            [sys.executable, "-m", "lorakit", "sweep", str(sweep), "--ray"],
            env={**env, "RAY_TMPDIR": ray_tmp},
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "1 Ray tasks" in done.stdout
    assert set(_processes(b"raylet")) <= rays  # the Ray it started is stopped with it
    (record,) = json.loads((out / "sweep.json").read_text())["points"]
    assert (record["status"], record["ran"]) == ("done", "trained")
    direct = tmp_path / "direct"
    assert main([*shlex.split(record["command"])[1:], "--output-dir", str(direct)]) == 0
    here, there = (load_file(d / "adapter_model.safetensors") for d in (out / "r=2", direct))
    assert here.keys() == there.keys()
    # Not bit for bit: the task's training has one CPU thread, this process more (float sums reorder).
    assert all(torch.allclose(here[k], there[k], rtol=0, atol=1e-6) for k in here)
