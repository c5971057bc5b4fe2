"""A rich progress bar for training: steps, loss, learning rate and samples per second."""

from __future__ import annotations

from types import TracebackType

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class TrainProgress:
    """Shown on the main process only; updated at logging intervals, so it costs nothing per step."""

    def __init__(self, total_steps: int, enabled: bool = True, start: int = 0) -> None:
        self.enabled = enabled
        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            disable=not enabled,
        )
        self._task = self._progress.add_task("train", total=total_steps, completed=start, stats="")

    def __enter__(self) -> TrainProgress:
        self._progress.start()
        return self

    def update(self, step: int, loss: float, lr: float, samples_per_second: float) -> None:
        """Move the bar to ``step`` and show the latest figures."""
        stats = f"loss {loss:.4f}  lr {lr:.2e}  {samples_per_second:.1f} samples/s"
        self._progress.update(self._task, completed=step, stats=stats)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._progress.stop()
