"""Training: the Accelerate loop (``loop``), its losses and optimizer (``optimization``), per-process
batch slices (``sharding``), resumable state (``checkpoint``), the checks made before it starts
(``preflight``), re-launching as several processes (``launch``), and what it reports (``progress``,
``reporting``)."""

from lorakit.training.loop import TrainResult, train

__all__ = ["TrainResult", "train"]
