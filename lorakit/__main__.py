"""The ``lorakit`` command and ``python -m lorakit`` (what ``accelerate launch -m lorakit`` runs).

Both leave through ``run``, which skips the interpreter's teardown once the command is done (see there);
``lorakit.cli.main`` stays a plain function that tests and other Python code call in-process.
"""

import atexit
import contextlib
import os
import sys
from typing import NoReturn


def run() -> NoReturn:
    """Run the command line, then leave with its exit status without the interpreter's teardown.

    Tearing down the ~3,600 modules that torch, transformers and datasets load took 3.5 s after every
    command (the whole-run bench's ``lorakit train``: metrics.json written to process gone, 3.7 s with the
    teardown, 0.2 s without). Every file lorakit writes is closed (and renamed into place) before ``main``
    returns, so only what others registered to run at exit is left: under one process those handlers still
    run (temporary directories, loggers); then the standard streams are flushed and the process leaves.
    """
    from lorakit.noise import quiet_command

    quiet_command(sys.argv[1:])  # before the libraries are imported
    from lorakit.cli import main

    status = main()
    from lorakit.training.preflight import launched_world_size  # only once the command is done

    # One of several launched processes, its process group torn down, skips the exit handlers too: DeepSpeed's
    # and gloo's native threads can abort the process there ("terminate called without an active
    # exception", seen once in CI) and turn a finished run into a failed one.
    if launched_world_size() == 1:
        atexit._run_exitfuncs()  # the interpreter's own runner of them; no public API runs them early
    for stream in (sys.stdout, sys.stderr):
        # A reader that went away (`lorakit ... | head`) or a closed stream: nothing left to deliver to.
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(status)


if __name__ == "__main__":
    run()
