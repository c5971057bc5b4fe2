"""How the model runs in training, beyond the plain forward pass: gradient checkpointing
(``train.gradient_checkpointing``) and ``torch.compile`` (``train.compile``).

With ``train.compile: true`` the model runs through TorchDynamo and Inductor, and what Dynamo could not
capture is reported. A graph break splits the model into pieces run eagerly in between,
so the count says how much of the model compiling actually covers; lorakit's LoRA layers (their own
autograd op included) must add none.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def compile_model(model: nn.Module) -> None:
    """Compile ``model`` in place (its parameters, names and state dict stay as they are) and start
    counting graph breaks afresh."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model.compile()


def compile_report(top: int = 5) -> dict[str, Any]:
    """Graph breaks and compiled graphs since ``compile_model``, with the most frequent break reasons."""
    from torch._dynamo.utils import counters

    breaks = counters["graph_break"]
    return {
        "graph_breaks": sum(breaks.values()),
        "break_reasons": [reason for reason, _ in breaks.most_common(top)],
        "unique_graphs": counters["stats"]["unique_graphs"],
    }


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass instead of keeping them.

    Non-reentrant checkpointing: the reentrant kind passes gradients only through blocks whose inputs
    require them, and with LoRA every block input comes from frozen layers, so LoRA weights would get
    none unless the embeddings' output were made to require a gradient it does not need.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5 renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
