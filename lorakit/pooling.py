"""Decoder sequence classifiers pool each row's last real token, as the attention mask says.

transformers' decoder classifiers (GPT-2, Llama, Mistral, Qwen, Gemma, Phi, OPT, …) run their head over
every position and keep, per row, the logits of the rightmost token whose id is not ``config.pad_token_id``.
lorakit pads with the tokenizer's pad token, which is EOS when the tokenizer has none (GPT-2, Llama 3,
Qwen base): a text that really ends with EOS (a template that appends it, a user text holding the EOS
string) then has that EOS taken for padding, and the token before it is pooled.

``pool_last_real_token`` fixes this without new tokens or resized embeddings: a forward hook on the
model's body (``model.base_model``: GPT-2's ``transformer``, Llama's ``model``) replaces every position of
each row's last hidden state by the state at the row's last real position (the rightmost position the
attention mask keeps; without a mask every token is real, so the last one). Whichever position
transformers' pooling then picks holds that row's right value, and gradients reach the body through
that position only. The body is hooked rather than the head because lorakit swaps the head for a
per-adapter wrapper (``lorakit.lora.heads``) after the model is built, and a mixed batch hands each copy
of the head only its adapter's rows; the body always runs the whole batch with its mask, whatever head,
adapters, merge or batch mixing sits above it. The hook keeps no state between calls, so threads, deep
copies and nested calls need no care.

What this does not reach: a merged model (``lorakit merge``) is a plain transformers checkpoint, and
transformers pools it by pad id as before; ``config.pad_token_id`` stays set there (and here) because
transformers refuses batches of more than one row without it. Encoders (BERT, RoBERTa, DeBERTa, …)
pool their first token and are left alone, as are encoder-decoder classifiers and remote-code classes
that pool in their own way.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

# The local name transformers gives this pooling in every hand-written decoder classifier (GPT-2, OPT,
# Bloom, Falcon, GPT-NeoX, …); its "Copied from" checks keep those copies identical. Newer families
# share ``GenericForSequenceClassification`` instead, recognised by class.
_POOLING_NAME = "last_non_pad_token"
# Set on the hooked body, so that a model built twice over the same modules is hooked once. A plain
# attribute, so a deep copy carries it along with the hook it marks.
_MARK = "_lorakit_pools_last_real_token"


def pools_last_token(model: nn.Module) -> bool:
    """Whether ``model`` is one of transformers' decoder sequence classifiers, which pool the logits of
    each row's rightmost non-pad token (encoders, causal LMs and encoder-decoders are not)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    body = getattr(model, "base_model", None)
    if not isinstance(body, nn.Module) or body is model:
        return False  # no separate body to hook: not a transformers head-on-body model
    try:
        from transformers.modeling_layers import GenericForSequenceClassification
    except ImportError:  # older transformers: every decoder classifier is hand-written there
        GenericForSequenceClassification = ()  # type: ignore[assignment,misc]  # noqa: N806
    if isinstance(model, GenericForSequenceClassification):
        return True
    code = getattr(inspect.unwrap(type(model).forward), "__code__", None)
    return code is not None and _POOLING_NAME in code.co_varnames


def pool_last_real_token(model: nn.Module) -> bool:
    """Make a decoder classifier pool each row's last real token (see the module's docstring); returns
    whether ``model`` is one (anything else is left untouched). Installing it twice changes nothing."""
    if not pools_last_token(model):
        return False
    body = model.base_model
    if not getattr(body, _MARK, False):
        body.register_forward_hook(_broadcast_last_real, with_kwargs=True)
        setattr(body, _MARK, True)
    return True


def last_real_positions(attention_mask: torch.Tensor | None, batch: int, width: int) -> torch.Tensor:
    """Each row's last real position: the rightmost one ``attention_mask`` keeps (right or left padding
    alike); ``width - 1`` for every row without a mask (the model then attends every token)."""
    if attention_mask is None:
        return torch.full((batch,), width - 1, dtype=torch.long)
    keep = attention_mask[:, -width:] != 0  # with a cache the mask also covers earlier positions
    # argmax finds the first maximum: in the reversed mask, the first kept position from the right.
    return (width - 1) - keep.flip(-1).to(torch.int32).argmax(-1)


def _attention_mask(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    # transformers' classifiers pass the mask by keyword; a positional one is found by the signature.
    if "attention_mask" in kwargs:
        return kwargs["attention_mask"]
    names = list(inspect.signature(module.forward).parameters)
    index = names.index("attention_mask") if "attention_mask" in names else len(args)
    return args[index] if index < len(args) else None


def _broadcast_last_real(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
) -> Any:
    """The body's output with each row's last hidden state set, at every position, to the state at the
    row's last real position; None (output unchanged) where that cannot be told."""
    mask = _attention_mask(module, args, kwargs)
    if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
        return None  # a 4-D or per-layer mask: no single row of real tokens to read
    if isinstance(output, tuple):
        hidden = output[0]
    elif isinstance(output, dict) and "last_hidden_state" in output:
        hidden = output["last_hidden_state"]
    else:
        return None
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        return None
    batch, width, size = hidden.shape
    last = last_real_positions(mask.to(hidden.device) if mask is not None else None, batch, width)
    rows = torch.arange(batch, device=hidden.device)
    # A view, not a copy: one state per row, read at every position; the gradient of whichever position
    # is pooled flows back to the last real one alone.
    pooled = hidden[rows, last.to(hidden.device)].unsqueeze(1).expand(batch, width, size)
    if isinstance(output, tuple):
        return (pooled, *output[1:])
    output["last_hidden_state"] = pooled  # a ModelOutput also updates its attribute and tuple view
    return output
