"""From a task's rows to the batches the training loop and the evaluator consume.

Tokenization keeps sequences unpadded and records each one's ``length``; ``PaddingCollator`` pads every
batch to its own longest sequence (dynamic padding); ``LengthGroupedSampler`` puts sequences of similar
length in the same batch so that little of each batch is padding.

Samplers are deterministic functions of ``(seed, epoch)``: Accelerate shards the batches a sampler yields
across processes, which is only correct when every process draws the same order. The training loop calls
``set_epoch`` on the prepared dataloader each epoch (Accelerate forwards it to the sampler).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler, SequentialSampler

if TYPE_CHECKING:  # datasets and transformers are slow to import; only their types are needed here
    import datasets
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # the label id PyTorch's cross-entropy skips
MODEL_COLUMNS = ("input_ids", "attention_mask", "token_type_ids", "labels")
_PAD_WITH_ZERO = ("attention_mask", "token_type_ids")


def subsample(dataset: datasets.Dataset, n: int | None, seed: int) -> datasets.Dataset:
    """``n`` rows drawn by a seeded shuffle, reproducible for a given ``seed``; all rows when ``n`` is None.

    The drawn rows keep the dataset's order (the shuffle picks which rows, not their order): evaluation
    subsets then read in file order, and training shuffles anyway.
    """
    if n is None or n >= len(dataset):
        return dataset
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    picked = np.random.default_rng(seed).permutation(len(dataset))[:n]
    return dataset.select(np.sort(picked))


def tokenize_classification(
    dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> datasets.Dataset:
    """Encode ``text_a`` (and ``text_b`` as the second of a pair) into model inputs, unpadded.

    Returns ``input_ids``, ``attention_mask``, ``token_type_ids`` when the tokenizer makes them, ``labels``
    (int class ids, or floats for regression; absent when the rows have no ``label``) and ``length``. The
    task's own columns are dropped, and rows stay in the dataset's order so predictions line up with the
    untokenized rows. Pairs longer than ``max_length`` are cut ``longest_first``: tokens go from the
    longer side, so neither sentence vanishes.
    """

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        texts_a, texts_b = batch["text_a"], batch.get("text_b") or [None] * len(batch["text_a"])
        singles = [i for i, b in enumerate(texts_b) if b is None]
        pairs = [i for i, b in enumerate(texts_b) if b is not None]
        rows: list[dict[str, Any]] = [{} for _ in texts_a]
        # A tokenizer call takes all-pairs or all-singles; a batch mixing the two is encoded in two calls.
        for group, with_pair in ((singles, False), (pairs, True)):
            if not group:
                continue
            encoded = tokenizer(
                [texts_a[i] for i in group],
                [texts_b[i] for i in group] if with_pair else None,
                truncation="longest_first",
                max_length=max_length,
            )
            for j, i in enumerate(group):
                rows[i] = {key: values[j] for key, values in encoded.items()}
        out = {key: [row[key] for row in rows] for key in rows[0]} if rows else {}
        if "label" in batch:  # unlabeled rows (a GLUE test split) get no labels column
            out["labels"] = list(batch["label"])
        out["length"] = [len(ids) for ids in out.get("input_ids", [])]
        return out

    return _map(dataset, encode)


def tokenize_causal_lm(
    dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> datasets.Dataset:
    """Encode ``prompt`` + ``target`` + eos for decoder-only training, the loss on the target alone.

    ``input_ids`` are the prompt's tokens, the target's tokens and the eos token; ``labels`` are
    ``IGNORE_INDEX`` over the prompt and equal ``input_ids`` over target and eos (the model shifts them
    itself). Prompt and target are encoded separately, without special tokens, so the prompt's tokens are
    exactly those ``tokenize_prompts`` gives at evaluation.

    Over ``max_length``, the target is kept whole and the prompt is cut from the left: its end (where the
    E2E prompt's ``||`` separator sits) matters most to what comes next. The prompt never shrinks below
    half of ``max_length`` (or its own length) though: a target that long is cut from the right instead,
    losing its eos, since a model cannot learn to continue a prompt it never sees.
    """
    eos = _eos_id(tokenizer)

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        prompts = tokenizer(list(batch["prompt"]), add_special_tokens=False)["input_ids"]
        targets = tokenizer(list(batch["target"]), add_special_tokens=False)["input_ids"]
        out: dict[str, list[Any]] = {"input_ids": [], "attention_mask": [], "labels": [], "length": []}
        for prompt, target in zip(prompts, targets, strict=True):
            answer = [*target, eos]
            keep = min(len(prompt), max(max_length - len(answer), min(len(prompt), max_length // 2)))
            prompt = prompt[len(prompt) - keep :]
            answer = answer[: max_length - keep]
            out["input_ids"].append(prompt + answer)
            out["attention_mask"].append([1] * (len(prompt) + len(answer)))
            out["labels"].append([IGNORE_INDEX] * len(prompt) + answer)
            out["length"].append(len(prompt) + len(answer))
        return out

    return _map(dataset, encode)


def tokenize_prompts(
    dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> datasets.Dataset:
    """Encode ``prompt`` alone, for generation: ``input_ids``, ``attention_mask`` and ``length``.

    A prompt over ``max_length`` keeps its last ``max_length`` tokens, as ``tokenize_causal_lm`` cuts it,
    since generation continues from the prompt's end. Rows keep the dataset's order.
    """

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        prompts = tokenizer(list(batch["prompt"]), add_special_tokens=False)["input_ids"]
        prompts = [ids[max(len(ids) - max_length, 0) :] for ids in prompts]
        return {
            "input_ids": prompts,
            "attention_mask": [[1] * len(ids) for ids in prompts],
            "length": [len(ids) for ids in prompts],
        }

    return _map(dataset, encode)


def _map(dataset: datasets.Dataset, encode: Any) -> datasets.Dataset:
    # Recomputed every time rather than read back from a cache: a stale cache keyed on a tokenizer that
    # hashes unreliably would be a silent wrong answer, and tokenizing GLUE-sized data takes seconds.
    return dataset.map(encode, batched=True, remove_columns=dataset.column_names, load_from_cache_file=False)


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos token to end targets with")
    return int(tokenizer.eos_token_id)


def model_columns(dataset: datasets.Dataset) -> list[str]:
    """The columns of ``dataset`` a model takes as inputs (``MODEL_COLUMNS`` that are present)."""
    return [name for name in MODEL_COLUMNS if name in dataset.column_names]


class PaddingCollator:
    """Pads a list of tokenized rows to the batch's longest sequence and stacks them into tensors.

    ``input_ids`` are padded with the tokenizer's pad id (its eos id when it has none, as GPT-2; the
    attention mask hides pads either way), ``attention_mask`` and ``token_type_ids`` with 0, token-level
    ``labels`` with ``IGNORE_INDEX``. Sequence-level labels (one number a row) become a long tensor, or a
    float one for regression. Keys outside ``MODEL_COLUMNS`` (``length``, text) are dropped.

    ``padding_side="left"`` lines prompts up at their ends, for batched generation with decoder-only
    models. ``pad_to_multiple_of`` rounds the width up (tensor cores prefer multiples of 8).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        pad_to_multiple_of: int | None = None,
        padding_side: Literal["right", "left"] = "right",
    ) -> None:
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if pad_to_multiple_of is not None and pad_to_multiple_of <= 0:
            raise ValueError(f"pad_to_multiple_of must be positive, got {pad_to_multiple_of}")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_token_id = int(pad_id) if pad_id is not None else 0
        self.pad_to_multiple_of = pad_to_multiple_of
        self.padding_side = padding_side

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """The batch as a dict of tensors, each ``(batch, width)`` or, for sequence labels, ``(batch,)``."""
        if not features:
            raise ValueError("cannot collate an empty batch")
        width = max(len(row["input_ids"]) for row in features)
        if self.pad_to_multiple_of:
            width = math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch: dict[str, torch.Tensor] = {}
        for key in MODEL_COLUMNS:
            if key not in features[0]:
                continue
            values = [row[key] for row in features]
            if key == "labels" and np.ndim(values[0]) == 0:
                # One number a row: class ids, or regression targets (a float anywhere makes all floats).
                labels = np.asarray(values)
                is_float = labels.dtype.kind == "f"
                batch[key] = torch.as_tensor(labels, dtype=torch.float32 if is_float else torch.long)
                continue
            pad = IGNORE_INDEX if key == "labels" else 0 if key in _PAD_WITH_ZERO else self.pad_token_id
            batch[key] = self._pad(values, width, pad)
        return batch

    def _pad(self, sequences: list[Any], width: int, value: int) -> torch.Tensor:
        out = torch.full((len(sequences), width), value, dtype=torch.long)
        for i, seq in enumerate(sequences):
            seq = torch.as_tensor(seq, dtype=torch.long)
            if self.padding_side == "right":
                out[i, : len(seq)] = seq
            elif len(seq):
                out[i, width - len(seq) :] = seq
        return out


class EpochShuffleSampler(Sampler[int]):
    """A seeded random permutation of ``range(n)``, new for each epoch and the same on every process."""

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the permutation of ``epoch`` on the next iteration."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        return iter(_rng(self.seed, self.epoch).permutation(self.n).tolist())


class LengthGroupedSampler(Sampler[int]):
    """Indices in an order that groups rows of similar length into the same batch, yet stays random.

    Each epoch: a seeded shuffle; chunks of ``mega_batches`` batches, each sorted by length (longest
    first) and cut into batches; then the batches are shuffled, except that the one holding the longest
    row goes first, so a batch too big for memory fails in the first step rather than hours in. A batch
    short of ``batch_size`` (at most one) stays last so that consecutive ``batch_size`` indices are always
    exactly one batch, which ``DataLoader(batch_size=...)`` and Accelerate's sharding rely on.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, mega_batches: int = 50) -> None:
        if batch_size <= 0 or mega_batches <= 0:
            raise ValueError("batch_size and mega_batches must be positive")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self.mega_batches = mega_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the order of ``epoch`` on the next iteration."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        return iter(np.concatenate(self.batches()).tolist() if len(self.lengths) else [])

    def batches(self) -> list[np.ndarray]:
        """This epoch's batches, as arrays of row indices, in the order ``__iter__`` yields them."""
        rng = _rng(self.seed, self.epoch)
        order = rng.permutation(len(self.lengths))
        chunk = self.batch_size * self.mega_batches
        full: list[np.ndarray] = []
        partial: list[np.ndarray] = []
        for start in range(0, len(order), chunk):
            mega = order[start : start + chunk]
            # Stable, so equal lengths keep the shuffle's order rather than index order.
            mega = mega[np.argsort(-self.lengths[mega], kind="stable")]
            for b in range(0, len(mega), self.batch_size):
                batch = mega[b : b + self.batch_size]
                (full if len(batch) == self.batch_size else partial).append(batch)
        full = [full[i] for i in rng.permutation(len(full))]
        if full:
            longest = max(range(len(full)), key=lambda i: self.lengths[full[i]].max())
            full[0], full[longest] = full[longest], full[0]
            if partial and self.lengths[partial[0]].max() > self.lengths[full[0]].max():
                # The longest row sits in the short batch: trade it for the first batch's shortest.
                p, f = int(np.argmax(self.lengths[partial[0]])), int(np.argmin(self.lengths[full[0]]))
                partial[0][p], full[0][f] = full[0][f], partial[0][p]
        return full + partial


def _rng(seed: int, epoch: int) -> np.random.Generator:
    # Seeded from the pair, not seed + epoch, so that (seed 0, epoch 1) and (seed 1, epoch 0) differ.
    return np.random.default_rng([seed, epoch])


def build_train_dataloader(
    dataset: datasets.Dataset,
    collator: PaddingCollator,
    batch_size: int,
    seed: int,
    group_by_length: bool,
) -> DataLoader:
    """Shuffled training batches of ``dataset``'s model columns; length-grouped when asked.

    The order depends only on ``(seed, epoch)``; call ``set_epoch`` on the loader (or on the one
    ``accelerator.prepare`` returns) before each epoch. No worker processes: tokenized rows are cheap to
    fetch, and in-process loading keeps the order reproducible.
    """
    if group_by_length:
        if "length" not in dataset.column_names:
            raise ValueError("group_by_length needs a 'length' column; tokenize with lorakit.data first")
        sampler: Sampler[int] = LengthGroupedSampler(dataset["length"], batch_size, seed)
    else:
        sampler = EpochShuffleSampler(len(dataset), seed)
    return DataLoader(
        dataset.select_columns(model_columns(dataset)),
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collator,
        num_workers=0,
        # A loader of its own generator: making an iterator otherwise draws from torch's global one, which
        # would shift dropout masks after an evaluation or a resume.
        generator=torch.Generator().manual_seed(0),
    )


def build_eval_dataloader(
    dataset: datasets.Dataset, collator: PaddingCollator, batch_size: int
) -> DataLoader:
    """Batches of ``dataset``'s model columns in row order, so predictions line up with the rows.

    Sorting by length would pad less but would need its permutation undone after prediction; evaluation
    is a small share of the run, so the plain order wins on simplicity.
    """
    model_view = dataset.select_columns(model_columns(dataset))
    return DataLoader(
        model_view,
        batch_size=batch_size,
        sampler=SequentialSampler(model_view),
        collate_fn=collator,
        num_workers=0,
        # A loader of its own generator: making an iterator otherwise draws from torch's global one, which
        # would shift dropout masks after an evaluation or a resume.
        generator=torch.Generator().manual_seed(0),
    )


def padding_waste(dataloader: DataLoader) -> float:
    """The fraction of token positions that are padding over one pass of ``dataloader`` (0 to 1).

    Pads are the zeros of ``attention_mask``; a ``pad_to_multiple_of`` round-up counts as waste too.
    """
    pads = total = 0
    for batch in dataloader:
        mask = batch["attention_mask"]
        pads += int((mask == 0).sum())
        total += mask.numel()
    return pads / total if total else 0.0
