"""``python -m lorakit`` (what ``accelerate launch -m lorakit`` runs)."""

import os
import sys

from lorakit.cli import main

status = main()
from lorakit.training.preflight import launched_world_size  # noqa: E402  (only once the command is done)

if launched_world_size() > 1:
    # One of several launched processes, its work written and its process group torn down: leave without
    # the interpreter's teardown, where DeepSpeed's and gloo's native threads can abort the process
    # ("terminate called without an active exception", seen once in CI) and turn a finished run into a
    # failed one. Every file lorakit writes is closed by now; only the standard streams need flushing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
sys.exit(status)
