"""The several-device options of ``lorakit train`` and the cluster options of ``lorakit sweep`` as Typer
annotations, so that ``lorakit/cli.py`` stays one line an option; ``overrides``, which turns the train
options that were given into ``--set train.KEY=VALUE`` overrides (the recipe's keys of the same names), and
``bare_ray``, which lets ``lorakit sweep SWEEP.yaml --ray`` go without an address."""

from __future__ import annotations

from typing import Annotated

import typer

NumProcesses = Annotated[
    int | None,
    typer.Option("--num-processes", help="Accelerate processes (devices), counted on all machines."),
]
NumMachines = Annotated[int | None, typer.Option("--num-machines", help="Machines of one run (default 1).")]
MachineRank = Annotated[int | None, typer.Option("--machine-rank", help="This machine's rank; 0: the main.")]
MainProcessIp = Annotated[
    str | None, typer.Option("--main-process-ip", help="The main machine's address, as the others reach it.")
]
MainProcessPort = Annotated[
    int | None, typer.Option("--main-process-port", help="The port the machines meet on (default 29500).")
]
RdzvTimeout = Annotated[
    int | None,
    typer.Option("--rdzv-timeout", help="Seconds a machine waits for the others before failing (300)."),
]
Ray = Annotated[
    str | None,
    typer.Option(
        "--ray",
        metavar="[ADDRESS|auto]",
        help="Run the points as Ray tasks: on the cluster at ADDRESS, 'auto' (the one this machine is in), "
        "or, given alone, on a Ray started for this command.",
    ),
]
Only = Annotated[
    list[str] | None,
    typer.Option(
        "--only",
        metavar="GLOB",
        help="Train only the points whose name matches (repeatable): --only 'name=stsb,*'.",
    ),
]
LOCAL_RAY = "local"  # what a bare --ray stands for (ray.init's own name for a fresh local instance)


# The train options above, by their parameter names in `lorakit train`, which are the recipe's train keys.
TRAIN_KEYS = (
    "num_processes",
    "num_machines",
    "machine_rank",
    "main_process_ip",
    "main_process_port",
    "rdzv_timeout",
)


def overrides(given: dict[str, object]) -> list[str]:
    """``train.KEY=VALUE`` for every train option in ``given`` (the command's arguments) that was given:
    the launched processes get them as ``--set`` overrides, as any other recipe key."""
    return [f"train.{key}={given[key]}" for key in TRAIN_KEYS if given.get(key) is not None]


def bare_ray(argv: list[str]) -> list[str]:
    """``argv`` with a bare ``--ray`` of ``lorakit sweep`` (last, or followed by another option) written
    ``--ray=local``. Typer's options take a value or none, never an optional one; ``--ray ADDRESS`` and
    ``--ray=ADDRESS`` are left as they are."""
    if not argv or argv[0] != "sweep" or "--ray" not in argv:
        return argv
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--":
            break
        if arg == "--ray" and (i + 1 == len(out) or out[i + 1].startswith("-")):
            out[i] = f"--ray={LOCAL_RAY}"
    return out
