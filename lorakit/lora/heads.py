"""Per-adapter copies of the modules an adapter trains whole (``modules_to_save``: a classifier, BERT's
or DeBERTa's pooler), so that one base model carries each task's head beside its LoRA pairs.

``SavedModules`` wraps such a module: ``original`` is the base model's own (used when no adapter, or an
adapter without this head, is active) and ``copies[name]`` each adapter's, which may differ in shape (an
SST-2 head has 2 outputs, MNLI's 3, STS-B's 1). With a routing set, rows of a mixed batch each go
through their own adapter's copy; outputs of different widths come back in one tensor padded with NaN
to the widest, and each group's width is recorded in ``widths`` for the caller to cut its rows to.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lorakit.lora.layer_base import take_rows
from lorakit.lora.layers import Routing


class SavedModules(nn.Module):
    """A module of ``modules_to_save`` with one copy per adapter; the active one (or ``original``) runs."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original = original
        self.copies = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.routing: Routing | None = None
        self.widths: dict[str | None, int] | None = None  # filled on routed passes, by group

    def add_copy(self, name: str) -> nn.Module:
        """A copy of ``original`` for adapter ``name`` (its weights are then loaded or trained)."""
        if name in self.copies:
            raise ValueError(f"adapter {name!r} already has a copy of this module")
        self.copies[name] = copy.deepcopy(self.original)
        return self.copies[name]

    def delete_copy(self, name: str) -> None:
        """Drop adapter ``name``'s copy."""
        if name in self.copies:
            del self.copies[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def set_active(self, name: str | None) -> None:
        """Run ``name``'s copy from now on (``original`` for None or an adapter without a copy)."""
        self.active_adapter = name

    def module_for(self, name: str | None) -> nn.Module:
        """The copy that rows of adapter ``name`` go through."""
        return self.copies[name] if name is not None and name in self.copies else self.original

    def forward(self, hidden: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        routing = self.routing
        if routing is None:
            return self.module_for(self.active_adapter)(hidden, *args, **kwargs)
        outs = []
        for name, rows in routing:
            out = self.module_for(name)(take_rows(hidden, rows), *args, **kwargs)
            if not isinstance(out, torch.Tensor):
                raise TypeError(
                    f"a mixed batch needs modules that return one tensor, not {type(out).__name__}"
                )
            outs.append((name, rows, out))
        width = max(out.shape[-1] for _, _, out in outs)
        first = outs[0][2]
        result = first.new_full((hidden.shape[0], *first.shape[1:-1], width), float("nan"))
        for name, rows, out in outs:
            result[rows, ..., : out.shape[-1]] = out
            if self.widths is not None:
                self.widths[name] = int(out.shape[-1])
        return result
