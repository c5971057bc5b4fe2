"""``lorakit info RECIPE``: what a recipe would train, from the model's ``config.json`` alone.

The model is built on PyTorch's meta device, so its tensors have shapes and dtypes but no storage:
a 1.5B-parameter DeBERTa XXL costs no memory and well under a second. LoRA is injected with the very
``LoraConfig`` that training uses, so the counts are the ones a run will log and a bad target fails
here as it would there.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text
from torch import nn

from lorakit.errors import UserError
from lorakit.lora import ParameterCounts, count_parameters, lora_modules, saved_module_names
from lorakit.models import apply_lora, empty_model, model_config
from lorakit.recipe import Recipe
from lorakit.tasks import build_task

ADAM_BYTES_PER_PARAM = 8  # AdamW keeps two fp32 moments per trainable parameter
MAX_TARGET_LINES = 8
ACTIVATIONS_NOTE = (
    "Estimates cover weights, gradients and AdamW states only: activations (which grow with batch size "
    "× sequence length), temporary buffers and framework overhead are not included."
)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes held during training, apart from activations."""

    weights: int
    gradients: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer


@dataclass(frozen=True)
class InfoReport:
    """What ``describe`` found. ``counts`` and ``saved_bytes`` follow the recipe's method; the LoRA
    fields are None for a ``method: full`` recipe whose ``lora`` section does not fit the model."""

    source: str
    name_or_path: str
    architecture: str  # the model class training builds, e.g. RobertaForSequenceClassification
    model_type: str
    task: str
    task_kind: str
    num_labels: int
    method: str
    dtype: str
    r: int | None
    alpha: float | None
    counts: ParameterCounts
    saved_bytes: int  # the adapter file's tensors (LoRA) or the whole model (full)
    targets: list[str]  # adapted modules, collapsed: layer.{0..11}.attention.self.{query,value}
    num_adapted: int
    modules_to_save: list[str]
    memory_lora: MemoryEstimate | None
    memory_full: MemoryEstimate
    lora_error: str | None = None
    quantize: str = "none"  # model.quantize
    base_bytes: int = 0  # every base parameter at model.dtype
    quantized_base_bytes: int | None = None  # the same with the blocks' linear layers quantized
    unquantized_layers: int = 0  # block linear layers the quantizer cannot block (stay dense)


def _unique_params(model: nn.Module) -> Iterable[tuple[str, nn.Parameter]]:
    # Tied weights (GPT-2's lm_head and wte) are one tensor and must be counted once.
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) not in seen:
            seen.add(id(param))
            yield name, param


def _nbytes(params: Iterable[nn.Parameter]) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _span(values: Sequence[int]) -> str:
    if len(values) == 1:
        return str(values[0])
    if list(values) == list(range(values[0], values[-1] + 1)):
        return f"{{{values[0]}..{values[-1]}}}"
    return "{" + ",".join(map(str, values)) + "}"


def collapse_names(names: Sequence[str]) -> list[str]:
    """Module names folded into brace patterns, first appearance first:
    ``enc.layer.{0..11}.attn.{query,value}`` for the 24 names it stands for."""
    # Names that differ only in their numeric components form one template; when the numbers make a
    # full grid, one pattern stands for all of them exactly.
    grids: dict[tuple[str, ...], list[tuple[int, ...]]] = {}
    for name in names:
        parts = name.split(".")
        template = tuple("#" if p.isdigit() else p for p in parts)
        grids.setdefault(template, []).append(tuple(int(p) for p in parts if p.isdigit()))
    rows: list[tuple[str, ...]] = []
    for template, numbers in grids.items():
        columns = [sorted(set(col)) for col in zip(*numbers, strict=True)]
        if math.prod(len(c) for c in columns) == len(set(numbers)):
            spans = iter(_span(c) for c in columns)
            rows.append(tuple(next(spans) if p == "#" else p for p in template))
        else:
            rows.extend(_names_of(template, numbers))
    # Then patterns that differ in their last component only share one line.
    merged: dict[tuple[str, ...], list[str]] = {}
    for row in rows:
        merged.setdefault(row[:-1], []).append(row[-1])
    out = []
    for head, leaves in merged.items():
        leaf = leaves[0] if len(leaves) == 1 else "{" + ",".join(leaves) + "}"
        out.append(".".join((*head, leaf)))
    return out


def _names_of(template: tuple[str, ...], numbers: list[tuple[int, ...]]) -> list[tuple[str, ...]]:
    """The original names of a template that is not a full grid, as component tuples."""
    rows = []
    for nums in numbers:
        it = iter(nums)
        rows.append(tuple(str(next(it)) if p == "#" else p for p in template))
    return rows


def _adapted_names(model: nn.Module) -> list[str]:
    # A fused projection shows which slices carry LoRA: transformer.h.{0..23}.attn.c_attn[q,v].
    return [
        f"{name}[{','.join(module.adapted)}]" if getattr(module, "adapted", ()) else name
        for name, module in lora_modules(model)
    ]


def describe(recipe: Recipe) -> InfoReport:
    """Parameter counts, adapter size, LoRA targets and a training-memory estimate for ``recipe``,
    from the model's config alone (no weights are read, none are allocated)."""
    task = build_task(recipe.task)  # sizes the head; reads own data only for labels not in the recipe
    config = model_config(recipe, task)
    model = empty_model(recipe, task, config)
    base = list(_unique_params(model))
    base_params = sum(p.numel() for _, p in base)
    base_bytes = _nbytes(p for _, p in base)
    memory_full = MemoryEstimate(base_bytes, base_bytes, ADAM_BYTES_PER_PARAM * base_params)
    saving, unquantized = _quantized_saving(recipe, model)

    lora_error = None
    try:
        lora_cfg, _ = apply_lora(recipe, model, task)
    except UserError as exc:
        if recipe.method == "lora":
            raise
        lora_cfg, lora_error = None, str(exc)  # full fine-tuning ignores the lora section

    memory_lora = None
    targets: list[str] = []
    heads: list[str] = []
    if lora_cfg is not None:
        params = [p for _, p in _unique_params(model)]
        trainable = [p for p in params if p.requires_grad]
        n_trainable = sum(p.numel() for p in trainable)
        memory_lora = MemoryEstimate(
            _nbytes(params) - saving, _nbytes(trainable), ADAM_BYTES_PER_PARAM * n_trainable
        )
        targets = _adapted_names(model)
        heads = saved_module_names(model, lora_cfg.modules_to_save)

    if recipe.method == "full":
        counts = ParameterCounts(total=base_params, trainable=base_params, lora=0)
        saved_bytes = base_bytes
    else:
        counts = count_parameters(model)
        saved_bytes = memory_lora.gradients if memory_lora else 0  # trainable tensors, at their dtype
    return InfoReport(
        source=recipe.source,
        name_or_path=recipe.model.name_or_path,
        architecture=type(model).__name__,
        model_type=str(getattr(config, "model_type", "?")),
        task=task.name,
        task_kind=task.kind,
        num_labels=task.num_labels,
        method=recipe.method,
        dtype=recipe.model.dtype,
        r=recipe.lora.r if lora_cfg else None,
        alpha=recipe.lora.alpha if lora_cfg else None,
        counts=counts,
        saved_bytes=saved_bytes,
        targets=collapse_names(targets),
        num_adapted=len(targets),
        modules_to_save=heads,
        memory_lora=memory_lora,
        memory_full=memory_full,
        lora_error=lora_error,
        quantize=recipe.model.quantize,
        base_bytes=base_bytes,
        quantized_base_bytes=base_bytes - saving if recipe.model.quantize != "none" else None,
        unquantized_layers=unquantized,
    )


def _quantized_saving(recipe: Recipe, model: nn.Module) -> tuple[int, int]:
    """Bytes ``model.quantize`` saves on the base (the blocks' linear weights, dense minus quantized, from
    their shapes) and how many of those layers cannot be blocked; (0, 0) for none."""
    method = recipe.model.quantize
    if method == "none":
        return 0, 0
    from lorakit.quantization import quantizable, quantized_size
    from lorakit.quantization.walk import dense_weight

    saving = unquantized = 0
    keep = tuple(recipe.lora.modules_to_save or ())
    for name, module in model.named_modules():
        if not quantizable(name, module, keep):
            continue
        w = dense_weight(module)
        size = quantized_size(method, tuple(w.shape))
        if size is None:
            unquantized += 1
        else:
            saving += w.numel() * w.element_size() - size
    return saving, unquantized


def format_bytes(n: int) -> str:
    """Bytes in binary units: ``3.4 MiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_count(n: int) -> str:
    """A parameter count in full and in millions or billions: ``294,912 (0.29M)``."""
    short = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
    return f"{n:,} ({short})"


def _table(title: str) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    # Long module patterns have no spaces to wrap at; fold them rather than cut them off.
    table.add_column(overflow="fold")
    return table


def render(report: InfoReport) -> Group:
    """The report as rich tables: the model and adapter, then the memory estimate."""
    summary = _table(f"lorakit info: {report.source}")

    def row(label: str, value: str) -> None:
        # Text, not markup: "c_attn[q,v]" or a path with brackets would otherwise read as style tags.
        summary.add_row(label, Text(value))

    row("model", f"{report.name_or_path} ({report.model_type}, {report.dtype})")
    if report.quantized_base_bytes is not None:
        dense = f"; {report.unquantized_layers} block layers stay dense" if report.unquantized_layers else ""
        row(
            "base weights",
            f"{format_bytes(report.quantized_base_bytes)} {report.quantize} "
            f"({format_bytes(report.base_bytes)} at {report.dtype}{dense})",
        )
    row("architecture", report.architecture)
    labels = (
        f", {report.num_labels} label{'s' if report.num_labels != 1 else ''}" if report.num_labels else ""
    )
    row("task", f"{report.task} ({report.task_kind}{labels})")
    row(
        "method",
        report.method if report.r is None else f"{report.method}, r={report.r}, alpha={report.alpha:g}",
    )
    c = report.counts
    row("parameters", format_count(c.total))
    row("trainable", f"{format_count(c.trainable)}  {c.trainable_percent:.3f}%")
    if report.method == "lora":
        row("LoRA (A, B)", format_count(c.lora))
        row("adapter size", format_bytes(report.saved_bytes))
        shown = report.targets[:MAX_TARGET_LINES]
        more = len(report.targets) - len(shown)
        row(
            f"targets ({report.num_adapted})", "\n".join(shown + ([f"… and {more} more"] if more > 0 else []))
        )
        row("trained with them", ", ".join(report.modules_to_save) or "none")
    else:
        row("checkpoint size", format_bytes(report.saved_bytes))
        if report.lora_error:
            row("LoRA", f"not estimated: {report.lora_error}")

    memory = Table(title="training memory estimate", title_justify="left")
    memory.add_column("")
    memory.add_column("LoRA", justify="right")
    memory.add_column("full fine-tuning", justify="right")
    lora, full = report.memory_lora, report.memory_full
    for label, attr in (("weights", "weights"), ("gradients", "gradients"), ("AdamW states", "optimizer")):
        memory.add_row(
            label, format_bytes(getattr(lora, attr)) if lora else "-", format_bytes(getattr(full, attr))
        )
    memory.add_row(
        Text("total", style="bold"), format_bytes(lora.total) if lora else "-", format_bytes(full.total)
    )
    return Group(summary, memory, Text(ACTIVATIONS_NOTE, style="dim"))


def print_report(report: InfoReport, console: Console | None = None) -> None:
    """Print ``render(report)`` to ``console`` (stdout by default)."""
    (console or Console()).print(render(report))
