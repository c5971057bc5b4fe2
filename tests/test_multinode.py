"""Training across machines, tested as two machines on one host: two ``lorakit train`` launches with
``--num-machines 2`` on 127.0.0.1 (gloo), each from its own working directory, writing one run directory
(the storage every machine sees), against one process with the doubled batch.

Default suite: the launch arguments, the recipe keys, the one-line rendezvous failures, and DDP on two
machines (one process each) plus the same run started as an outside launcher would (MASTER_ADDR, RANK...).
``make test-all`` (slow): SIGTERM to the second machine stops both and ``--resume`` on both finishes with
the uninterrupted adapter; ZeRO-2 on two machines.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from processes import (
    BATCH,
    REPO,
    TOLERANCE,
    max_difference,
    one_process,
    run_outputs,
    write_process_recipe,
)

from lorakit.errors import UserError
from lorakit.recipe import load_recipe
from lorakit.training.launch import (
    adopt_launcher_environment,
    launch_arguments,
    machines,
    needs_launch,
    wait_for_main,
)
from lorakit.training.preflight import _LAUNCHER_VARIABLES

CONFIGS = REPO / "configs" / "distributed"
STEPS = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _recipe(tmp_path: Path, **train: object):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"train": train}))
    return load_recipe(path)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (*_LAUNCHER_VARIABLES, "RANK", "MASTER_ADDR")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def machine(
    workdir: Path, recipe: Path, rank: int, port: int, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """One "machine": ``lorakit train RECIPE --num-machines 2 --machine-rank RANK`` from its own folder."""
    workdir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "lorakit", "train", str(recipe), "--num-machines", "2"]
    command += [
        "--machine-rank",
        str(rank),
        "--main-process-ip",
        "127.0.0.1",
        "--main-process-port",
        str(port),
    ]
    return subprocess.Popen(
        [*command, *args],
        cwd=workdir,
        env=env or _clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def both(processes: list[subprocess.Popen[str]], timeout: float = 600) -> list[tuple[int, str]]:
    """Each process's exit status and its standard output and error together."""
    outputs = ["".join(p.communicate(timeout=timeout)) for p in processes]
    return [(p.returncode, out) for p, out in zip(processes, outputs, strict=True)]


# ---------------------------------------------------------------------------------------------------------
# The launch, the keys, the bounded wait


def test_machines_are_passed_to_accelerate_with_a_bounded_static_rendezvous(tmp_path: Path) -> None:
    recipe = _recipe(
        tmp_path,
        num_processes=4,
        num_machines=2,
        machine_rank=1,
        main_process_ip="10.0.0.1",
        main_process_port=29555,
        rdzv_timeout=42,
    )
    assert needs_launch(recipe)
    args, _ = launch_arguments(recipe, ["train", "r.yaml"])
    line = " ".join(args)
    assert "--num_processes 4" in line  # all machines' processes, as Accelerate counts them
    assert "--num_machines 2 --machine_rank 1 --main_process_ip 10.0.0.1 --main_process_port 29555" in line
    assert "--rdzv_backend static --rdzv_conf timeout=42" in line and "--same_network" in args
    assert "--deepspeed_multinode_launcher standard" in line  # torchrun for ZeRO too, never ssh
    assert args.count("--num_machines") == 1 and args[args.index("--main_process_port") + 1] != "0"


def test_the_machine_keys_of_a_distributed_file_count_and_the_recipe_wins(tmp_path: Path) -> None:
    config = tmp_path / "zero2.yaml"
    text = (CONFIGS / "deepspeed-zero2.yaml").read_text()
    config.write_text(text.replace("num_machines: 1", "num_machines: 2\nmain_process_ip: 10.0.0.9"))
    from_file = machines(_recipe(tmp_path, distributed=str(config)))
    assert (from_file.count, from_file.rank, from_file.endpoint) == (2, 0, "10.0.0.9:29500")
    mine = _recipe(tmp_path, distributed=str(config), machine_rank=1, main_process_port=3000)
    assert machines(mine).endpoint == "10.0.0.9:3000" and machines(mine).rank == 1
    args, _ = launch_arguments(mine, ["train", "r.yaml"])
    assert "--machine_rank 1" in " ".join(args) and args[:2] == ["--config_file", str(config)]


@pytest.mark.parametrize(
    ("train", "key"),
    [
        ({"num_machines": 2, "num_processes": 2}, "main_process_ip"),
        ({"num_machines": 2, "machine_rank": 2, "main_process_ip": "h", "num_processes": 2}, "machine_rank"),
        ({"num_machines": 2, "num_processes": 3, "main_process_ip": "h"}, "num_processes"),
        ({"num_machines": 2, "main_process_ip": "h"}, "num_processes"),
    ],
)
def test_inconsistent_machine_keys_are_one_line_naming_the_key(tmp_path: Path, train: dict, key: str) -> None:
    with pytest.raises(UserError, match=f"train.{key}"):
        _recipe(tmp_path, **train)


def test_a_machine_that_cannot_reach_the_main_one_fails_in_one_line_after_the_timeout() -> None:
    port, start = free_port(), time.monotonic()
    with pytest.raises(UserError, match=f"cannot reach the main process at 127.0.0.1:{port} within 1 s"):
        wait_for_main("127.0.0.1", port, 1)
    assert time.monotonic() - start < 5


@pytest.mark.parametrize(
    ("rank", "told"), [(1, "cannot reach the main process at"), (0, "the other 1 machine(s) did not join at")]
)
def test_the_cli_says_which_host_and_port_it_could_not_reach(tmp_path: Path, rank: int, told: str) -> None:
    """One machine alone, the other never started: exit 2, one line naming host:port, no traceback,
    within the timeout (rank 1 finds no main process; the main one waits for the other in vain)."""
    port, start = free_port(), time.monotonic()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"train": {"num_processes": 2}, "output_dir": str(tmp_path / "run")}))
    done = machine(tmp_path / f"m{rank}", recipe, rank, port, "--rdzv-timeout", "2")
    ((code, err),) = both([done], timeout=60)
    assert code == 2, err
    lines = [line for line in err.splitlines() if "lorakit: error" in line]
    assert len(lines) == 1 and f"{told} 127.0.0.1:{port} within 2 s (--rdzv-timeout)" in lines[0], err
    assert "Traceback" not in err
    assert time.monotonic() - start < 30


def test_an_outside_launchers_variables_make_a_process_one_of_world_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in (*_LAUNCHER_VARIABLES, "RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        monkeypatch.setenv(name, "")  # recorded, so that what the function sets is undone after
        monkeypatch.delenv(name)
    recipe = _recipe(tmp_path, num_processes=2, rdzv_timeout=1)
    adopt_launcher_environment(recipe)  # no launcher: nothing to do
    assert "LOCAL_RANK" not in os.environ
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(UserError, match="MASTER_ADDR"):
        adopt_launcher_environment(recipe)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    adopt_launcher_environment(recipe)  # rank 0 hosts the store: it does not wait for itself
    assert os.environ["LOCAL_RANK"] == "0" and os.environ["MASTER_PORT"] == "29500"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    with pytest.raises(UserError, match="cannot reach the main process"):
        adopt_launcher_environment(recipe)


# ---------------------------------------------------------------------------------------------------------
# Two machines on one host against one process with the doubled batch


def _two_machine_recipe(root: Path, model: Path, data: Path, name: str, steps: int, **train) -> Path:
    return write_process_recipe(root / f"{name}.yaml", model, data, root / name, 2, steps, **train)


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory, no_dropout_roberta: Path, shared_data: Path) -> dict:
    """One process with the doubled batch: the reference."""
    root = tmp_path_factory.mktemp("one-process")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAKIT_HOME", str(root / "home"))
        data = shared_data / "glue" / "SST-2"
        recipe = write_process_recipe(root / "one.yaml", no_dropout_roberta, data, root / "one", 1, STEPS)
        one_process(str(recipe))
    return run_outputs(root / "one")


@pytest.fixture(scope="module")
def ddp(tmp_path_factory: pytest.TempPathFactory, no_dropout_roberta: Path, shared_data: Path) -> dict:
    root = tmp_path_factory.mktemp("multinode")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAKIT_HOME", str(root / "home"))
        data = shared_data / "glue" / "SST-2"
        recipe = _two_machine_recipe(root, no_dropout_roberta, data, "machines", STEPS)
        port = free_port()
        done = both([machine(root / f"m{k}", recipe, k, port) for k in (0, 1)])
    assert [code for code, _ in done] == [0, 0], done[0][1][-3000:] + done[1][1][-3000:]
    return {"root": root, "output": [out for _, out in done], **run_outputs(root / "machines")}


def test_two_machines_train_the_adapter_of_one_process_with_the_doubled_batch(
    ddp: dict, single: dict
) -> None:
    assert ddp["metrics"]["num_processes"] == 2 and single["metrics"]["global_batch_size"] == 2 * BATCH
    assert max(v.abs().max().item() for k, v in single["adapter"].items() if "lora_B" in k) > 1e-3
    assert max_difference(single["adapter"], ddp["adapter"]) <= TOLERANCE
    for key in ("final", "best", "train_samples", "global_batch_size", "eval_examples"):
        assert single["metrics"][key] == ddp["metrics"][key], key
    main, second = ddp["output"]
    assert "--num_machines 2 --machine_rank 0" in main and "--num_machines 2 --machine_rank 1" in second
    assert "best accuracy" in main and "best accuracy" not in second  # the main machine tells
    # Each machine ran from its own folder and wrote nothing there: the run is in the shared directory.
    root = ddp["root"]
    assert not any((root / "m0").iterdir()) and not any((root / "m1").iterdir())


@pytest.mark.slow
def test_an_outside_launchers_variables_train_the_same_adapter(
    tmp_path: Path, no_dropout_roberta: Path, shared_data: Path, single: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes started as SLURM's srun or a Kubernetes operator would: MASTER_ADDR, MASTER_PORT,
    WORLD_SIZE and RANK set, no LOCAL_RANK, no lorakit flags."""
    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path / "home"))
    data = shared_data / "glue" / "SST-2"
    recipe = _two_machine_recipe(tmp_path, no_dropout_roberta, data, "env", STEPS)
    port, processes = free_port(), []
    for rank in (0, 1):
        (tmp_path / f"e{rank}").mkdir()
        env = _clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank))
        command = [sys.executable, "-m", "lorakit", "train", str(recipe)]
        processes.append(
            subprocess.Popen(
                command,
                cwd=tmp_path / f"e{rank}",
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    done = both(processes)
    assert [code for code, _ in done] == [0, 0], done[0][1][-3000:] + done[1][1][-3000:]
    run = run_outputs(tmp_path / "env")
    assert max_difference(single["adapter"], run["adapter"]) <= TOLERANCE
    assert run["metrics"]["num_processes"] == 2


# ---------------------------------------------------------------------------------------------------------
# Slow: SIGTERM on the second machine, resume on both; ZeRO-2 on two machines


@pytest.mark.slow
def test_sigterm_to_the_second_machine_stops_both_and_resume_on_both_finishes_exactly(
    tmp_path: Path, no_dropout_roberta: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path / "home"))
    data, steps = shared_data / "glue" / "SST-2", 60
    train = {"save_every": None, "eval_every": steps, "log_every": 5}
    recipe = _two_machine_recipe(tmp_path, no_dropout_roberta, data, "run", steps, **train)
    port = free_port()
    processes = [machine(tmp_path / f"m{k}", recipe, k, port) for k in (0, 1)]
    log, deadline = tmp_path / "run" / "logs" / "train.jsonl", time.monotonic() + 180
    while not (log.is_file() and '"step": 10,' in log.read_text()):
        assert all(p.poll() is None for p in processes), both(processes)
        assert time.monotonic() < deadline
        time.sleep(0.05)
    processes[1].send_signal(signal.SIGTERM)
    done = both(processes, timeout=180)
    assert [code for code, _ in done] == [143, 143], done[0][1][-3000:] + done[1][1][-3000:]
    told = [line for _, err in done for line in err.splitlines() if "stopped by SIGTERM after step" in line]
    assert len(told) == 1, done  # the main process tells, once, on the main machine
    step = int(told[0].split("after step ")[1].split()[0])
    assert 10 <= step < steps and step % 5 == 0
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == [f"step-{step}"]

    port = free_port()
    done = both([machine(tmp_path / f"m{k}", recipe, k, port, "--resume") for k in (0, 1)])
    assert [code for code, _ in done] == [0, 0], done[0][1][-3000:] + done[1][1][-3000:]
    one = ["--set", "train.num_processes=1", "--set", f"train.batch_size={2 * BATCH}"]
    one_process(str(recipe), "--output-dir", str(tmp_path / "straight"), *one)
    resumed, straight = run_outputs(tmp_path / "run"), run_outputs(tmp_path / "straight")
    assert max_difference(resumed["adapter"], straight["adapter"]) <= TOLERANCE
    assert resumed["metrics"]["final"] == straight["metrics"]["final"]


@pytest.mark.slow
def test_zero2_on_two_machines_trains_the_adapter_of_one_process_with_the_doubled_batch(
    tmp_path: Path, no_dropout_roberta: Path, shared_data: Path, single: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path / "home"))
    data = shared_data / "glue" / "SST-2"
    zero2 = str(CONFIGS / "deepspeed-zero2.yaml")
    recipe = _two_machine_recipe(tmp_path, no_dropout_roberta, data, "zero2", STEPS, distributed=zero2)
    port = free_port()
    done = both([machine(tmp_path / f"m{k}", recipe, k, port) for k in (0, 1)])
    assert [code for code, _ in done] == [0, 0], done[0][1][-3000:] + done[1][1][-3000:]
    assert f"--config_file {zero2} --num_processes 2" in done[0][1]
    assert "--deepspeed_multinode_launcher standard" in done[1][1]
    two = run_outputs(tmp_path / "zero2")
    assert two["metrics"]["num_processes"] == 2
    assert max_difference(single["adapter"], two["adapter"]) <= TOLERANCE
    assert single["metrics"]["final"] == two["metrics"]["final"]
