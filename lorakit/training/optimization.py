"""What the loop minimises and with what: the task losses (and their share on each process), AdamW's
parameter groups, and the precision of the trainable weights."""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from lorakit.data import IGNORE_INDEX

# Where torch (>= 2.4) has a fused AdamW kernel, and for which weights.
_FUSED_DEVICES = ("cpu", "cuda")
_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Normalisation modules by class: torch's own, and every class named as one (any class in the MRO):
# transformers' LlamaRMSNorm, GemmaRMSNorm, T5LayerNorm, ConvNextLayerNorm, LayerNorm2d, Mamba2's
# MambaRMSNormGated... Names of modules would not do: GPT-2 calls its norms ln_1, Mamba norm_f.
_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
_NORM_CLASS_NAME = re.compile(r"Norm(?:\d+d)?(?:Gated)?$")


def task_loss(
    logits: torch.Tensor, labels: torch.Tensor, kind: str, label_smoothing: float, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy (with label smoothing) for classes and next tokens, mean squared error for regression,
    binary cross-entropy for multilabel rows.

    Next-token loss counts the target tokens only: prompt positions carry IGNORE_INDEX labels.
    """
    if kind == "regression":
        return F.mse_loss(logits.squeeze(-1).float(), labels.float(), reduction=reduction)
    if kind == "multilabel":  # a sigmoid a class; the mean over rows and classes, as transformers' own
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction=reduction)
    if kind == "generation":
        # Shift the labels, not the logits: slicing logits[:, :-1] would copy the whole (batch, seq,
        # vocab) tensor (and its gradient); the last position gets IGNORE_INDEX and drops out.
        labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        label_smoothing=label_smoothing,
        reduction=reduction,
    )


def global_mean_loss(
    logits: torch.Tensor, labels: torch.Tensor, kind: str, label_smoothing: float, accelerator: Accelerator
) -> torch.Tensor:
    """This process's share of the loss whose gradient, averaged over processes as DDP does, is the
    gradient of the mean over the whole global batch.

    Every process holds the same number of rows, so per-row losses need nothing more than the mean.
    Next-token losses are means over target tokens, and processes hold different numbers of those: the
    sum over this process's tokens divided by the global token count (times N, which DDP's average
    undoes) weighs every token alike, as one process with the whole batch would.
    """
    n = accelerator.num_processes
    if kind != "generation" or n == 1:
        return task_loss(logits, labels, kind, label_smoothing)
    total = task_loss(logits, labels, kind, label_smoothing, reduction="sum")
    tokens = (labels[:, 1:] != IGNORE_INDEX).sum().float()
    # A collective on a device scalar: no host synchronisation.
    return total * n / accelerator.reduce(tokens, "sum").clamp_min(1.0)


def is_norm_module(module: nn.Module) -> bool:
    """True for a normalisation layer: a torch norm, or any class whose name (or a base class's) says so."""
    return isinstance(module, _NORM_TYPES) or any(
        _NORM_CLASS_NAME.search(cls.__name__) for cls in type(module).__mro__
    )


def no_decay_parameter_ids(model: nn.Module) -> set[int]:
    """``id`` of every parameter that takes no weight decay: biases and the weights of norm layers.

    Decided by role, not by the names one model family gives its norms, so that every family is covered
    (Llama's input_layernorm, GPT-2's ln_1, BERT's LayerNorm alike). A norm's own parameters only: an
    adaptive norm's projection (a Linear inside it) is a weight matrix like any other and decays. A
    parameter is a bias when its name ends so (bias, DeBERTa's q_bias): the rule the names gave before,
    which keeps the groups, and so the optimizer state in checkpoints, of the families it already knew.
    """
    ids = {id(p) for m in model.modules() if is_norm_module(m) for p in m.parameters(recurse=False)}
    ids.update(id(p) for name, p in model.named_parameters() if name.endswith("bias"))
    return ids


def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over trainable parameters only; no weight decay on biases and normalisation layers
    (``no_decay_parameter_ids``).

    torch's fused AdamW kernel (one pass over each tensor for the whole update) where every trainable
    tensor can use it, as the Hugging Face Trainer's default ``adamw_torch_fused``: it matters for full
    fine-tuning, whose update touches every weight (about 10% of a RoBERTa-base step on the CPU,
    benchmarks/RESULTS.md). Elsewhere, torch's default implementation.
    """
    skip = no_decay_parameter_ids(model)
    decay, no_decay = [], []
    # The parameters' own order within each group: checkpoints name the Adam state by it (loop.py's layout).
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if id(param) in skip else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.device.type in _FUSED_DEVICES and p.dtype in _FUSED_DTYPES for p in params)
    return torch.optim.AdamW(groups, lr=lr, fused=fused or None)


def float32_trainables(model: nn.Module) -> None:
    """Trainable weights in float32 under mixed precision, even on a half-precision base: autocast computes
    in half precision from them, the optimizer updates full-precision values, and fp16 loss scaling
    refuses half-precision gradients. LoRA weights are float32 already.

    A normalisation layer with a trainable part goes float32 whole: CUDA autocast runs layer norms in
    float32 anyway, but on the CPU a norm whose weight and bias differ in dtype fails (its weights are
    tiny, so the frozen half costs nothing to widen).
    """
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if not any(p.requires_grad and p.dtype != torch.float32 for p in own):
            continue
        whole = "Norm" in type(module).__name__
        for param in own:
            if (whole or param.requires_grad) and param.dtype != torch.float32:
                param.data = param.data.float()
