"""From a task's rows to token ids: seeded subsets, and the encodings for classification, causal-LM
training and generation prompts. Sequences stay unpadded and each row records its ``length``, which the
batching (``lorakit.data.batching``) pads and groups by. With ``cache=True`` (a task's rows, not ad-hoc
prompts) the encodings are kept between runs by ``lorakit.data.cache``."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # datasets and transformers are slow to import; only their types are needed here
    import datasets
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # the label id PyTorch's cross-entropy skips
MODEL_COLUMNS = ("input_ids", "attention_mask", "token_type_ids", "labels")


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


def encode_classification(
    batch: dict[str, list[Any]], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> dict[str, list[Any]]:
    """Encode a batch of ``text_a`` (and ``text_b``, None for a single text) columns into model inputs,
    unpadded, in row order: what ``tokenize_classification`` maps over a dataset, callable on plain lists
    (``lorakit serve`` encodes every request batch this way, without a dataset's fingerprinting)."""
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


def tokenize_classification(
    dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int, cache: bool = False
) -> datasets.Dataset:
    """Encode ``text_a`` (and ``text_b`` as the second of a pair) into model inputs, unpadded.

    Returns ``input_ids``, ``attention_mask``, ``token_type_ids`` when the tokenizer makes them, ``labels``
    (int class ids, or floats for regression; absent when the rows have no ``label``) and ``length``. The
    task's own columns are dropped, and rows stay in the dataset's order so predictions line up with the
    untokenized rows. Pairs longer than ``max_length`` are cut ``longest_first``: tokens go from the
    longer side, so neither sentence vanishes.
    """

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        return encode_classification(batch, tokenizer, max_length)

    return map_encoding(dataset, encode, tokenizer, "classification", max_length, cache)


def tokenize_causal_lm(
    dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int, cache: bool = False
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

    return map_encoding(dataset, encode, tokenizer, "causal_lm", max_length, cache)


def tokenize_prompts(
    dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int, cache: bool = False
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

    return map_encoding(dataset, encode, tokenizer, "prompts", max_length, cache)


def map_encoding(
    dataset: datasets.Dataset,
    encode: Any,
    tokenizer: PreTrainedTokenizerBase,
    encoding: str,
    max_length: int,
    cache: bool,
) -> datasets.Dataset:
    """``encode`` mapped over ``dataset`` in batches; with ``cache``, the same rows read back from
    ``lorakit.data.cache`` when a run has tokenized them before (keyed on the rows' content and the
    tokenizer's serialized form, never on datasets' own fingerprints). Task data is cached; the prompts of
    ``generate``, ``predict`` and ``serve`` are not: each request would leave an entry behind."""
    from lorakit.data.cache import cached_map

    def compute() -> datasets.Dataset:
        # datasets would fingerprint the result by pickling ``encode`` and the tokenizer it holds (0.75 s a
        # call for GPT-2's: most of a short ``lorakit generate``). Nothing is read back by that name
        # (load_from_cache_file=False), so one from the rows' fingerprint and the encoding will do.
        name = f"{dataset._fingerprint}|{encoding}|{max_length}"
        return dataset.map(
            encode,
            batched=True,
            remove_columns=dataset.column_names,
            load_from_cache_file=False,
            new_fingerprint=hashlib.sha256(name.encode()).hexdigest()[:32],
        )

    if not cache:
        return compute()
    return cached_map(dataset, compute, tokenizer, encoding, max_length)


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos token to end targets with")
    return int(tokenizer.eos_token_id)


def model_columns(dataset: datasets.Dataset) -> list[str]:
    """The columns of ``dataset`` a model takes as inputs (``MODEL_COLUMNS`` that are present)."""
    return [name for name in MODEL_COLUMNS if name in dataset.column_names]
