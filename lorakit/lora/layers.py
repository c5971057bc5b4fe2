"""LoRA layers: a frozen base map W0 plus, per named adapter, a low-rank update (alpha/r)·B·A.

Three wrappers, each holding the original module as ``base_layer`` so that unloading puts the very
same module back:

* ``LoraLinear`` for ``nn.Linear`` and GPT-2's ``Conv1D`` (weight stored (in, out)).
* ``LoraFusedLinear`` for slices of a fused projection (GPT-2's ``c_attn`` = q|k|v): each adapted
  slice gets its own rank-r pair; the others get none.
* ``LoraEmbedding`` for ``nn.Embedding``.

Each holds any number of adapters by name, one of them (or none) active (``lorakit.lora.layer_base``);
``lora_A``, ``lora_B``, ``r``, ``scaling``... read the active one. A is always (r, in) and B (out, r),
whatever the base layout, as in PEFT's files. LoRA weights are created on the base weight's device and
kept in float32 even when the base is bf16/fp16.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.lora.config import SliceSpec, slice_layout
from lorakit.lora.layer_base import (  # noqa: F401  (DEFAULT_ADAPTER...: re-exported, the layer API)
    DEFAULT_ADAPTER,
    LORA_DTYPE,
    LoraAdapter,
    LoraLayer,
    Routing,
    SharedInputError,
    linear_shape,
    lora_input,
    lora_scaling,
    new_lora_pair,
)
from lorakit.lora.low_rank import is_conv1d, lora_linear, sliced_update


class LoraLinear(LoraLayer):
    """y = W0 x + b + (alpha/r)·B·A·dropout(x) for an nn.Linear or a Conv1D base."""

    def __init__(
        self,
        base_layer: nn.Module,
        r: int | None,
        alpha: float = 1.0,
        dropout: float = 0.0,
        init: str = "kaiming",
        use_rslora: bool = False,
        adapter: str = DEFAULT_ADAPTER,
    ) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)
        if r is not None:  # None: a wrapper without adapters yet (``add``)
            self.add(adapter, r, alpha, dropout, init, use_rslora)

    def add(self, name: str, r: int, alpha: float, dropout: float, init: str, use_rslora: bool) -> None:
        """A new adapter ``name`` (A random, B = 0)."""
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        fan_in, fan_out = linear_shape(self.base_layer)
        a, b = new_lora_pair(r, fan_in, fan_out, self.base_layer.weight.device, init)
        self.add_adapter(name, LoraAdapter([a], [b], r, alpha, dropout, use_rslora))

    def delta_weight(self) -> torch.Tensor:
        delta = (self.lora_B @ self.lora_A) * self.scaling
        return delta.t() if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.routing is not None and not self.merged:
            return self._routed(x, self.routing, _linear_update)
        adapter = self._runs()
        if adapter is None:
            return self.base_layer(x)
        lora_x = lora_input(x, adapter.lora_dropout)
        return lora_linear(
            self.base_layer, x, lora_x, adapter.lora_A, (adapter.lora_B,), (0,), adapter.scaling
        )


def _linear_update(adapter: LoraAdapter, x: torch.Tensor) -> torch.Tensor:
    """``s·B A dropout(x)`` for rows ``x`` of a mixed batch."""
    lx = lora_input(x, adapter.lora_dropout)
    return F.linear(F.linear(lx, adapter.lora_A), adapter.lora_B) * adapter.scaling


class LoraFusedLinear(LoraLayer):
    """LoRA on some slices of a fused projection whose output is contiguous parts (GPT-2 ``c_attn`` =
    q|k|v in equal thirds; Phi-3's ``qkv_proj`` with grouped-query attention, a wide q and narrower k, v),
    as loralib's ``MergedLinear(enable_lora=[True, False, True])``. ``slices``: names alone for equal
    parts, (name, rows) pairs, or a ``FusedLayout`` whose groups repeat the parts per head (GPT-NeoX's
    ``query_key_value`` = q|k|v per head): a slice is then every group's share of it
    (``lorakit.lora.config.slice_layout``).

    Each adapted slice i has A_i (r, in) and B_i (d_i, r), d_i its own row count. The forward pass
    multiplies the input by the stacked A_all = [A_i] once, then adds each B_i's product into its own
    slice's output columns only (``lorakit.lora.low_rank``). ``block_b`` (B_all with zeros outside the
    adapted slices' rows) is the same update as one rank n·r pair: the form PEFT's files hold, and the one
    merging uses. Adapters on one fused layer may adapt different slices.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        slices: SliceSpec,
        adapted: Sequence[str] | None,
        r: int = 1,
        alpha: float = 1.0,
        dropout: float = 0.0,
        init: str = "kaiming",
        use_rslora: bool = False,
        adapter: str = DEFAULT_ADAPTER,
    ) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.fan_out = linear_shape(base_layer)[1]
        self.fused_layout = slice_layout(slices, self.fan_out)
        self.slice_names = self.fused_layout.names
        self.slice_sizes = tuple(size for _, size in self.fused_layout.slices)  # per group
        self.groups = self.fused_layout.groups
        # Where each slice's rows of W (columns of the output) start within a group, in order.
        self.slice_offsets = tuple(self.fused_layout.offset(n) for n in self.slice_names)
        if adapted is not None:  # None: a wrapper without adapters yet (``add``)
            self.add(adapter, adapted, r, alpha, dropout, init, use_rslora)

    def add(
        self,
        name: str,
        adapted: Sequence[str],
        r: int,
        alpha: float,
        dropout: float,
        init: str,
        use_rslora: bool,
    ) -> None:
        """A new adapter ``name`` on the ``adapted`` slices (A random, B = 0)."""
        unknown = [s for s in adapted if s not in self.slice_names]
        if unknown or not adapted:
            raise ValueError(f"slices {list(adapted)} must be a non-empty subset of {list(self.slice_names)}")
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        ordered = tuple(s for s in self.slice_names if s in adapted)  # kept in the fused order
        offsets = tuple(self.slice_offsets[self.slice_names.index(s)] for s in ordered)
        fan_in = linear_shape(self.base_layer)[0]
        device = self.base_layer.weight.device
        sizes = [self.fused_layout.rows_of(s) for s in ordered]
        pairs = [new_lora_pair(r, fan_in, d, device, init) for d in sizes]
        a, b = [a for a, _ in pairs], [b for _, b in pairs]
        self.add_adapter(name, LoraAdapter(a, b, r, alpha, dropout, use_rslora, offsets, ordered))

    def add_whole(self, name: str, r: int, alpha: float, dropout: float, init: str, use_rslora: bool) -> None:
        """A new adapter ``name`` on the whole projection, as ``LoraLinear`` holds one (one rank-r pair over
        every output row): an ``all-linear`` adapter beside a q|v-slice one on the same base."""
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        fan_in = linear_shape(self.base_layer)[0]
        a, b = new_lora_pair(r, fan_in, self.fan_out, self.base_layer.weight.device, init)
        self.add_adapter(name, LoraAdapter([a], [b], r, alpha, dropout, use_rslora))

    def adopt(self, layer: LoraLinear) -> None:
        """Take over the whole-module adapters of ``layer`` (a ``LoraLinear`` on the same base), so that
        slice adapters can join them: their parameters keep their names (``lora_adapters.<name>``)."""
        if layer.base_layer is not self.base_layer or layer.merged or layer.routing is not None:
            raise ValueError("only an unmerged, unrouted LoraLinear on the same base can be adopted")
        for name, adapter in layer.lora_adapters.items():
            self.add_adapter(name, adapter)  # type: ignore[arg-type]
        self.active_adapter = layer.active_adapter

    def _groups(self, adapter: LoraAdapter) -> int:
        # A whole-module adapter (no slices) is one contiguous block of every row.
        return self.groups if adapter.adapted else 1

    # The active adapter's slices: () for a whole-module adapter.
    adapted = property(lambda self: self.adapter.adapted)
    offsets = property(lambda self: self.adapter.offsets)

    def stacked_a(self) -> torch.Tensor:
        """A_all of the active adapter: (n_adapted·r, in)."""
        return self.adapter.factors()[0]

    def block_b(self, scale: float = 1.0) -> torch.Tensor:
        """B_all of the active adapter: (out, n_adapted·r), B_i·scale in slice i's rows and columns."""
        adapter = self.adapter
        if not adapter.adapted:
            return adapter.lora_B * scale
        k, r, groups = len(adapter.adapted), adapter.r, self.groups
        rows = []  # one group's worth of rows per slice, (groups, size, k·r), in layout order
        for name, size in zip(self.slice_names, self.slice_sizes, strict=True):
            if name in adapter.adapted:
                i = adapter.adapted.index(name)
                b = F.pad(adapter.lora_B[i] * scale, (i * r, (k - 1 - i) * r))
                rows.append(b.unflatten(0, (groups, size)))
            else:
                rows.append(adapter.lora_B[0].new_zeros(groups, size, k * r))
        return torch.cat(rows, dim=1).flatten(0, 1)

    def layout(self) -> list[tuple[str, int]]:
        """(name, rows per group) per slice, in order."""
        return list(self.fused_layout.slices)

    def delta_weight(self) -> torch.Tensor:
        delta = self.block_b(self.scaling) @ self.stacked_a()
        return delta.t() if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.routing is not None and not self.merged:
            return self._routed(x, self.routing, self._fused_update)
        adapter = self._runs()
        if adapter is None:
            return self.base_layer(x)
        lora_x = lora_input(x, adapter.lora_dropout)
        a, bs = adapter.factors()
        # Only the adapted slices' columns are touched: no products with the zero blocks of block_b.
        groups = self._groups(adapter)
        return lora_linear(self.base_layer, x, lora_x, a, bs, adapter.offsets, adapter.scaling, groups)

    def _fused_update(self, adapter: LoraAdapter, x: torch.Tensor) -> torch.Tensor:
        """``s·B_i A_i dropout(x)`` in each adapted slice's columns, zeros elsewhere, for rows ``x``."""
        a, bs = adapter.factors()
        ax = F.linear(lora_input(x, adapter.lora_dropout), a)
        return sliced_update(ax, bs, adapter.offsets, adapter.scaling, self.fan_out, self._groups(adapter))

    def extra_repr(self) -> str:
        slices = ", ".join(f"{n}: {a.adapted or 'whole'}" for n, a in self.lora_adapters.items())
        groups = f" × {self.groups} groups" if self.groups > 1 else ""
        return f"slices of {self.layout()}{groups}: [{slices}], " + super().extra_repr()


class LoraEmbedding(LoraLayer):
    """LoRA on an nn.Embedding: A (r, num_embeddings) zeros, B (dim, r) normal, as loralib and PEFT."""

    def __init__(
        self,
        base_layer: nn.Embedding,
        r: int | None,
        alpha: float = 1.0,
        init: str = "kaiming",
        use_rslora: bool = False,
        adapter: str = DEFAULT_ADAPTER,
    ) -> None:
        super().__init__(base_layer)
        del init  # embeddings always start with A = 0, so the "kaiming"/"gaussian" choice does not apply
        if r is not None:
            self.add(adapter, r, alpha, use_rslora)

    def add(self, name: str, r: int, alpha: float, use_rslora: bool) -> None:
        """A new adapter ``name`` (A = 0, B normal)."""
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        base = self.base_layer
        device = base.weight.device
        a = nn.Parameter(torch.zeros(r, base.num_embeddings, device=device, dtype=LORA_DTYPE))
        b = torch.empty(base.embedding_dim, r, device=device, dtype=LORA_DTYPE)
        nn.init.normal_(b)
        self.add_adapter(name, LoraAdapter([a], [nn.Parameter(b)], r, alpha, 0.0, use_rslora, embedding=True))

    lora_embedding_A = property(lambda self: self.adapter.lora_embedding_A)
    lora_embedding_B = property(lambda self: self.adapter.lora_embedding_B)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_embedding_B @ self.lora_embedding_A).t() * self.scaling

    def _update(self, adapter: LoraAdapter, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        after_a = F.embedding(
            x,
            adapter.lora_embedding_A.t(),
            base.padding_idx,
            base.max_norm,
            base.norm_type,
            base.scale_grad_by_freq,
            base.sparse,
        )
        return after_a @ (adapter.lora_embedding_B * adapter.scaling).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.routing is not None and not self.merged:
            return self._routed(x, self.routing, self._update)
        adapter = self._runs()
        result = self.base_layer(x)
        if adapter is None:
            return result
        return result + self._update(adapter, x).to(result.dtype)


LORA_LAYER_TYPES = (LoraLinear, LoraFusedLinear, LoraEmbedding)
