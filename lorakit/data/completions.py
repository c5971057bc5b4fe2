"""Encodings of a user's generation rows: prompt/completion pairs and chat conversations.

Both encoders take batches as ``datasets.Dataset.map(..., batched=True, with_indices=True)`` hands them
over, and return unpadded ``input_ids``, ``attention_mask``, ``labels`` (``IGNORE_INDEX`` where no loss is
taken), ``length`` and ``truncated`` per row. A row over ``max_length`` keeps its start. A row the model
would learn nothing from (no label token left) is refused with a ``RowError`` naming the row, never kept as
a silent zero-loss row. ``tokenize_completions``, ``tokenize_chat`` and ``tokenize_chat_prompts`` map them
over a dataset through ``lorakit.data.tokenize``'s cached map.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lorakit.data.tokenize import IGNORE_INDEX, map_encoding, tokenize_prompts

if TYPE_CHECKING:  # datasets and transformers are slow to import; only their types are needed here
    import datasets
    from transformers import PreTrainedTokenizerBase

ROLES = ("system", "user", "assistant", "tool")

__all__ = [
    "IGNORE_INDEX",
    "ROLES",
    "RowError",
    "chat_prompt_and_reference",
    "encode_chat",
    "encode_prompt_completion",
    "tokenize_chat",
    "tokenize_chat_prompts",
    "tokenize_completions",
]


class RowError(ValueError):
    """A row that cannot be trained on: ``.index`` is its index in the dataset, ``str(e)`` the reason."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


def encode_prompt_completion(
    prompts: list[str],
    completions: list[str],
    indices: list[int],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
) -> dict[str, list[Any]]:
    """Encode ``prompt + completion + eos`` per row, the loss on the completion and eos only.

    Prompt and completion are tokenized separately without special tokens and their ids joined, so the
    prompt's ids are exactly those a generation prompt gets. ``labels`` are ``IGNORE_INDEX`` over the
    prompt and equal ``input_ids`` over completion and eos. Over ``max_length`` a row is cut from the right
    (``truncated`` is True); a row whose prompt alone fills ``max_length`` raises ``RowError``. A tokenizer
    without an eos token raises ``ValueError``.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"tokenizer {tokenizer.name_or_path!r} has no eos token to end completions with; set one"
        )
    eos = int(tokenizer.eos_token_id)
    prompt_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
    out = _empty_columns()
    for index, prompt, completion in zip(indices, prompt_ids, completion_ids, strict=True):
        if len(prompt) >= max_length:
            raise RowError(
                index,
                f"its prompt alone takes {len(prompt)} tokens, max_length is {max_length}; "
                "raise task.max_length or shorten it",
            )
        answer = [*completion, eos]
        _append(out, prompt + answer, [IGNORE_INDEX] * len(prompt) + answer, max_length)
    return out


def encode_chat(
    conversations: list[list[dict[str, Any]]],
    indices: list[int],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
) -> dict[str, list[Any]]:
    """Encode conversations rendered by the tokenizer's chat template, the loss on assistant turns only.

    Each assistant message ``i`` bounds a segment from the end of ``render(messages[:i])`` with the
    generation prompt to the end of ``render(messages[:i + 1])``: its content and whatever the template
    closes the turn with (``<|im_end|>``, say), which the model must learn to emit. The rendering must grow
    by prefixes, else ``RowError``. Segments are tokenized separately without special tokens (the
    template's text carries them) and their ids joined, so no token straddles a loss boundary; no eos is
    appended (the template ends turns). Over ``max_length`` a row keeps its start (``truncated``); a row
    without an assistant token left, an unknown role or a malformed message raises ``RowError``; a
    tokenizer without a chat template raises ``ValueError``.
    """
    _require_template(tokenizer)
    segments: list[str] = []
    learned: list[bool] = []
    spans: list[tuple[int, int]] = []  # per row, its range in ``segments``
    for index, conversation in zip(indices, conversations, strict=True):
        start = len(segments)
        for text, is_assistant in _chat_segments(_messages(conversation, index), index, tokenizer):
            segments.append(text)
            learned.append(is_assistant)
        spans.append((start, len(segments)))
    # One batched call for every segment of the batch: a call per segment would be slow on big datasets.
    segment_ids = tokenizer(segments, add_special_tokens=False)["input_ids"] if segments else []
    out = _empty_columns()
    for index, (start, stop) in zip(indices, spans, strict=True):
        ids: list[int] = []
        labels: list[int] = []
        for k in range(start, stop):
            ids += segment_ids[k]
            labels += segment_ids[k] if learned[k] else [IGNORE_INDEX] * len(segment_ids[k])
        if all(label == IGNORE_INDEX for label in labels):
            raise RowError(index, "no assistant turn to learn from (its assistant turns are empty)")
        if all(label == IGNORE_INDEX for label in labels[:max_length]):
            first = next(k for k, label in enumerate(labels) if label != IGNORE_INDEX)
            raise RowError(
                index,
                f"its first assistant turn starts after {first} tokens, max_length is "
                f"{max_length}; raise task.max_length or shorten it",
            )
        _append(out, ids, labels, max_length)
    return out


def chat_prompt_and_reference(
    messages: list[dict[str, Any]], index: int, tokenizer: PreTrainedTokenizerBase
) -> tuple[str, str]:
    """The generation prompt and reference of a conversation, for evaluation by generation.

    The prompt is the conversation before its last assistant message, rendered by the chat template with
    the generation prompt; the reference is that message's content. ``RowError`` when there is no
    assistant message (or the row is malformed), ``ValueError`` when the tokenizer has no chat template.
    """
    _require_template(tokenizer)
    messages = _messages(messages, index)
    last = _last_assistant(messages, index)
    return _render(tokenizer, messages[:last], True, index), messages[last]["content"]


def _chat_segments(
    messages: list[dict[str, str]], index: int, tokenizer: PreTrainedTokenizerBase
) -> list[tuple[str, bool]]:
    """The rendered conversation split into (text, is_assistant) segments whose texts join to it."""
    _last_assistant(messages, index)  # refuses a conversation without an assistant message
    segments: list[tuple[str, bool]] = []
    done = ""  # the rendering up to the end of the previous assistant turn
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], True, index)
        full = _render(tokenizer, messages[: i + 1], False, index)
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise _not_incremental(index, i)
        segments += [(prefix[len(done) :], False), (full[len(prefix) :], True)]
        done = full
    whole = _render(tokenizer, messages, False, index)
    if not whole.startswith(done):
        raise _not_incremental(index, len(messages) - 1)
    segments.append((whole[len(done) :], False))
    return segments


def _not_incremental(index: int, position: int) -> RowError:
    return RowError(
        index,
        f"the tokenizer's chat template does not render conversations incrementally (the "
        f"rendering up to message {position} is not a prefix of the next one: the template rewrites "
        "earlier turns), so the assistant turns cannot be located; use a template that appends each turn",
    )


def _render(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], generation_prompt: bool, index: int
) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as exc:  # jinja's TemplateError, a template's raise_exception(): the row's fault
        raise RowError(index, f"the chat template rejects this conversation: {exc}") from exc


def _messages(conversation: Any, index: int) -> list[dict[str, str]]:
    """The validated messages of a row, reduced to ``role`` and ``content``.

    A dataset read from JSON stores messages as Arrow structs, so every message carries every key seen in
    the file, from any row (None where absent, which older transformers pass on to templates that test
    ``is defined``); only the keys validated here reach the template.
    """
    if not isinstance(conversation, list) or not conversation:
        raise RowError(index, "a conversation must be a non-empty list of messages")
    messages = []
    for k, message in enumerate(conversation):
        if not isinstance(message, dict):
            raise RowError(index, f"message {k} is not a mapping with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or role not in ROLES:
            raise RowError(
                index,
                f"unknown role {role!r} in message {k}; expected one of {', '.join(ROLES)}",
            )
        if not isinstance(content, str):
            raise RowError(index, f"message {k} has no string 'content'")
        messages.append({"role": role, "content": content})
    return messages


def _last_assistant(messages: list[dict[str, str]], index: int) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "assistant":
            return i
    raise RowError(index, "no assistant turn to learn from (no assistant message)")


def _require_template(tokenizer: PreTrainedTokenizerBase) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {tokenizer.name_or_path!r} has no chat template; set one or use "
            "prompt_column/completion_column"
        )


def _empty_columns() -> dict[str, list[Any]]:
    return {"input_ids": [], "attention_mask": [], "labels": [], "length": [], "truncated": []}


def _append(out: dict[str, list[Any]], ids: list[int], labels: list[int], max_length: int) -> None:
    """Add one row, cut from the right to ``max_length``."""
    out["input_ids"].append(ids[:max_length])
    out["labels"].append(labels[:max_length])
    out["attention_mask"].append([1] * min(len(ids), max_length))
    out["length"].append(min(len(ids), max_length))
    out["truncated"].append(len(ids) > max_length)


def tokenize_completions(
    dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int, cache: bool = False
) -> datasets.Dataset:
    """Encode the user's ``prompt`` + ``target`` (the completion) + eos, the loss on completion and eos,
    kept from the start over ``max_length`` (the encoders above). Rows carry ``truncated``; a
    row with nothing left to learn raises ``RowError`` with its ``row``."""

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        return encode_prompt_completion(batch["prompt"], batch["target"], batch["row"], tokenizer, max_length)

    return map_encoding(dataset, encode, tokenizer, "completions", max_length, cache)


def tokenize_chat(
    dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int, cache: bool = False
) -> datasets.Dataset:
    """Encode ``messages`` by the tokenizer's chat template, the loss on assistant turns only
    (the encoders above). Rows carry ``truncated``; a bad row raises ``RowError`` with its
    ``row``."""

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        return encode_chat(batch["messages"], batch["row"], tokenizer, max_length)

    return map_encoding(dataset, encode, tokenizer, _chat_encoding("chat", tokenizer), max_length, cache)


def tokenize_chat_prompts(
    dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int, cache: bool = False
) -> datasets.Dataset:
    """Encode each conversation up to its last assistant turn, rendered with the generation prompt: what
    the model continues when evaluation generates that turn. Cut from the left as ``tokenize_prompts``."""

    def render(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        prompts = [
            chat_prompt_and_reference(messages, row, tokenizer)[0]
            for messages, row in zip(batch["messages"], batch["row"], strict=True)
        ]
        return {"prompt": prompts}

    rendered = dataset.map(
        render, batched=True, remove_columns=dataset.column_names, load_from_cache_file=False
    )
    return tokenize_prompts(rendered, tokenizer, max_length, cache)


def _chat_encoding(name: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """The encoding's name for the cache key, with the chat template's digest: the template decides the
    ids, and one set in code after loading is not among what ``tokenizer_digest`` hashes."""
    import hashlib

    template = str(getattr(tokenizer, "chat_template", None))
    return f"{name}:{hashlib.sha256(template.encode('utf-8')).hexdigest()[:16]}"
