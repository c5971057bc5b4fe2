"""From a task's rows to the batches the training loop and the evaluator consume.

``tokenize``: seeded subsets and the task encodings; ``batching``: the dynamic-padding collator, the
length-grouped and epoch-seeded samplers and the dataloaders; ``loaders``: a recipe's training loader
and evaluation sets, built from the two.
"""

from lorakit.data.batching import (
    EpochShuffleSampler,
    LengthGroupedSampler,
    PaddingCollator,
    build_eval_dataloader,
    build_train_dataloader,
    in_row_order,
    longest_first,
    padding_bounded_chunks,
    padding_waste,
)
from lorakit.data.completions import tokenize_chat, tokenize_chat_prompts, tokenize_completions
from lorakit.data.tokenize import (
    IGNORE_INDEX,
    MODEL_COLUMNS,
    encode_classification,
    model_columns,
    subsample,
    tokenize_causal_lm,
    tokenize_classification,
    tokenize_prompts,
)

__all__ = [
    "IGNORE_INDEX",
    "MODEL_COLUMNS",
    "EpochShuffleSampler",
    "LengthGroupedSampler",
    "PaddingCollator",
    "build_eval_dataloader",
    "build_train_dataloader",
    "in_row_order",
    "longest_first",
    "model_columns",
    "padding_bounded_chunks",
    "padding_waste",
    "subsample",
    "tokenize_causal_lm",
    "tokenize_chat",
    "tokenize_chat_prompts",
    "tokenize_completions",
    "encode_classification",
    "tokenize_classification",
    "tokenize_prompts",
]
