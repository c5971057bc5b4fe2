"""What every LoRA wrapper shares (``lorakit.lora.layers`` defines the three wrappers): the frozen base
module, the adapters it holds by name (``LoraAdapter``: one adapter's A, B, rank, alpha, scaling and
dropout on one layer), which one is active, merging, and the rows of a mixed batch.

An adapter's weights are ordinary parameters, ``<module>.lora_adapters.<name>.lora_A``; switching the
active adapter is a pointer switch, no weight is copied. With a routing set
(``lorakit.lora.adapters.mixed_batch``) one forward pass serves rows of several adapters: the base map
runs once over the whole batch and each adapter's update is added to its own rows only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from lorakit.lora.low_rank import is_conv1d

LORA_DTYPE = torch.float32
DEFAULT_ADAPTER = "default"
# Rows of a mixed batch: (adapter name or None for the bare base, its rows), one entry a group. The rows
# are a slice when the group is contiguous (a view, no copy), else a tensor of row indices.
Rows = torch.Tensor | slice
Routing = Sequence[tuple[str | None, Rows]]


def take_rows(x: torch.Tensor, rows: Rows) -> torch.Tensor:
    """The rows ``rows`` of ``x`` (a view for a slice, a copy for indices)."""
    return x[rows] if isinstance(rows, slice) else x.index_select(0, rows)


def row_count(rows: Rows) -> int:
    """How many rows ``rows`` names."""
    return rows.stop - rows.start if isinstance(rows, slice) else rows.numel()


class SharedInputError(RuntimeError):
    """An adapted layer of a mixed batch got an input that is not one row per batch row: a tensor the
    model shares across rows (DeBERTa's relative-position embeddings through ``query_proj``), whose
    output no per-row routing can split."""


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


def new_lora_pair(
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


def lora_input(x: torch.Tensor, dropout: nn.Module) -> torch.Tensor:
    x = dropout(x)
    # Under autocast the matmuls pick their own dtype; outside it a bf16 input must meet fp32 LoRA weights.
    if x.dtype != LORA_DTYPE and not torch.is_autocast_enabled(x.device.type):
        x = x.to(LORA_DTYPE)
    return x


class LoraAdapter(nn.Module):
    """One adapter's weights on one layer: A and B (lists of them for the slices of a fused projection),
    its rank, alpha, scaling and LoRA dropout. ``offsets``: where each B's output columns start."""

    def __init__(
        self,
        a: Sequence[nn.Parameter],
        b: Sequence[nn.Parameter],
        r: int,
        alpha: float,
        dropout: float,
        use_rslora: bool,
        offsets: Sequence[int] = (0,),
        adapted: Sequence[str] = (),
        embedding: bool = False,
    ) -> None:
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        if adapted:
            self.lora_A: nn.Parameter | nn.ParameterList = nn.ParameterList(a)
            self.lora_B: nn.Parameter | nn.ParameterList = nn.ParameterList(b)
        elif embedding:  # PEFT's names for an embedding's pair
            self.lora_embedding_A, self.lora_embedding_B = a[0], b[0]
        else:
            self.lora_A, self.lora_B = a[0], b[0]
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = lora_scaling(alpha, r, use_rslora)
        self.offsets, self.adapted = tuple(offsets), tuple(adapted)
        # Identity when p = 0 so the input is not copied on every step.
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def factors(self) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """A stacked (k·r, in) and the B factors (d_i, r), as ``lora_linear`` takes them."""
        if isinstance(self.lora_A, nn.ParameterList):
            return torch.cat(list(self.lora_A), dim=0), tuple(self.lora_B)
        return self.lora_A, (self.lora_B,)


class LoraLayer(nn.Module):
    """What every LoRA wrapper shares: the frozen base module, the named adapters, merge state."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_adapters = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.merged = False
        self.routing: Routing | None = None
        base_layer.requires_grad_(False)

    @property
    def weight(self) -> torch.Tensor:  # lets code that reads ``module.weight`` keep working
        return self.base_layer.weight

    @property
    def adapter(self) -> LoraAdapter:
        """The active adapter; AttributeError when none is active (or this layer lacks it)."""
        name = self.active_adapter
        if name is None or name not in self.lora_adapters:
            raise AttributeError(f"no active LoRA adapter on this {type(self.base_layer).__name__}")
        return self.lora_adapters[name]  # type: ignore[return-value]

    # The active adapter's attributes, read as the wrapper's own (as when a layer held one adapter).
    lora_A = property(lambda self: self.adapter.lora_A)
    lora_B = property(lambda self: self.adapter.lora_B)
    r = property(lambda self: self.adapter.r)
    alpha = property(lambda self: self.adapter.alpha)
    use_rslora = property(lambda self: self.adapter.use_rslora)
    scaling = property(lambda self: self.adapter.scaling)
    lora_dropout = property(lambda self: self.adapter.lora_dropout)

    def _runs(self) -> LoraAdapter | None:
        """The adapter a plain (unrouted) forward pass applies: the active one, if this layer has it
        and it is not merged into the base already."""
        name = self.active_adapter
        if self.merged or name is None or name not in self.lora_adapters:
            return None
        return self.lora_adapters[name]  # type: ignore[return-value]

    def set_active(self, name: str | None) -> None:
        """Make ``name`` the adapter plain forward passes apply (None, or a name this layer does not
        hold: the bare base map). A pointer switch: no weight is copied."""
        if self.merged and name != self.active_adapter:
            raise ValueError("this layer's adapter is merged into its base: unmerge it before switching")
        self.active_adapter = name

    def add_adapter(self, name: str, adapter: LoraAdapter) -> None:
        """Hold ``adapter`` under ``name``; the first adapter a layer gets becomes active."""
        if name in self.lora_adapters:
            raise ValueError(f"adapter {name!r} is already on this layer")
        if self.merged:
            raise ValueError("cannot add an adapter to a merged layer: unmerge it first")
        self.lora_adapters[name] = adapter
        if self.active_adapter is None and len(self.lora_adapters) == 1:
            self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        """Drop ``name``'s weights from this layer (a merged adapter is unmerged first)."""
        if name not in self.lora_adapters:
            return
        if self.merged and self.active_adapter == name:
            self.unmerge()
        del self.lora_adapters[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def merge(self) -> None:
        """W0 ← W0 + ΔW of the active adapter, computed in fp32; refuses to write non-finite weights, and
        refuses when the layer holds other adapters too (their base would shift)."""
        if self.merged:
            return
        if len(self.lora_adapters) > 1:
            raise ValueError(
                f"this layer holds {len(self.lora_adapters)} adapters; merging one would shift the others' "
                "base: delete the others first"
            )
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

    def _routed(
        self, x: torch.Tensor, routing: Routing, update: Callable[[LoraAdapter, torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """The base map once over the whole batch, then each group's update added to its own rows
        (``update(adapter, rows_of_x)`` gives it at the full output width)."""
        if x.shape[0] != sum(row_count(rows) for _, rows in routing):
            raise SharedInputError(
                f"a {type(self.base_layer).__name__} of a mixed batch got an input of leading size "
                f"{x.shape[0]}, not one row per batch row"
            )
        out = self.base_layer(x)
        grad = torch.is_grad_enabled()
        for name, rows in routing:
            if name is None or name not in self.lora_adapters:
                continue
            delta = update(self.lora_adapters[name], take_rows(x, rows)).to(out.dtype)  # type: ignore[arg-type]
            if isinstance(rows, slice) and not grad:
                out[rows] += delta
                continue
            if isinstance(rows, slice):
                rows = torch.arange(rows.start, rows.stop, device=out.device)
            out = out.index_add(0, rows, delta) if grad else out.index_add_(0, rows, delta)
        return out

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}: r={a.r}, alpha={a.alpha:g}" for n, a in self.lora_adapters.items())
        return f"active={self.active_adapter!r}, merged={self.merged}, adapters=[{adapters}]"
