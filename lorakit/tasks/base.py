"""The contract every task family implements: its data, label names, prompts and output clean-up, metrics
and output files. A family is one module behind this contract, registered in ``lorakit.tasks`` and chosen
by the recipe's ``task`` section (``task.name`` for a built-in task, ``task.type`` for the user's data)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lorakit.errors import UserError

if TYPE_CHECKING:  # datasets is slow to import; `lorakit info` and the CLI's start-up need not pay for it
    import datasets

    from lorakit.recipe.schema import TaskSection

TaskKind = Literal["classification", "regression", "multilabel", "generation"]
# How a family's rows become token ids (``lorakit.data.loaders`` maps each name to an encoder):
# ``classification`` text_a/text_b pairs; ``causal_lm`` the paper's prompt + target (prompt cut from the
# left); ``completion`` prompt + completion + EOS (kept from the start); ``chat`` conversations rendered by
# the tokenizer's chat template, the loss on assistant turns.
Encoding = Literal["classification", "causal_lm", "completion", "chat"]


class Task(ABC):
    """A task bound to its data source.

    Classification, regression and multilabel tasks yield rows with columns ``text_a``, ``text_b``
    (``None`` for single texts) and ``label`` (a class id; a float for regression; a multi-hot list of
    floats for multilabel).

    Generation tasks yield rows with ``prompt`` (the exact text the model conditions on) and ``target`` (one
    reference, for training), or ``messages`` (a conversation) for chat data. Their evaluation splits hold
    one row per distinct input, with every reference of that input in ``references`` (list of str), plus
    whatever the scorer needs.
    """

    name: str
    kind: TaskKind
    num_labels: int  # 1 for regression, 0 for generation
    main_metric: str  # key in compute_metrics' result used to keep the best adapter
    greater_is_better: bool = True
    train_split: str = "train"
    # prefix -> split name. One entry with prefix "" for most tasks; MNLI has matched and mismatched.
    eval_splits: dict[str, str]
    label_names: list[str] | None = None  # class names in id order, where the task has classes
    encoding: Encoding = "classification"
    # Generation tasks that also report the loss and perplexity over completion tokens (teacher forcing).
    eval_loss: bool = False

    def __init__(self, data_dir: str | None = None) -> None:
        self.data_dir = data_dir

    @classmethod
    def from_section(cls, section: TaskSection) -> Task:
        """The task a recipe's ``task`` section describes (a built-in task takes its data_dir)."""
        return cls(section.data_dir)  # type: ignore[call-arg]

    @property
    @abstractmethod
    def splits(self) -> list[str]:
        """The split names ``load`` accepts."""

    def check_split(self, split: str) -> None:
        """Raise a UserError naming the valid splits when ``split`` is not one of them."""
        if split not in self.splits:
            raise UserError(
                f"unknown split {split!r} for {self.name}; choose one of {', '.join(self.splits)}"
            )

    @abstractmethod
    def load(self, split: str) -> datasets.Dataset:
        """Rows of ``split`` in this task's column layout, from ``data_dir`` or the hub."""

    def source_of(self, split: str) -> str:
        """Where ``split``'s rows come from, for error messages: a file or folder, or the hub."""
        return f"{self.data_dir} ({split})" if self.data_dir else f"the hub's {self.name} {split} split"

    def row_where(self, split: str, index: int) -> str:
        """Where row ``index`` (0-based, as loaded) of ``split`` is, for an error about that row."""
        return f"{self.source_of(split)}: row {index + 1}"

    @abstractmethod
    def compute_metrics(self, predictions: Sequence[Any], examples: datasets.Dataset) -> dict[str, float]:
        """The task's metrics for ``predictions`` (one per row of ``examples``), in percent where the
        paper reports percent."""

    # -- prompts and outputs: what `generate`, `predict` and `serve` show -----------------------------

    def prompt_from_input(self, text: str) -> str:
        """The prompt for one raw input of ``lorakit generate``/``predict`` (the text itself by default).
        Raises ValueError for an input that cannot be a prompt of this task."""
        return text

    def clean_output(self, text: str) -> str:
        """A generated text as one output line (line breaks become spaces)."""
        return " ".join(text.splitlines()).strip()

    def readable(self, prediction: Any) -> Any:
        """A prediction as a person reads it: class names for class ids, the value or text otherwise."""
        names = self.label_names
        if self.kind == "classification" and names:
            return names[int(prediction)]
        if self.kind == "multilabel" and names:  # a multi-hot row
            return [name for name, on in zip(names, prediction, strict=True) if on]
        return prediction

    def write_outputs(self, out_dir: Path, split: str, predictions: Sequence[Any], rows: Any) -> None:
        """Files beside ``predictions-<split>.jsonl`` that the task's own scorer reads (none by default)."""
        return None
