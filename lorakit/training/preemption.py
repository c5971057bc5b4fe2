"""Stopping a run cleanly when asked to: SIGTERM (what a cluster scheduler or a spot instance sends before
it kills) or SIGINT (Ctrl-C) make training finish its current optimizer step, write a checkpoint and stop
with exit status 128 + the signal's number, saying how to resume; ``--resume`` then continues from exactly
there. A second SIGINT stops at once, as Ctrl-C does.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType

from lorakit.errors import Interrupted

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Within the block, SIGTERM and SIGINT set ``received`` instead of ending the process (the main thread
    only: signal handlers can be installed nowhere else). The previous handlers come back after it."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without the checkpoint
        self.received = self.received or signum


def interrupted(
    signum: int, step: int, total: int, checkpoint: str, recipe_source: str, tell: bool = True
) -> Interrupted:
    """The error that ends a run stopped by ``signum`` after ``step``, with the command that resumes it.
    ``tell`` False (the other processes of a multi-process run): the same status, no message."""
    name = signal.Signals(signum).name
    message = (
        f"stopped by {name} after step {step} of {total}; checkpoint written to {checkpoint}. Continue "
        f"with the same command and --resume: lorakit train {recipe_source} [your options] --resume"
    )
    return Interrupted(message if tell else "", exit_status=128 + signum)


def interrupted_at_the_end(signum: int, run_dir: str, tell: bool = True) -> Interrupted:
    """The error for a stop signal that came after the last step (during the final evaluation or the
    saving): the run is complete and written, and the caller (a sweep, a script) still learns of the stop."""
    message = f"{signal.Signals(signum).name} received as the run ended: it is complete in {run_dir}"
    return Interrupted(f"{message}; stopping here" if tell else "", 128 + signum)
