"""One merged model per adapter: each adapter folded into its own copy of the base (W0 + BA), each task's
rows run through its own copy, one task after another.

This is what serving many tasks costs without adapters on a shared base: no LoRA work per row, but one
full model in memory per task. ``lorakit serve --merged`` serves it, and the serving benchmark measures the
shared base against it.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from typing import Any

from lorakit.errors import UserError
from lorakit.predict.inputs import Row
from lorakit.predict.runner import Output, Predictor
from lorakit.predict.sources import AdapterSource, check_one_base


class MergedPredictor:
    """``Predictor``'s interface (add, remove, predict, info) over one merged base copy per adapter."""

    def __init__(self, sources: Sequence[AdapterSource], base: str | None = None) -> None:
        if not sources:
            raise UserError("name at least one adapter", where="--adapter")
        self.base = check_one_base(list(sources), base)
        self.parts: dict[str, Predictor] = {}
        for source in sources:
            self.add(source)

    @property
    def sources(self) -> dict[str, AdapterSource]:
        """Every adapter served, by name."""
        return {name: part.sources[name] for name, part in self.parts.items()}

    @property
    def info(self) -> dict[str, dict[str, Any]]:
        """What ``lorakit serve`` lists for each adapter, by name."""
        return {name: part.info[name] for name, part in self.parts.items()}

    def add(self, source: AdapterSource) -> None:
        """Build one more base copy with ``source`` merged into it."""
        if source.name in self.parts:
            raise UserError(f"an adapter named {source.name!r} is loaded already", source.where)
        check_one_base([source], self.base)
        kinds = {part.generation for part in self.parts.values()}
        if kinds and (source.kind == "generation") not in kinds:
            raise UserError("generation and classification adapters need different model heads", source.where)
        self.parts[source.name] = Predictor([source], self.base, merge=True)

    def remove(self, name: str) -> None:
        """Drop adapter ``name``'s base copy."""
        del self.parts[name]
        gc.collect()  # a whole model: give its memory back now, not at some later collection

    def predict(
        self, rows: Sequence[Row], batch_size: int = 64, advance: Callable[[int], None] | None = None
    ) -> list[Output]:
        """One output per row, in the rows' order; each adapter's rows through its own copy in turn."""
        outputs: list[Output | None] = [None] * len(rows)
        for name in dict.fromkeys(r.adapter for r in rows):
            index = [i for i, r in enumerate(rows) if r.adapter == name]
            results = self.parts[name].predict([rows[i] for i in index], batch_size, advance)
            for i, output in zip(index, results, strict=True):
                outputs[i] = output
        return outputs  # type: ignore[return-value]
