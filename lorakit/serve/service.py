"""What ``lorakit serve`` serves (``Service``): the predictor and, on the event loop's side, the adapters,
options, metrics and the decoding scheduler; the routes (``app``, ``openai_routes``) take it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lorakit.errors import UserError
from lorakit.predict import AdapterSource, MergedPredictor, Predictor, read_source
from lorakit.serve import admin
from lorakit.serve.batcher import Batcher
from lorakit.serve.metrics import Metrics
from lorakit.serve.options import ServeOptions, check_generation_length

if TYPE_CHECKING:
    from lorakit.serve.decode_queue import DecodeScheduler


@dataclass
class Service:
    """What the app serves: the predictor (touched on the batcher's worker thread only) and, on the event
    loop's side, the adapters requests may name, the options, the keys and the metrics."""

    predictor: Predictor | MergedPredictor
    batcher: Batcher
    base: str | None = None  # --base as given, for PEFT directories loaded later
    options: ServeOptions = field(default_factory=ServeOptions)
    metrics: Metrics = field(default_factory=Metrics)
    sources: dict[str, AdapterSource] = field(default_factory=dict)
    adapters: dict[str, dict[str, Any]] = field(default_factory=dict)
    loading: set[str] = field(default_factory=set)
    generation: DecodeScheduler | None = None  # when the adapters generate text (and are not merged)

    def __post_init__(self) -> None:
        self.sources = dict(self.predictor.sources)
        self.adapters = {name: dict(info) for name, info in self.predictor.info.items()}
        self.metrics.adapters.set(len(self.adapters))

    def load(self, name: str, directory: Any) -> tuple[AdapterSource, dict[str, Any]]:
        """Check one adapter against the base from its headers, then load it (on the worker thread);
        UserError when it does not fit."""
        source = read_source(f"{name}={directory}", self.base, None, where=f"adapter {name!r}")
        check_generation_length(source, self.options.max_new_tokens)
        if not admin.same_base(source.base, self.predictor.base):  # a base elsewhere is not even read
            raise UserError(f"trained on another base model than the one served ({source.base!r})")
        model = (
            self.predictor.model
            if isinstance(self.predictor, Predictor)
            else next(iter(self.predictor.parts.values())).model
        )
        admin.check_against_base(model, source.path)
        self.predictor.add(source)
        return source, dict(self.predictor.info[name])

    def public_info(self, info: dict[str, Any]) -> dict[str, Any]:
        """An adapter as listed: its path relative to the root, never absolute."""
        return admin.info_for_client(info, self.options.adapter_root)
