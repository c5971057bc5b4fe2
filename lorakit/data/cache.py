"""Tokenized rows kept between runs, so that a second run (or the next point of a sweep) over the same rows
with the same tokenizer reads them back instead of tokenizing again.

An entry is found by a key over everything its ids depend on: the rows' content (every selected row, hashed),
the tokenizer's whole serialized form (vocabulary, merges, normalizer, post-processor, added tokens) and
settings, the encoding's name and ``max_length``, the source of ``lorakit.data.tokenize`` and
``lorakit.data.completions``, and the versions of
transformers and tokenizers. Nothing weaker (a path, a mtime, a pickled object's hash) goes into it: a stale
entry would be a silent wrong answer. Tokenizers without a serialized form (slow, Python-only ones) are not
cached. Entries are Arrow files written by ``datasets`` (no pickles), into a temporary directory renamed into
place, under ``$LORAKIT_HOME/cache/tokenized`` (``~/.cache/lorakit``); ``LORAKIT_TOKENIZED_CACHE=0`` turns the
cache off, and deleting the directory at any time is safe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from lorakit.runs import lorakit_home

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# The encoders' source: a change to how rows become ids must not read back entries of the old encoding.
_ENCODING_SOURCES = (Path(__file__).with_name("tokenize.py"), Path(__file__).with_name("completions.py"))


def cache_dir() -> Path | None:
    """Where entries live, or None when ``LORAKIT_TOKENIZED_CACHE=0`` turns the cache off."""
    if os.environ.get("LORAKIT_TOKENIZED_CACHE", "1") == "0":
        return None
    return lorakit_home() / "cache" / "tokenized"


# init_kwargs that do not decide ids, or are in the key otherwise: where and how the files were read (two
# copies of one tokenizer share their rows), the special tokens (``special_tokens_map``), model_max_length and
# truncation_side (read from the tokenizer itself), the last call's truncation (which ``save_pretrained``
# writes into a copy's config; the key holds max_length), decoding settings, the backend's name.
_NOT_IDS = frozenset(
    {"name_or_path", "is_local", "local_files_only", "model_max_length", "truncation_side", "max_length",
     "stride", "truncation_strategy", "backend", "errors", "clean_up_tokenization_spaces"}
)  # fmt: skip


def _id_settings(tokenizer: PreTrainedTokenizerBase) -> dict[str, object]:
    special = set(getattr(tokenizer, "SPECIAL_TOKENS_ATTRIBUTES", ())) | {"additional_special_tokens"}
    return {
        k: v
        for k, v in tokenizer.init_kwargs.items()
        if k not in _NOT_IDS and k not in special and not k.endswith("_file")
    }


def tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """A digest of all in ``tokenizer`` that decides its ids, or None when it has no serialized form."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not getattr(tokenizer, "is_fast", False):
        return None
    import tokenizers
    import transformers

    settings = {
        "class": type(tokenizer).__name__,
        "init_kwargs": _id_settings(tokenizer),
        "truncation_side": tokenizer.truncation_side,
        "model_max_length": tokenizer.model_max_length,
        "special_tokens": tokenizer.special_tokens_map,
        "versions": [transformers.__version__, tokenizers.__version__],
    }
    # Each call sets the backend's truncation and padding to that call's arguments (its max_length, say), so
    # they would change the digest between two runs of the same tokenizer: serialized without them (the key
    # holds max_length anyway), then put back as they were.
    truncation, padding = backend.truncation, backend.padding
    backend.no_truncation()
    backend.no_padding()
    try:
        h = hashlib.sha256(backend.to_str().encode("utf-8"))
    finally:
        if truncation:
            backend.enable_truncation(**truncation)
        if padding:
            backend.enable_padding(**padding)
    h.update(json.dumps(settings, sort_keys=True, default=str).encode("utf-8"))
    return h.hexdigest()


def rows_digest(rows: datasets.Dataset) -> str:
    """A digest of the content of ``rows``: its features and every selected row, not the table under them."""
    import pyarrow as pa

    table = rows.with_format("arrow")[:]  # the selected rows only, in order
    h = hashlib.sha256(json.dumps(rows.features.to_dict(), sort_keys=True).encode("utf-8"))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    h.update(sink.getvalue())
    return h.hexdigest()


def cached_map(
    rows: datasets.Dataset,
    compute: Callable[[], datasets.Dataset],
    tokenizer: PreTrainedTokenizerBase,
    encoding: str,
    max_length: int,
) -> datasets.Dataset:
    """``compute()`` (the tokenized ``rows``), read from the cache when an entry has the same key, else
    computed and stored there. A cache that cannot be read or written costs the speed-up only."""
    root, token_key = cache_dir(), tokenizer_digest(tokenizer)
    if root is None or token_key is None or len(rows) == 0:
        return compute()
    import datasets

    parts = [rows_digest(rows), token_key, encoding, str(max_length)]
    parts += [hashlib.sha256(source.read_bytes()).hexdigest() for source in _ENCODING_SOURCES]
    entry = root / hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()
    if (entry / "dataset_info.json").is_file():
        try:
            return datasets.load_from_disk(str(entry))
        except (OSError, ValueError) as exc:
            logger.warning("%s: unreadable cached tokenization (%s); tokenizing again", entry, exc)
            shutil.rmtree(entry, ignore_errors=True)  # the cache's own entry, replaced below
    tokenized = compute()
    tmp = root / f".{entry.name}.{uuid.uuid4().hex}.tmp"
    try:
        tokenized.save_to_disk(str(tmp))
        tmp.rename(entry)  # a concurrent run that renamed first wins; its entry holds the same rows
    except OSError as exc:
        if not entry.is_dir():
            logger.warning("%s: cannot cache the tokenized rows (%s)", root, exc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tokenized
