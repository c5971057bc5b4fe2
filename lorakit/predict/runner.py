"""One base model serving many adapters: rows in, one output row each, in input order.

``Predictor`` loads the base once and every adapter beside it by name (``lorakit.lora.adapters``); with
``merge=True`` it holds one adapter merged into the base weights (``lorakit serve --merged`` keeps one such
copy per adapter, in ``lorakit.predict.merged``).
Classification and regression rows run as mixed-task batches, rows of all adapters together, sorted by
length so that little of each batch is padding; each row comes back cut to its own head's width.
Generation rows run per adapter, through ``lorakit generate``'s own decoding. ``lorakit serve`` keeps a
``Predictor`` for the life of the process and adds or removes adapters while it runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from lorakit.errors import UserError
from lorakit.predict.inputs import Row
from lorakit.predict.sources import AdapterSource, check_one_base

Output = dict[str, Any]


# ``--quantize`` of `lorakit predict` / `lorakit serve`: the shared base's quantization for every
# Predictor this process builds (None: the first run's ``model.quantize``; PEFT folders: none).
_BASE_QUANTIZE: str | None = None


@contextlib.contextmanager
def base_quantize(method: str | None) -> Iterator[None]:
    """Build every Predictor's base quantized by ``method`` (nf4 | int8 | none) inside the block;
    None changes nothing. UserError at ``--quantize`` for another name or a missing extra."""
    global _BASE_QUANTIZE
    if method is not None:
        from lorakit.quantization import QUANTIZE_CHOICES, MissingExtraError, check_available

        if method not in QUANTIZE_CHOICES:
            raise UserError(f"expected one of {', '.join(QUANTIZE_CHOICES)} (got {method!r})", "--quantize")
        try:
            check_available(method)
        except MissingExtraError as exc:
            raise UserError(str(exc).removeprefix("model.quantize: "), "--quantize") from None
    previous, _BASE_QUANTIZE = _BASE_QUANTIZE, method if method is not None else _BASE_QUANTIZE
    try:
        yield
    finally:
        _BASE_QUANTIZE = previous


def _base_recipe(sources: Sequence[AdapterSource], base: str) -> Any:
    """The recipe the base model is built from: the first run's model section (dtype, tokenizer,
    trust_remote_code, quantize) pointed at ``base``, or the defaults for plain PEFT adapters; ``--quantize``
    (``base_quantize``) sets the quantization of either."""
    from lorakit.recipe import recipe_from_dict

    recipe = next((s.recipe for s in sources if s.recipe is not None), None)
    if recipe is None:
        model_section: dict[str, Any] = {"name_or_path": base}
        if _BASE_QUANTIZE is not None:
            model_section["quantize"] = _BASE_QUANTIZE
        return recipe_from_dict({"model": model_section}, source="--base")
    update: dict[str, Any] = {"name_or_path": base}
    if _BASE_QUANTIZE is not None:
        update["quantize"] = _BASE_QUANTIZE
    model = recipe.model.model_copy(update=update)
    return recipe.model_copy(update={"model": model})


class Predictor:
    """The base model with every adapter of ``sources`` loaded beside it, ready to predict rows.

    With ``merge=True`` the one adapter of ``sources`` is merged into the base weights (W0 + BA): plain
    layers at inference, and no more adapters can be added.
    """

    def __init__(
        self, sources: Sequence[AdapterSource], base: str | None = None, merge: bool = False
    ) -> None:
        from accelerate import Accelerator

        from lorakit.models import HeadSpec, build_model, load_tokenizer

        if not sources:
            raise UserError("name at least one adapter", where="--adapter")
        if merge and len(sources) > 1:
            raise ValueError("a merged predictor holds exactly one adapter")
        self.base = check_one_base(list(sources), base)
        self.recipe = _base_recipe(sources, self.base)
        first = sources[0]
        self.generation = first.kind == "generation"
        self.tokenizer = load_tokenizer(self.recipe)
        head = HeadSpec(first.kind, first.num_labels or 1, first.label_names)
        self.accelerator = Accelerator()
        model = build_model(self.recipe, head)
        self.model = self.accelerator.prepare(model.eval())
        self.sources: dict[str, AdapterSource] = {}
        self.info: dict[str, dict[str, Any]] = {}
        self.merged = False
        for source in sources:
            self.add(source)
        if merge:
            from lorakit.quantization import merge_dense  # dense W0 + BA (dequantized W0 if quantized)

            self.model = merge_dense(self.model)
            self.merged = True

    def add(self, source: AdapterSource) -> None:
        """Load one more adapter beside the others; UserError when it does not fit this base."""
        from lorakit.lora import adapted_modules, adapter_bytes, load_named_adapter

        if self.merged:
            raise ValueError("a merged predictor holds exactly one adapter")
        if source.name in self.sources:
            raise UserError(f"an adapter named {source.name!r} is loaded already", source.where)
        check_one_base([source], self.base)  # the others were checked against this base already
        if (source.kind == "generation") != self.generation:
            raise UserError("generation and classification adapters need different model heads", source.where)
        try:
            config = load_named_adapter(self.model, source.path, source.name)
        except (ValueError, RuntimeError) as exc:
            raise UserError(
                f"does not fit the base model: {' '.join(str(exc).split())[:300]}", source.where
            ) from None
        self.sources[source.name] = source
        adapted = adapted_modules(self.model)[source.name]
        self.info[source.name] = {
            "name": source.name,
            "path": str(source.path),
            "task": (source.recipe.task.name or source.recipe.task.type)
            if source.recipe is not None
            else None,
            "kind": source.kind,
            "num_labels": source.num_labels,
            "rank": config.r,
            "alpha": config.alpha,
            "targets": sorted({path.rsplit(".", 1)[-1] for path in adapted}),
            "bytes": adapter_bytes(self.model, source.name),
        }

    def remove(self, name: str) -> None:
        """Unload adapter ``name`` and free its weights."""
        from lorakit.lora import delete_adapter

        if self.merged:
            raise ValueError("a merged predictor's adapter is part of its weights")
        delete_adapter(self.model, name)
        del self.sources[name]
        del self.info[name]

    def predict(
        self, rows: Sequence[Row], batch_size: int = 64, advance: Callable[[int], None] | None = None
    ) -> list[Output]:
        """One output per row, in the rows' order; ``advance(n)`` is called as n more rows are done."""
        outputs: list[Output | None] = [None] * len(rows)
        indexed = list(enumerate(rows))
        if self.generation:
            for name in dict.fromkeys(r.adapter for r in rows):
                group = [(i, r) for i, r in indexed if r.adapter == name]
                for (i, _), text in zip(group, self._generate(name, [r for _, r in group]), strict=True):
                    outputs[i] = {"adapter": name, "prediction": text, "readable": text, "scores": None}
                if advance:
                    advance(len(group))
        else:
            self._classify(indexed, outputs, batch_size, advance)
        return outputs  # type: ignore[return-value]

    def _max_length(self, source: AdapterSource) -> int:
        if source.max_length is not None:
            return source.max_length
        # A plain PEFT folder: the tokenizer's own limit, within the model's positions.
        config = self.model.config
        positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        limits = [n for n in (self.tokenizer.model_max_length, positions) if n and n < 1_000_000]
        return min(limits) if limits else 512

    @torch.inference_mode()
    def _classify(
        self,
        indexed: list[tuple[int, Row]],
        outputs: list[Output | None],
        batch_size: int,
        advance: Callable[[int], None] | None,
    ) -> None:
        from lorakit.data import PaddingCollator, encode_classification, padding_bounded_chunks
        from lorakit.lora import mixed_logits

        encoded: list[tuple[int, str, dict[str, Any]]] = []
        for name in dict.fromkeys(r.adapter for _, r in indexed):
            group = [(i, r) for i, r in indexed if r.adapter == name]
            texts = {"text_a": [r.text for _, r in group], "text_b": [r.text_pair for _, r in group]}
            columns = encode_classification(texts, self.tokenizer, self._max_length(self.sources[name]))
            features = [
                dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)
            ]
            encoded += [(i, name, f) for (i, _), f in zip(group, features, strict=True)]
        # Longest first: a batch too large for memory fails at once, and similar lengths pad little.
        encoded.sort(key=lambda e: -len(e[2]["input_ids"]))
        collate = PaddingCollator(self.tokenizer)
        device = self.accelerator.device
        lengths = [len(f["input_ids"]) for _, _, f in encoded]
        order = {name: k for k, name in enumerate(self.sources)}
        for rows in padding_bounded_chunks(lengths, batch_size):
            # Each adapter's rows together: its LoRA layers and head then work on views of the batch.
            chunk = sorted(encoded[rows.start : rows.stop], key=lambda e: order[e[1]])
            batch = {k: v.to(device) for k, v in collate([f for _, _, f in chunk]).items()}
            names = [name for _, name, _ in chunk]
            if self.merged:  # one adapter, in the weights: a plain forward pass
                logits = self.model(**batch).logits
                widths = {names[0]: int(logits.shape[-1])}
            else:
                logits, widths = mixed_logits(self.model, names, **batch)
            logits = logits.float().cpu()
            for (i, name, _), row in zip(chunk, logits, strict=True):
                outputs[i] = self._output(name, row[: widths[name]].tolist())
            if advance:
                advance(len(chunk))

    def _output(self, name: str, scores: list[float]) -> Output:
        source = self.sources[name]
        if source.kind == "regression":
            return {"adapter": name, "prediction": scores[0], "readable": scores[0], "scores": scores}
        names = source.label_names
        if source.kind == "multilabel":  # every class whose logit is above 0, as evaluation counts them
            hot = [int(score > 0) for score in scores]
            readable_set = [names[i] if names else f"LABEL_{i}" for i, on in enumerate(hot) if on]
            return {"adapter": name, "prediction": hot, "readable": readable_set, "scores": scores}
        label = max(range(len(scores)), key=scores.__getitem__)
        readable = names[label] if names and label < len(names) else f"LABEL_{label}"
        return {"adapter": name, "prediction": label, "readable": readable, "scores": scores}

    def _generate(self, name: str, rows: Sequence[Row]) -> list[str]:
        from lorakit.generate import (
            Input,
            build_prompts,
            decoding,
            generate_from_prompts,
            one_line,
        )

        source = self.sources[name]
        prompts = build_prompts([Input(r.text, r.where) for r in rows], source.task, self.tokenizer)
        settings = decoding(source.recipe)
        from lorakit.models import prompt_room

        room = prompt_room(self.model.config, settings.max_new_tokens)
        length = min(source.max_length, room) if source.max_length else room
        with self._using(name):
            texts = generate_from_prompts(
                self.model, self.tokenizer, prompts, settings, length, self.accelerator
            )
        return [one_line(t, source.task) for t in texts]

    @contextlib.contextmanager
    def _using(self, name: str) -> Iterator[None]:
        """Adapter ``name`` active within the block (a merged model has nothing to switch)."""
        from lorakit.lora import activated

        with contextlib.nullcontext() if self.merged else activated(self.model, name):
            yield


def check_prompts(sources: dict[str, AdapterSource], rows: Sequence[Row]) -> None:
    """Build every generation row's prompt once, before the model loads: a bad input fails at once."""
    from lorakit.generate import Input, build_prompts

    for row in rows:
        source = sources[row.adapter]
        if source.kind == "generation":
            build_prompts([Input(row.text, row.where)], source.task)
