"""Mixed-adapter decoding with a KV cache: rows of any adapters of one base in one batch, one token a step.

Each step runs the base model once over every row and adds each adapter's low-rank update to its own rows
only (``lorakit.lora.mixed_batch``, the mechanism mixed classification batches use); rows are kept sorted
by adapter, so that each adapter's rows are a contiguous view. Rows join at step boundaries (continuous
batching): a step first decodes one token for the rows already in the batch, then prefills the rows that
join (their prompts left-padded together, through the same mixed pass), then merges their KV cache into
the batch's: both are left-padded to the longer length and stacked. A row that finishes leaves at the end
of the step that finished it, and cache columns that only padding uses any more are cut off.

Positions follow the attention mask (a row's first real token is position 0, whatever its padding), as
``transformers``' ``generate`` computes them: so a row decodes the same tokens here as alone, whatever
rows share its batch. Greedy rows take the argmax; sampled rows draw from their own ``torch.Generator``
(temperature, then nucleus ``top_p``), seeded by the request's ``seed`` when it gives one.

Everything here runs on the serving worker thread (``Batcher.call``), never two steps at once.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch

from lorakit.lora import mixed_batch
from lorakit.serve.text_stream import TextStream


@dataclass
class Sampling:
    """How a row picks its tokens: greedy at temperature 0, else sampled (nucleus ``top_p``)."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass(eq=False)  # compared by identity: rows are looked up in sets
class DecodeRow:
    """One prompt being continued: its adapter (None: the bare base), prompt ids, budget and text."""

    adapter: str | None
    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    text: TextStream
    owner: Any = None  # the request it belongs to (the scheduler's), and its index there
    index: int = 0
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None  # "stop" (end of text or a stop string) | "length"
    cancelled: bool = False  # set from the event loop: the row leaves at the next step
    generator: torch.Generator | None = None


@dataclass
class Emitted:
    """What one step gave a row: its newly released text and, on its last step, why it finished."""

    row: DecodeRow
    text: str
    finish: str | None


class DecodeEngine:
    """The rows being decoded, their KV cache, attention mask, positions and last tokens."""

    def __init__(self, model: Any, eos_token_id: int | None, pad_token_id: int | None) -> None:
        self.model = model
        self.eos = eos_token_id
        self.pad = pad_token_id if pad_token_id is not None else (eos_token_id or 0)
        self.device = next(model.parameters()).device
        parameters = inspect.signature(model.forward).parameters
        # transformers 5 renamed ``past_key_values`` to ``cache`` (the old name still warns).
        self.cache_arg = "cache" if "cache" in parameters else "past_key_values"
        self.keep_logits = "logits_to_keep" in parameters
        self.reset()

    def reset(self) -> None:
        """Forget every row (after a failed step: the cache may be half updated)."""
        self.rows: list[DecodeRow] = []
        self.cache: Any = None
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)
        self.last = torch.zeros(0, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(0, dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def step(self, joining: list[DecodeRow]) -> list[Emitted]:
        """One token for every row in the batch, and the first token of every row of ``joining`` (which
        then stay in the batch); rows cancelled since the last step leave first, finished rows last."""
        self._keep([not r.cancelled for r in self.rows])
        emitted: list[Emitted] = []
        if self.rows:
            emitted += self._choose(self.rows, self._decode())
        joining = [r for r in joining if not r.cancelled]
        if joining:
            layers, mask, logits = self._prefill(joining)
            emitted += self._choose(joining, logits)
            self._join(joining, layers, mask)
        self._keep([r.finish is None for r in self.rows])
        return emitted

    def _forward(self, rows: list[DecodeRow], cache: Any, **inputs: torch.Tensor) -> torch.Tensor:
        """The last position's logits of a mixed pass, row i through its own adapter."""
        if self.keep_logits:
            inputs["logits_to_keep"] = 1  # type: ignore[assignment]  # as generate asks: one row of logits
        with mixed_batch(self.model, [r.adapter for r in rows]):
            out = self.model(**inputs, **{self.cache_arg: cache}, use_cache=True)
        return out.logits[:, -1, :].float()

    def _decode(self) -> torch.Tensor:
        ones = torch.ones(len(self.rows), 1, dtype=torch.long, device=self.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        logits = self._forward(
            self.rows,
            self.cache,
            input_ids=self.last[:, None],
            attention_mask=self.mask,
            position_ids=self.positions[:, None],
        )
        self.positions = self.positions + 1
        return logits

    def _prefill(
        self, rows: list[DecodeRow]
    ) -> tuple[list[tuple[torch.Tensor, ...]], torch.Tensor, torch.Tensor]:
        from transformers import DynamicCache

        width = max(len(r.prompt) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):  # left padding: every prompt ends at the last column
            ids[i, width - len(row.prompt) :] = torch.tensor(row.prompt, dtype=torch.long)
            mask[i, width - len(row.prompt) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as generate: padding at 0
        cache = DynamicCache()
        logits = self._forward(rows, cache, input_ids=ids, attention_mask=mask, position_ids=positions)
        for row in rows:
            if row.sampling.temperature > 0:
                seed = row.sampling.seed
                row.generator = torch.Generator(device=self.device)
                row.generator.manual_seed(seed if seed is not None else int(torch.randint(2**62, ()).item()))
        return _layers(cache), mask, logits

    def _join(
        self, rows: list[DecodeRow], layers: list[tuple[torch.Tensor, ...]], mask: torch.Tensor
    ) -> None:
        """Stack the joining rows' cache under the batch's (both left-padded to one length), then sort
        every row by adapter so that each adapter's rows are contiguous."""
        last = torch.tensor([r.tokens[-1] for r in rows], dtype=torch.long, device=self.device)
        positions = torch.tensor([len(r.prompt) for r in rows], dtype=torch.long, device=self.device)
        if self.rows:
            width = max(self.mask.shape[1], mask.shape[1])
            old = _layers(self.cache)
            layers = [
                tuple(
                    torch.cat([_left_pad(a, width), _left_pad(b, width)]) for a, b in zip(o, n, strict=True)
                )
                for o, n in zip(old, layers, strict=True)
            ]
            mask = torch.cat([_left_pad(self.mask, width), _left_pad(mask, width)])
            last = torch.cat([self.last, last])
            positions = torch.cat([self.positions, positions])
        everyone = self.rows + rows
        order = sorted(range(len(everyone)), key=lambda i: (str(everyone[i].adapter), i))
        index = torch.tensor(order, dtype=torch.long, device=self.device)
        self.rows = [everyone[i] for i in order]
        self.mask, self.last, self.positions = mask[index], last[index], positions[index]
        self.cache = _cache([tuple(t.index_select(0, index) for t in layer) for layer in layers])

    def _keep(self, keep: list[bool]) -> None:
        """Only the rows flagged in ``keep``; cache columns now padding in every row are cut off."""
        if all(keep):
            return
        if not any(keep):
            self.reset()
            return
        index = torch.tensor([i for i, k in enumerate(keep) if k], dtype=torch.long, device=self.device)
        mask = self.mask.index_select(0, index)
        first = int((mask.sum(0) > 0).nonzero()[0].item())  # the first column some row still uses
        layers = [
            tuple(t.index_select(0, index)[:, :, first:] for t in layer) for layer in _layers(self.cache)
        ]
        self.rows = [r for r, k in zip(self.rows, keep, strict=True) if k]
        self.mask = mask[:, first:]
        self.last, self.positions = self.last[index], self.positions[index]
        self.cache = _cache(layers)

    def _choose(self, rows: list[DecodeRow], logits: torch.Tensor) -> list[Emitted]:
        """Each row's next token (greedy: the first maximum, as ``generate``), its released text and
        whether it finished."""
        tokens = logits.argmax(dim=-1).tolist()
        out = []
        for i, row in enumerate(rows):
            if row.sampling.temperature > 0:
                tokens[i] = _sample(logits[i], row.sampling, row.generator)
            token = tokens[i]
            row.tokens.append(token)
            if self.eos is not None and token == self.eos:
                row.finish = "stop"
                out.append(Emitted(row, row.text.finish(), "stop"))
                continue
            text = row.text.add(token)
            if row.text.stopped:
                row.finish = "stop"
            elif len(row.tokens) >= row.max_tokens:
                row.finish = "length"
                text += row.text.finish()
            out.append(Emitted(row, text, row.finish))
        if rows is self.rows:  # decoded rows: their next input is this token
            self.last = torch.tensor(tokens, dtype=torch.long, device=self.device)
        return out


def _sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """A token drawn from softmax(logits / temperature), within the smallest set of tokens whose
    probability reaches ``top_p``."""
    # In float64 (a temperature of 1e-300 is valid and is 0 in float32), shifted so that the largest logit
    # is 0 before dividing: a temperature near 0 then sends the others to -inf, never the top one to +inf,
    # whose softmax would be nan.
    shifted = logits.double() - logits.max().double()
    probs = torch.softmax(shifted / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass of the tokens ranked above each one
        sorted_probs[before >= sampling.top_p] = 0.0  # the first token always stays
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` with zero columns added on the left of its sequence axis (the last but one of a cache
    tensor, the last of a mask) up to ``width``."""
    axis = -1 if t.dim() == 2 else -2
    missing = width - t.shape[axis]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[axis] = missing
    return torch.cat([t.new_zeros(shape), t], dim=axis)


def _layers(cache: Any) -> list[tuple[torch.Tensor, ...]]:
    """(keys, values) of every layer of a ``DynamicCache``, each (rows, heads, length, head size)."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def _cache(layers: list[tuple[torch.Tensor, ...]]) -> Any:
    """A ``DynamicCache`` holding ``layers``."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (keys, values) in enumerate(layers):
        cache.update(keys, values, i)
    return cache
