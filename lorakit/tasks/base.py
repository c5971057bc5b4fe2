"""The contract every task family implements: where its data comes from and how it is scored."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # datasets is slow to import; `lorakit info` and the CLI's start-up need not pay for it
    import datasets

TaskKind = Literal["classification", "regression", "generation"]


class Task(ABC):
    """A task bound to its data source (the Hugging Face hub, or a local folder ``data_dir``).

    Classification and regression tasks yield rows with columns ``text_a``, ``text_b`` (``None`` for
    single-sentence tasks) and ``label`` (int, or float for regression).

    Generation tasks yield rows with ``prompt`` (the exact text the model conditions on) and ``target``
    (one reference, for training). Their evaluation splits hold one row per distinct input, with every
    reference of that input in ``references`` (list of str), plus whatever the scorer needs.
    """

    name: str
    kind: TaskKind
    num_labels: int  # 1 for regression, 0 for generation
    main_metric: str  # key in compute_metrics' result used to keep the best adapter
    greater_is_better: bool = True
    train_split: str = "train"
    # prefix -> split name. One entry with prefix "" for most tasks; MNLI has matched and mismatched.
    eval_splits: dict[str, str]

    def __init__(self, data_dir: str | None = None) -> None:
        self.data_dir = data_dir

    @property
    @abstractmethod
    def splits(self) -> list[str]:
        """The split names ``load`` accepts."""

    def check_split(self, split: str) -> None:
        """Raise a UserError naming the valid splits when ``split`` is not one of them."""
        if split not in self.splits:
            from lorakit.errors import UserError

            raise UserError(
                f"unknown split {split!r} for {self.name}; choose one of {', '.join(self.splits)}"
            )

    @abstractmethod
    def load(self, split: str) -> datasets.Dataset:
        """Rows of ``split`` in this task's column layout, from ``data_dir`` or the hub."""

    def source_of(self, split: str) -> str:
        """Where ``split``'s rows come from, for error messages: a file or folder, or the hub."""
        return f"{self.data_dir} ({split})" if self.data_dir else f"the hub's {self.name} {split} split"

    @abstractmethod
    def compute_metrics(self, predictions: Sequence[Any], examples: datasets.Dataset) -> dict[str, float]:
        """The task's metrics for ``predictions`` (one per row of ``examples``), in percent where the
        paper reports percent."""
