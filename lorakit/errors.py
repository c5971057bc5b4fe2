"""Errors that the CLI reports as one line with exit status 2 (user errors) or 1 (run-time failures)."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix: a bad recipe, a missing file, an unknown task.

    The message is shown as one line, without a traceback, and the CLI exits with status 2.
    ``where`` names the file and key at fault, e.g. ``configs/x.yaml: lora.r``.
    """

    def __init__(self, message: str, where: str | None = None) -> None:
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


class Interrupted(Exception):
    """A run stopped on request (SIGTERM, SIGINT) after saving what lets it continue; the CLI shows the
    message (how to resume) and exits with ``exit_status`` (128 + the signal's number)."""

    def __init__(self, message: str, exit_status: int) -> None:
        self.exit_status = exit_status
        super().__init__(message)
