"""What the loop minimises and with what: the task losses (and their share on each process), AdamW's
parameter groups, and the precision of the trainable weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from lorakit.data import IGNORE_INDEX

_NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "ln_1.weight", "ln_2.weight", "ln_f.weight")


def task_loss(
    logits: torch.Tensor, labels: torch.Tensor, kind: str, label_smoothing: float, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy (with label smoothing) for classes and next tokens, mean squared error for regression.

    Next-token loss counts the target tokens only: prompt positions carry IGNORE_INDEX labels.
    """
    if kind == "regression":
        return F.mse_loss(logits.squeeze(-1).float(), labels.float(), reduction=reduction)
    if kind == "generation":
        logits, labels = logits[:, :-1], labels[:, 1:]
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


def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over trainable parameters only; no weight decay on biases and layer norms."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name.endswith(_NO_DECAY) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


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
