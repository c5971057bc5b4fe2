"""LoRA layers: a frozen base map W0 plus a trainable low-rank update (alpha/r)·B·A.

Three wrappers, each holding the original module as ``base_layer`` so that unloading puts the very
same module back:

* ``LoraLinear`` for ``nn.Linear`` and GPT-2's ``Conv1D`` (weight stored (in, out)).
* ``LoraFusedLinear`` for slices of a fused projection (GPT-2's ``c_attn`` = q|k|v): each adapted
  slice gets its own rank-r pair; the others get none.
* ``LoraEmbedding`` for ``nn.Embedding``.

A is always (r, in) and B (out, r), whatever the base layout, as in PEFT's files. LoRA weights are
created on the base weight's device and kept in float32 even when the base is bf16/fp16.
"""

from __future__ import annotations

import math
from abc import ABCMeta, abstractmethod
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.lora.low_rank import is_conv1d, lora_linear

LORA_DTYPE = torch.float32


def lora_scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """alpha/r, or alpha/sqrt(r) with rank-stabilised LoRA (Kalajdzievski, 2023)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a Conv1D."""
    if is_conv1d(module):
        fan_in, fan_out = module.weight.shape
        return int(fan_in), int(fan_out)
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    raise TypeError(f"LoRA for linear maps needs nn.Linear or Conv1D, got {type(module).__name__}")


def _new_lora_pair(
    r: int, fan_in: int, fan_out: int, device: torch.device, init: str
) -> tuple[nn.Parameter, nn.Parameter]:
    a = torch.empty(r, fan_in, device=device, dtype=LORA_DTYPE)
    if init == "gaussian":
        nn.init.normal_(a, std=1.0 / r)
    elif init == "kaiming":
        # Same as nn.Linear's default init, which is what loralib and PEFT use for A.
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    else:
        raise ValueError(f"unknown LoRA init {init!r}; use 'kaiming' or 'gaussian'")
    b = torch.zeros(fan_out, r, device=device, dtype=LORA_DTYPE)
    return nn.Parameter(a), nn.Parameter(b)


def _lora_input(x: torch.Tensor, dropout: nn.Module) -> torch.Tensor:
    x = dropout(x)
    # Under autocast the matmuls pick their own dtype; outside it a bf16 input must meet fp32 LoRA weights.
    if x.dtype != LORA_DTYPE and not torch.is_autocast_enabled(x.device.type):
        x = x.to(LORA_DTYPE)
    return x


class _LoraBase(nn.Module, metaclass=ABCMeta):
    """What every LoRA wrapper shares: the frozen base module, scaling, merge state."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, use_rslora: bool) -> None:
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        self.base_layer = base_layer
        self.r = r
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.scaling = lora_scaling(alpha, r, use_rslora)
        self.merged = False
        base_layer.requires_grad_(False)

    @property
    def weight(self) -> torch.Tensor:  # lets code that reads ``module.weight`` keep working
        return self.base_layer.weight

    @abstractmethod
    def delta_weight(self) -> torch.Tensor:
        """The update to add to ``base_layer.weight``, in fp32 and in the base weight's own layout."""

    def merge(self) -> None:
        """W0 ← W0 + ΔW, computed in fp32; refuses to write non-finite weights."""
        if self.merged:
            return
        w = self.base_layer.weight
        merged = w.data.to(LORA_DTYPE) + self.delta_weight()
        if not torch.isfinite(merged).all():
            raise ValueError(f"merging would write non-finite weights into {type(self.base_layer).__name__}")
        w.data.copy_(merged.to(w.dtype))
        self.merged = True

    def unmerge(self) -> None:
        """W0 ← W0 − ΔW: undoes ``merge``."""
        if not self.merged:
            return
        w = self.base_layer.weight
        w.data.copy_((w.data.to(LORA_DTYPE) - self.delta_weight()).to(w.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


class LoraLinear(_LoraBase):
    """y = W0 x + b + (alpha/r)·B·A·dropout(x) for an nn.Linear or a Conv1D base."""

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        init: str = "kaiming",
        use_rslora: bool = False,
    ) -> None:
        super().__init__(base_layer, r, alpha, use_rslora)
        self.fan_in_fan_out = is_conv1d(base_layer)
        fan_in, fan_out = linear_shape(base_layer)
        self.lora_A, self.lora_B = _new_lora_pair(r, fan_in, fan_out, base_layer.weight.device, init)
        # Identity when p = 0 so the input is not copied on every step.
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta_weight(self) -> torch.Tensor:
        delta = (self.lora_B @ self.lora_A) * self.scaling
        return delta.t() if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        lora_x = _lora_input(x, self.lora_dropout)
        return lora_linear(self.base_layer, x, lora_x, self.lora_A, (self.lora_B,), (0,), self.scaling)


class LoraFusedLinear(_LoraBase):
    """LoRA on some slices of a fused projection whose output is ``n`` equal parts (GPT-2 ``c_attn`` =
    q|k|v), as loralib's ``MergedLinear(enable_lora=[True, False, True])``.

    Each adapted slice i has A_i (r, in) and B_i (d, r). The forward pass multiplies the input by the
    stacked A_all = [A_i] once, then adds each B_i's product into its own slice's output columns only
    (``lorakit.lora.low_rank``). ``block_b`` (B_all with zeros outside the adapted slices) is the same
    update as one rank n·r pair: the form PEFT's files hold, and the one merging uses.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        slice_names: Sequence[str],
        adapted: Sequence[str],
        r: int,
        alpha: float,
        dropout: float = 0.0,
        init: str = "kaiming",
        use_rslora: bool = False,
    ) -> None:
        super().__init__(base_layer, r, alpha, use_rslora)
        self.fan_in_fan_out = is_conv1d(base_layer)
        fan_in, fan_out = linear_shape(base_layer)
        if fan_out % len(slice_names):
            raise ValueError(f"{fan_out} output features do not split into {len(slice_names)} equal slices")
        unknown = [s for s in adapted if s not in slice_names]
        if unknown or not adapted:
            raise ValueError(f"slices {list(adapted)} must be a non-empty subset of {list(slice_names)}")
        self.slice_names = tuple(slice_names)
        self.adapted = tuple(s for s in slice_names if s in adapted)  # kept in the fused order
        self.slice_size = fan_out // len(slice_names)
        # Where each adapted slice's output columns start.
        self.offsets = tuple(self.slice_names.index(s) * self.slice_size for s in self.adapted)
        device = base_layer.weight.device
        pairs = [_new_lora_pair(r, fan_in, self.slice_size, device, init) for _ in self.adapted]
        self.lora_A = nn.ParameterList([a for a, _ in pairs])
        self.lora_B = nn.ParameterList([b for _, b in pairs])
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def stacked_a(self) -> torch.Tensor:
        """A_all: (n_adapted·r, in)."""
        return torch.cat(list(self.lora_A), dim=0)

    def block_b(self, scale: float = 1.0) -> torch.Tensor:
        """B_all: (out, n_adapted·r), B_i·scale in slice i's rows and columns, zeros elsewhere."""
        k, r = len(self.adapted), self.r
        rows = []
        for name in self.slice_names:
            if name in self.adapted:
                i = self.adapted.index(name)
                rows.append(F.pad(self.lora_B[i] * scale, (i * r, (k - 1 - i) * r)))
            else:
                rows.append(self.lora_B[0].new_zeros(self.slice_size, k * r))
        return torch.cat(rows, dim=0)

    def delta_weight(self) -> torch.Tensor:
        delta = self.block_b(self.scaling) @ self.stacked_a()
        return delta.t() if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        lora_x = _lora_input(x, self.lora_dropout)
        # Only the adapted slices' columns are touched: no products with the zero blocks of block_b.
        return lora_linear(
            self.base_layer, x, lora_x, self.stacked_a(), tuple(self.lora_B), self.offsets, self.scaling
        )

    def extra_repr(self) -> str:
        return f"slices={self.adapted} of {self.slice_names}, " + super().extra_repr()


class LoraEmbedding(_LoraBase):
    """LoRA on an nn.Embedding: A (r, num_embeddings) zeros, B (dim, r) normal, as loralib and PEFT."""

    def __init__(
        self, base_layer: nn.Embedding, r: int, alpha: float, init: str = "kaiming", use_rslora: bool = False
    ) -> None:
        super().__init__(base_layer, r, alpha, use_rslora)
        device = base_layer.weight.device
        num, dim = base_layer.num_embeddings, base_layer.embedding_dim
        self.lora_embedding_A = nn.Parameter(torch.zeros(r, num, device=device, dtype=LORA_DTYPE))
        b = torch.empty(dim, r, device=device, dtype=LORA_DTYPE)
        nn.init.normal_(b)
        self.lora_embedding_B = nn.Parameter(b)
        del init  # embeddings always start with A = 0, so the "kaiming"/"gaussian" choice does not apply

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_embedding_B @ self.lora_embedding_A).t() * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        base = self.base_layer
        after_a = F.embedding(
            x,
            self.lora_embedding_A.t(),
            base.padding_idx,
            base.max_norm,
            base.norm_type,
            base.scale_grad_by_freq,
            base.sparse,
        )
        delta = after_a @ (self.lora_embedding_B * self.scaling).t()
        return result + delta.to(result.dtype)


LORA_LAYER_TYPES = (LoraLinear, LoraFusedLinear, LoraEmbedding)
