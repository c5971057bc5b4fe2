"""The user's own generation data: prompt -> completion rows (``task.prompt_column``,
``task.completion_column``), or conversations (``task.messages_column``: ``[{"role", "content"}, ...]``)
rendered by the tokenizer's chat template.

Training sees exactly ``prompt + completion + EOS`` (prompt and completion tokenized apart, the loss on
completion and EOS), or the rendered conversation with the loss on assistant turns (``lorakit.data``'s
``completion`` and ``chat`` encodings). Evaluation reports the loss and perplexity over those tokens, and
exact match, BLEU and ROUGE-L of the generated text against the completion (chat: the last assistant turn).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from lorakit.errors import UserError
from lorakit.tasks.base import Encoding, TaskKind
from lorakit.tasks.own_data import OwnDataTask, require_columns

if TYPE_CHECKING:
    import datasets

    from lorakit.recipe.schema import TaskSection

ROLES = ("system", "user", "assistant", "tool")
METRICS = ("eval_loss", "perplexity", "exact_match", "bleu", "rouge_l")


class OwnGenerationTask(OwnDataTask):
    """Prompt -> completion, or chat, from the user's files or dataset."""

    kind: TaskKind = "generation"
    num_labels = 0
    eval_loss = True
    default_metric = "eval_loss"
    metric_names = METRICS

    def __init__(self, section: TaskSection) -> None:
        super().__init__(section)
        self.chat = section.messages_column is not None
        self.encoding: Encoding = "chat" if self.chat else "completion"

    def load(self, split: str) -> datasets.Dataset:
        """Rows of ``split``: ``prompt``, ``target``, ``references`` and ``row``; chat rows ``messages``
        (role and content of each), ``references`` (the last assistant turn) and ``row``."""
        import datasets

        self.check_split(split)
        table = self.data.table(split)
        s = self.section
        if self.chat:
            require_columns(table, {"messages_column": s.messages_column})
            conversations = [
                _conversation(row.get(s.messages_column), place)
                for row, place in zip(table.rows, table.places, strict=True)
            ]
            return datasets.Dataset.from_dict(
                {
                    "messages": conversations,
                    "references": [
                        [_last_assistant(c, place)]
                        for c, place in zip(conversations, table.places, strict=True)
                    ],
                    "row": list(range(len(conversations))),
                }
            )
        require_columns(table, {"prompt_column": s.prompt_column, "completion_column": s.completion_column})
        prompts, targets = [], []
        for row, place in zip(table.rows, table.places, strict=True):
            prompts.append(_text(row.get(s.prompt_column), "task.prompt_column", place))
            targets.append(_text(row.get(s.completion_column), "task.completion_column", place))
        return datasets.Dataset.from_dict(
            {
                "prompt": prompts,
                "target": targets,
                "references": [[t] for t in targets],
                "row": list(range(len(targets))),
            }
        )

    def compute_metrics(self, predictions: Sequence[Any], examples: datasets.Dataset) -> dict[str, float]:
        """Exact match, BLEU and ROUGE-L of the generated texts against each row's reference (the loss and
        perplexity come from the evaluator, which runs the model over the reference tokens)."""
        from lorakit.scoring.text import text_metrics

        references = [refs[0] for refs in examples["references"]]
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions for {len(references)} examples")
        return text_metrics([str(p) for p in predictions], references)

    def prompt_from_input(self, text: str, tokenizer: Any = None) -> str:
        """A completion task's input is its prompt. A chat task's input is one user message, or a JSON list
        of messages; with the tokenizer it is rendered by its chat template, ready for the assistant."""
        if not self.chat:
            return text
        messages: Any = [{"role": "user", "content": text}]
        if text.lstrip().startswith("["):
            try:
                messages = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not a JSON list of messages: {exc.msg}") from None
        conversation = _conversation(messages, "--input")
        if tokenizer is None:
            return text
        return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)


def _text(value: Any, key: str, place: str) -> str:
    if not isinstance(value, str):
        found = "nothing" if value is None else type(value).__name__
        raise UserError(f"expected a text in {key}, found {found}", place)
    return value


def _conversation(value: Any, place: str) -> list[dict[str, str]]:
    """A chat row as ``[{"role", "content"}]``; UserError at ``place`` for anything else, or a bad role."""
    if isinstance(value, str):  # a CSV cell holding the JSON list
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise UserError("messages: not a JSON list of {role, content} objects", place) from None
    if not isinstance(value, list) or not value:
        raise UserError("messages: expected a non-empty list of {role, content} objects", place)
    out = []
    for k, message in enumerate(value, 1):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise UserError(f"message {k}: expected an object with a text 'content'", place)
        role = message.get("role")
        if role not in ROLES:
            raise UserError(f"message {k}: unknown role {role!r}; expected one of {', '.join(ROLES)}", place)
        out.append({"role": str(role), "content": message["content"]})
    return out


def _last_assistant(conversation: list[dict[str, str]], place: str) -> str:
    for message in reversed(conversation):
        if message["role"] == "assistant":
            return message["content"]
    raise UserError("no assistant turn to learn from", place)
