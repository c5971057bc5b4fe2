"""Running ``lorakit train`` as several processes: ``--num-processes N`` (or ``train.num_processes: N``)
re-launches the same command through Accelerate's launcher, exactly as

    accelerate launch --multi_gpu --num_processes N -m lorakit train RECIPE ...

would, and ``train.distributed: FILE`` passes ``--config_file FILE`` instead, so DeepSpeed, FSDP and
several machines work as Accelerate provides them. The launched processes see the launcher's variables
(``LOCAL_RANK``, ``WORLD_SIZE``, ...) and train; they never launch again.

On a machine without a GPU the processes run on the CPU and talk over gloo: Accelerate's ``--cpu`` flag
starts one process (it expects ``mpirun`` to start the others), so lorakit uses the torchrun-based
launcher and sets ``ACCELERATE_USE_CPU=true``, which makes each process a gloo CPU process.

Several machines (``--num-machines M --machine-rank K --main-process-ip HOST --main-process-port P``, or
the same keys under ``train:`` or in the ``train.distributed`` file): every machine runs the same
``lorakit train`` with its own rank; ``--num-processes`` counts the processes of all machines, as
Accelerate's does. The machines meet through torchrun's static rendezvous on HOST:P, which waits at most
``--rdzv-timeout`` seconds; a machine that cannot reach the main one fails with one line naming HOST:P.
Started by an outside launcher instead (torchrun, a Kubernetes operator, SLURM's ``srun`` with
``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE``, ``RANK`` and perhaps ``LOCAL_RANK`` set),
``adopt_launcher_environment`` makes the process one of those WORLD_SIZE processes.
"""

from __future__ import annotations

import logging
import os
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from lorakit.errors import UserError
from lorakit.recipe import Recipe
from lorakit.training.preflight import check_precision, inside_launched_process, run_dir_for

logger = logging.getLogger(__name__)


DEFAULT_PORT = 29500  # Accelerate's and torchrun's
# What torchrun's static rendezvous raises when the machines do not meet in time (a TCPStore timeout:
# DistStoreError, a DistError, since before torch 2.6, the floor). Not RuntimeError at large: any other
# failure of the launcher would be told as a rendezvous one.
RENDEZVOUS_ERRORS: tuple[type[BaseException], ...] = (torch.distributed.DistError,)


@dataclass(frozen=True)
class Machines:
    """Where the machines of a run meet: the recipe's keys, else its ``train.distributed`` file's."""

    count: int = 1
    rank: int = 0
    ip: str | None = None
    port: int = DEFAULT_PORT
    timeout: int = 300

    @property
    def endpoint(self) -> str:
        return f"{self.ip}:{self.port}"


def machines(recipe: Recipe) -> Machines:
    """The machine settings of ``recipe``: a key set in the recipe (not at its default) wins over the same
    key in its Accelerate config file."""
    t = recipe.train
    file: dict[str, Any] = {}
    if t.distributed is not None:
        try:
            loaded = yaml.safe_load(Path(t.distributed).read_text())
        except (OSError, yaml.YAMLError):
            loaded = None  # Accelerate tells what is wrong with the file
        file = loaded if isinstance(loaded, dict) else {}
    set_keys = t.model_fields_set

    def pick(key: str, default: Any) -> Any:
        if key in set_keys or key not in file or file[key] is None:
            value = getattr(t, key)
            return default if value is None else value
        return file[key]

    count = int(pick("num_machines", 1))
    chosen = Machines(
        count=count,
        rank=int(pick("machine_rank", 0)),
        ip=str(pick("main_process_ip", "")) or None,
        port=int(pick("main_process_port", DEFAULT_PORT)),
        timeout=t.rdzv_timeout,
    )
    if count > 1 and chosen.ip is None:
        raise UserError("several machines need the main one's address", recipe.where("train.main_process_ip"))
    if chosen.rank >= count:
        raise UserError(f"machine rank {chosen.rank} of {count} machines", recipe.where("train.machine_rank"))
    return chosen


def needs_launch(recipe: Recipe) -> bool:
    """Whether ``lorakit train`` must re-launch itself: several processes or machines, or an Accelerate
    config file, asked for and not already inside a launched process."""
    t = recipe.train
    wanted = t.num_processes > 1 or t.num_machines > 1 or t.distributed is not None
    return wanted and not inside_launched_process()


def launch_arguments(recipe: Recipe, train_argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """The ``accelerate launch`` arguments that run ``lorakit <train_argv>``, and the environment
    variables to add. ``train_argv`` starts with ``train``."""
    t = recipe.train
    where = machines(recipe)
    env: dict[str, str] = {}
    if t.distributed is not None:
        args = ["--config_file", str(t.distributed)]
        if t.num_processes > 1:  # the recipe's count wins over the file's; its default (1) does not
            args += ["--num_processes", str(t.num_processes)]
    else:
        n = t.num_processes
        per_machine = max(1, n // where.count)
        args = ["--multi_gpu", "--num_processes", str(n), "--num_machines", "1", "--dynamo_backend", "no"]
        if where.count == 1:
            # Port 0: a free port, so that runs side by side on one machine do not collide.
            args += ["--main_process_port", "0"]
        if torch.cuda.is_available():
            if torch.cuda.device_count() < per_machine:
                raise UserError(
                    f"{per_machine} processes a machine asked for but only {torch.cuda.device_count()} "
                    "CUDA devices are visible",
                    recipe.where("train.num_processes"),
                )
        else:
            env["ACCELERATE_USE_CPU"] = "true"
            if "OMP_NUM_THREADS" not in os.environ:
                # torchrun would give each process one thread; share the cores out instead.
                env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // per_machine))
    if where.count > 1:
        if "--num_machines" in args:
            del args[args.index("--num_machines") : args.index("--num_machines") + 2]
        args += ["--num_machines", str(where.count), "--machine_rank", str(where.rank)]
        args += ["--main_process_ip", str(where.ip), "--main_process_port", str(where.port)]
        # Static rendezvous at MASTER_ADDR:MASTER_PORT (torchrun's --nnodes M --node-rank K), bounded;
        # DeepSpeed through the same torchrun launcher, not its ssh-based one.
        args += ["--same_network", "--rdzv_backend", "static", "--rdzv_conf", f"timeout={where.timeout}"]
        args += ["--deepspeed_multinode_launcher", "standard"]
    args += ["--mixed_precision", t.mixed_precision, "-m", "lorakit", *train_argv]
    return args, env


def adopt_launcher_environment(recipe: Recipe) -> None:
    """Make a process that an outside launcher started one of its ``WORLD_SIZE`` processes: torchrun sets
    ``LOCAL_RANK``, a Kubernetes operator or ``srun`` with one process a machine may not (then 0); without
    a GPU the processes talk over gloo (``ACCELERATE_USE_CPU``). A process of rank > 0 waits at most
    ``train.rdzv_timeout`` seconds for ``MASTER_ADDR:MASTER_PORT`` and fails with one line if it never
    answers."""
    world = os.environ.get("WORLD_SIZE", "")
    if not world.isdigit() or int(world) < 2:
        return
    if "MASTER_ADDR" not in os.environ:
        raise UserError(f"WORLD_SIZE is {world} but MASTER_ADDR is not set", where="environment")
    rank = os.environ.get("RANK", "")
    if not rank.isdigit():
        raise UserError(f"WORLD_SIZE is {world} but RANK is not set", where="environment")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_PORT", str(DEFAULT_PORT))
    if not torch.cuda.is_available():
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    if int(rank) > 0 and int(os.environ["LOCAL_RANK"]) == 0:
        wait_for_main(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), recipe.train.rdzv_timeout)


def wait_for_main(host: str, port: int, timeout: float) -> None:
    """Wait until ``host:port`` accepts a connection, at most ``timeout`` seconds; then a one-line error."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, timeout)):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise UserError(unreachable(host, port, timeout), where="rendezvous") from None
            time.sleep(0.5)


def unreachable(host: str, port: int, timeout: float) -> str:
    """The one line a machine that never reached the main one fails with."""
    return (
        f"cannot reach the main process at {host}:{port} within {timeout:g} s (--rdzv-timeout): is the "
        "main machine (rank 0) started, the address right and the port open?"
    )


def launch(recipe: Recipe, train_argv: Sequence[str], resume: bool) -> int:
    """Run ``lorakit <train_argv>`` under Accelerate's launcher; returns the exit status of the first
    process that failed (0 when all succeeded)."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    meet = machines(recipe)
    # Told once here rather than once by every process.
    try:
        run_dir_for(recipe, resume)
    except UserError as exc:
        if resume and meet.rank > 0:  # the main machine writes checkpoints; this one reads them
            raise UserError(
                f"{exc}; the run directory must be on storage every machine sees (the main one writes "
                "the checkpoints)"
            ) from None
        raise
    check_precision(recipe, "cuda" if torch.cuda.is_available() else "cpu")
    args, env = launch_arguments(recipe, train_argv)
    if meet.rank > 0:  # the main machine's launcher opens the port: a clear line if it never does
        wait_for_main(str(meet.ip), meet.port, meet.timeout)
    shown = " ".join(f"{k}={v}" for k, v in env.items())
    print(f"lorakit: {shown + ' ' if shown else ''}accelerate launch {shlex.join(args)}", file=sys.stderr)
    try:
        parsed = launch_command_parser().parse_args(args)
    except SystemExit as exc:  # argparse already said what is wrong
        return int(exc.code) if isinstance(exc.code, int) else 2
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        # In this process rather than as `accelerate launch` in a subprocess: the launcher's errors
        # keep the failed process's exit status, which the command line would turn into 1.
        launch_command(parsed)
    except subprocess.CalledProcessError as exc:  # the one-process launcher
        return exc.returncode or 1
    except ValueError as exc:  # Accelerate's checks of the launch configuration
        where = recipe.where("train.distributed" if recipe.train.distributed else "train.num_processes")
        raise UserError(f"accelerate launch: {exc}", where) from None
    except RENDEZVOUS_ERRORS:
        if meet.count == 1:
            raise
        logger.debug("rendezvous failed", exc_info=True)
        if meet.rank == 0:
            raise UserError(
                f"the other {meet.count - 1} machine(s) did not join at {meet.endpoint} within "
                f"{meet.timeout} s (--rdzv-timeout): are they started with --main-process-ip {meet.ip} "
                f"--main-process-port {meet.port}?",
                where="rendezvous",
            ) from None
        raise UserError(unreachable(str(meet.ip), meet.port, meet.timeout), where="rendezvous") from None
    except ChildFailedError as exc:  # torchrun's: the earliest failure is the cause, the rest were stopped
        code = exc.get_first_failure()[1].exitcode
        return code if code > 0 else 1  # negative: killed by a signal
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return 0
