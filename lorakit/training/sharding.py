"""Training batches across processes: N processes with batch b train exactly as one process with N·b.

The sampler orders rows and cuts them into *global* batches of N·b (so length grouping groups at the
global size, as one process with N·b would). ``ProcessSlices`` yields every global batch as N
consecutive equal slices; Accelerate's default sharding hands batch k·N + i to process i, so process i
receives slice i of each global batch, and the union of the slices of one step is that step's global
batch. Equal slices make DDP's average of per-process mean gradients the mean over the global batch.

The price of equal slices: a last global batch whose size is not a multiple of N loses its remainder
(fewer than N rows an epoch; none with one process), and one smaller than N is dropped whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader, Sampler


class ProcessSlices(Sampler[list[int]]):
    """Each global batch of ``sampler``'s order, as ``num_processes`` consecutive equal slices."""

    def __init__(self, sampler: Sampler[int], global_batch_size: int, num_processes: int) -> None:
        if global_batch_size <= 0 or num_processes <= 0:
            raise ValueError("global_batch_size and num_processes must be positive")
        if global_batch_size % num_processes:
            raise ValueError(
                f"global batch {global_batch_size} does not split into {num_processes} equal parts"
            )
        # Named ``sampler`` because Accelerate forwards ``set_epoch`` to ``batch_sampler.sampler``.
        self.sampler = sampler
        self.global_batch_size = global_batch_size
        self.num_processes = num_processes

    def set_epoch(self, epoch: int) -> None:
        """Draw the order of ``epoch`` (forwarded to the index sampler)."""
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def num_global_batches(self) -> int:
        """Optimizer-step batches in one epoch (before gradient accumulation)."""
        full, rest = divmod(len(self.sampler), self.global_batch_size)  # type: ignore[arg-type]
        return full + (1 if rest - rest % self.num_processes else 0)

    def global_batches(self) -> Iterator[list[int]]:
        """This epoch's global batches, each cut to a multiple of ``num_processes`` rows."""
        order = list(self.sampler)
        for start in range(0, len(order), self.global_batch_size):
            batch = order[start : start + self.global_batch_size]
            batch = batch[: len(batch) - len(batch) % self.num_processes]
            if batch:
                yield batch

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches():
            per = len(batch) // self.num_processes
            for i in range(self.num_processes):
                yield batch[i * per : (i + 1) * per]

    def __len__(self) -> int:
        return self.num_global_batches() * self.num_processes


def sliced_loader(loader: DataLoader, num_processes: int, pin_memory: bool = False) -> DataLoader:
    """``loader`` (batches of the global size, from an index sampler) re-cut into ``ProcessSlices``,
    ready for ``accelerator.prepare``: each process then iterates its slice of every global batch.

    ``pin_memory`` (for a GPU) lets the copy of each batch to the device run without waiting for the
    steps already queued there.
    """
    if loader.batch_size is None:
        raise ValueError("sliced_loader needs a loader built with batch_size and a sampler")
    slices = ProcessSlices(loader.sampler, loader.batch_size, num_processes)
    kwargs: dict[str, Any] = {
        "collate_fn": loader.collate_fn,
        "num_workers": loader.num_workers,
        "pin_memory": pin_memory,
    }
    # Keep the loader's own generator: a fresh iterator would otherwise draw from torch's global one.
    return DataLoader(loader.dataset, batch_sampler=slices, generator=loader.generator, **kwargs)
