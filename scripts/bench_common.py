"""What the benchmark sections share: the models they build, the three contenders (lorakit LoRA, PEFT
LoRA, full fine-tuning), interleaved timing, round-by-round statistics, peak memory, the environment record.

Timing rule for every section: contenders run interleaved, in rounds whose orders balance who runs
first and who runs after whom (``round_orders``), and each figure is a median, so a burst of load from
another process on the machine falls on all of them alike; ratios are taken only between figures from
the same run.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402  (after the environment above)
from torch import nn  # noqa: E402

from lorakit.paper_models import DECODERS, MODELS, paper_model  # noqa: E402

CONTENDERS = ("lorakit", "peft", "full")
# lorakit LoRA on a base whose block linears are stored quantized (``model.quantize``, issue 27).
QUANTIZED = {"lorakit-nf4": "nf4", "lorakit-int8": "int8"}
THREADS = 2  # the CPU budget the benchmarks are specified for; bench.py --threads changes it


@dataclass(frozen=True)
class ModelShape:
    """A paper model (or a later family's shape: ``lorakit.paper_models.MODELS``) built from its config
    with random weights, optionally narrowed (``overrides``): no download, the same weights for every
    contender."""

    name: str
    paper: str  # the lorakit.paper_models.MODELS entry it derives from
    overrides: Mapping[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> str:
        return MODELS[self.paper][0]

    @property
    def config(self) -> dict[str, Any]:
        return {**MODELS[self.paper][1], **self.overrides}

    @property
    def decoder(self) -> bool:
        """A causal LM trained on next tokens (GPT-2, Llama), not a sequence classifier."""
        return self.family in DECODERS

    @property
    def heads(self) -> tuple[str, ...]:
        return () if self.decoder else ("classifier",)

    # GPT-2's q|k|v live in one Conv1D, c_attn (d → 3d). lorakit adapts the q and v slices with a rank-r
    # pair each: 2·r·(d + d) parameters a layer. PEFT can only adapt c_attn whole; with the same r that is
    # r·(d + 3d): exactly the same count, so PEFT gets r unchanged. Elsewhere both adapt the paper's W_q
    # and W_v as lorakit's preset for the family names them: RoBERTa's query and value, Llama's q_proj and
    # v_proj.
    @property
    def lorakit_targets(self) -> list[str]:
        return list(_TARGETS.get(self.family, ("query", "value")))

    @property
    def peft_targets(self) -> list[str]:
        return ["c_attn"] if self.family == "gpt2" else self.lorakit_targets


_TARGETS = {"gpt2": ("c_attn[q,v]",), "llama": ("q_proj", "v_proj")}  # else query and value
_LABELS = {"num_labels": 2}
_SMALL = dict(
    vocab_size=8000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024
)
# The paper's shapes, and the bench-only stand-ins (--quick and the tests): the same architectures, narrow.
SHAPES = {
    s.name: s
    for s in (
        ModelShape("roberta-base", "roberta-base", _LABELS),
        ModelShape("gpt2-medium", "gpt2-medium"),
        ModelShape("llama-350m", "llama-350m"),
        ModelShape("roberta-small", "roberta-base", {**_LABELS, **_SMALL}),
        ModelShape("gpt2-small4", "gpt2-medium", dict(n_embd=256, n_layer=4, n_head=4, vocab_size=8000)),
        ModelShape(
            "llama-small4", "llama-350m", {**_SMALL, "num_key_value_heads": 2, "intermediate_size": 704}
        ),
        ModelShape(
            "llama-tiny",
            "llama-350m",
            dict(
                vocab_size=500,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=88,
            ),
        ),
        ModelShape(
            "roberta-tiny",
            "roberta-base",
            {
                **_SMALL,
                **_LABELS,
                "vocab_size": 500,
                "hidden_size": 32,
                "num_hidden_layers": 2,
                "intermediate_size": 64,
                "max_position_embeddings": 80,
            },
        ),
    )
}


def setup_torch(threads: int | None = None) -> torch.device:
    """Pin the thread count (default ``THREADS``) and return the device the benchmarks run on (CUDA when
    present)."""
    torch.set_num_threads(threads or THREADS)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_base(shape: ModelShape, seed: int = 0) -> nn.Module:
    """The model with random weights from ``seed``: every contender starts from the same weights."""
    torch.manual_seed(seed)
    return paper_model(shape.paper, **shape.overrides)


def apply_contender(model: nn.Module, shape: ModelShape, contender: str, r: int, alpha: float) -> nn.Module:
    """``model`` ready to train as ``contender``: lorakit LoRA, PEFT LoRA (same targets, rank, alpha,
    A init kaiming-uniform and B = 0 as both libraries default to, no LoRA dropout), or full fine-tuning."""
    if contender == "full":
        model.requires_grad_(True)
        return model
    if contender in QUANTIZED:  # as `lorakit train` with model.quantize builds it: quantize, then inject
        from lorakit.quantization import quantize_model

        quantize_model(model, QUANTIZED[contender], keep=shape.heads)
        contender = "lorakit"
    if contender == "lorakit":
        from lorakit.families import fused_slices
        from lorakit.lora import LoraConfig, inject_lora, mark_trainable

        # As `lorakit train` builds it: fused layouts (GPT-2's c_attn q|k|v) from the model's config.
        slices = fused_slices(model.config)
        config = LoraConfig(r=r, alpha=alpha, target_modules=shape.lorakit_targets, fused_slices=slices)
        inject_lora(model, config)
        mark_trainable(model, "none", shape.heads)
        return model
    if contender == "peft":
        import peft

        config = peft.LoraConfig(
            r=r,
            lora_alpha=alpha,
            lora_dropout=0.0,
            target_modules=shape.peft_targets,
            modules_to_save=list(shape.heads) or None,
            fan_in_fan_out=shape.family == "gpt2",
        )
        return peft.get_peft_model(model, config)
    raise ValueError(f"unknown contender {contender!r}; choose from {CONTENDERS + tuple(QUANTIZED)}")


def sync(device: torch.device) -> None:
    """Wait for queued device work, so that a wall-clock difference covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


Timing = tuple[float, float]  # (wall-clock seconds, CPU seconds of this process, all threads)


def timed(fn: Callable[[], Any], device: torch.device) -> Timing:
    """Wall-clock and process CPU seconds ``fn`` takes, device work included. CPU time does not run
    while another program holds the cores, so on a shared machine it is the steadier of the two."""
    sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - start, time.process_time() - cpu


def round_orders(names: Sequence[str], reps: int) -> list[list[str]]:
    """``reps`` rounds over ``names``, in the orders of a Williams design: every name runs first, and
    right after every other name, equally often over each full cycle of rows (n rows for an even count,
    2n for an odd one). Plain rotations (A B C, B C A, ...) keep each name's cyclic neighbour, so a
    contender that leaves the caches or the allocator in a worse state would always slow the same
    successor; here that cost spreads over all of them."""
    n = len(names)
    first, low, high = [0], 1, n - 1
    while len(first) < n:  # 0, 1, n-1, 2, n-2, ...
        first.append(low)
        low += 1
        if len(first) < n:
            first.append(high)
            high -= 1
    rows = [[(k + i) % n for k in first] for i in range(n)]
    if n % 2:
        rows += [row[::-1] for row in rows]
    return [[names[k] for k in rows[i % len(rows)]] for i in range(reps)]


def interleave(runs: Mapping[str, Callable[[], Timing]], reps: int) -> dict[str, list[Timing]]:
    """Call every ``runs[name]()`` ``reps`` times, interleaved; their timings by name."""
    times: dict[str, list[Timing]] = {name: [] for name in runs}
    for order in round_orders(list(runs), reps):
        for name in order:
            times[name].append(runs[name]())
    return times


def _median_ci(values: Any) -> tuple[float, list[float]]:
    """The median of ``values`` (a numpy array) and a bootstrap 95% interval for it."""
    import numpy as np

    draws = np.random.default_rng(0).integers(0, len(values), size=(2000, len(values)))
    low, high = np.percentile(np.median(values[draws], axis=1), [2.5, 97.5])
    return float(np.median(values)), [float(low), float(high)]


def ratio_stats(num: Sequence[Timing], den: Sequence[Timing]) -> dict[str, Any]:
    """``num`` over ``den`` taken round by round (``num[i]`` and ``den[i]`` ran close together): the median
    of the wall-clock ratios with a bootstrap 95% interval, the median CPU-time ratio, and the ratios.
    A drift in the machine's speed lasting longer than a round falls on both sides of its ratio, so
    this is far steadier than a ratio of two medians taken over minutes."""
    import numpy as np

    wall = np.array([x[0] / y[0] for x, y in zip(num, den, strict=True)])
    cpu = np.array([x[1] / y[1] for x, y in zip(num, den, strict=True)])
    median, ci = _median_ci(wall)
    return {
        "ratio_median": median,
        "ratio_ci95": ci,
        "cpu_ratio_median": float(np.median(cpu)),
        "ratios": wall.tolist(),
    }


def difference_stats(num: Sequence[Timing], den: Sequence[Timing]) -> dict[str, Any]:
    """``num`` minus ``den`` in wall-clock seconds, round by round as ``ratio_stats``: the median
    difference with a bootstrap 95% interval, and the differences."""
    import numpy as np

    diff = np.array([x[0] - y[0] for x, y in zip(num, den, strict=True)])
    median, ci = _median_ci(diff)
    return {"median_s": median, "ci95_s": ci, "differences_s": diff.tolist()}


def summarize(timings: Sequence[Timing]) -> dict[str, Any]:
    """Median and spread of wall-clock times, and the median CPU time."""
    wall = [t[0] for t in timings]
    return {
        "median_s": statistics.median(wall),
        "min_s": min(wall),
        "max_s": max(wall),
        "cpu_median_s": statistics.median(t[1] for t in timings),
        "reps": len(wall),
        "times_s": wall,
        "cpu_times_s": [t[1] for t in timings],
    }


def peak_rss_bytes() -> int:
    """This process's peak resident set size. VmHWM belongs to this process's own address space, so it
    is not inflated by the parent a spawned worker was forked from, as ru_maxrss can be."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def reset_peak_rss() -> None:
    """Give freed memory back and restart this process's VmHWM from its current RSS (Linux), so that a
    later ``peak_rss_bytes`` is the peak from here on."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def current_rss_bytes() -> int:
    """This process's resident set size now (0 where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def environment(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on."""
    import peft
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({cpu})",
        "device_type": device.type,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def read_json(path: Path) -> Any:
    """The JSON in ``path``, or None when it does not exist."""
    return json.loads(path.read_text()) if path.is_file() else None


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    """A temporary directory for the runs, holding the latest-run pointer too while they last
    (``LORAKIT_HOME``), so that the user's own ``lorakit eval`` default is untouched."""
    home = os.environ.get("LORAKIT_HOME")
    with tempfile.TemporaryDirectory(prefix="lorakit-bench-") as tmp:
        os.environ["LORAKIT_HOME"] = tmp
        try:
            yield Path(tmp)
        finally:
            if home is None:
                os.environ.pop("LORAKIT_HOME", None)
            else:
                os.environ["LORAKIT_HOME"] = home
