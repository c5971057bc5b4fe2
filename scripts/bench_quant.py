"""The quantized-base section of ``make bench`` (issue 27, ``model.quantize``): LoRA on an nf4 / int8 base
against LoRA on the float32 base, side by side in one run.

    python scripts/bench.py --only quant --out benchmarks      # about 10 minutes on 2 CPU cores

* Training, gpt2-medium's shape (random weights), 4 × 128, r = 8 on ``c_attn[q,v]``: the step benchmark's
  interleaved rounds (``bench_speed.train_step_benchmark``), one worker process per contender, the base
  quantized as ``lorakit train`` quantizes it (``lorakit.quantization.quantize_model``) before LoRA goes
  in. Peak memory is the worker's peak resident set size from the built model on (its VmHWM restarted
  after building, as a quantized run's dense checkpoint is read once at load, not during training).
* Serving, roberta-base's shape with 16 adapters (r = 8 on query and value, each with its own head):
  resident memory of a fresh process holding the base and the 16 adapters, over what the process held
  before the model (``bench_adapters.memory_probe``, its one-base:nf4 and one-base:int8 modes); and a
  mixed batch of 64 rows × 32 tokens over the 16 adapters, the three bases' batches interleaved round by
  round in one process.

Targets, fixed before the first run (the issue's): gpt2-medium's base weight bytes nf4 ≤ 0.30× float32;
peak training memory ≤ 0.75× LoRA on the float32 base; step time ≤ 1.5×; roberta-base with 16 adapters:
resident memory ≤ 0.55× the float32 base with the same adapters; mixed-batch time ≤ 1.5×. The step and
batch times decide by the median of the round-by-round ratios, its 95% interval beside it. int8 is held
to the same bounds, but for base bytes, which the issue bounds for nf4 alone.
The quality target (real MiniLM, SST-2 and STS-B at the quality issue's budgets, 3 seeds) is not in this
section: it needs the quality section's training budgets (issue 26).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import bench_adapters
import torch
from bench_adapters import _served, _write_adapters
from bench_common import SHAPES, build_base, interleave, ratio_stats, summarize, timed
from bench_format import ci, header, mib, table

METHODS = ("nf4", "int8")
CONTENDERS = ("lorakit", "lorakit-nf4", "lorakit-int8")
HEAD_KEEP = ("classifier",)  # the task head stays dense, as model.quantize keeps modules_to_save


def _quantized(base: torch.nn.Module, method: str) -> torch.nn.Module:
    from lorakit.quantization import quantize_model

    model = copy.deepcopy(base)
    if method != "none":
        quantize_model(model, method, keep=HEAD_KEEP)
    return model


def serving(shape: str, rows: int, seq: int, reps: int) -> dict[str, Any]:
    """Resident memory (fresh processes) and mixed-batch time (one process) of 16 adapters on each base."""
    from lorakit.lora import mixed_logits

    base = build_base(SHAPES[shape]).eval()
    with tempfile.TemporaryDirectory(prefix="lorakit-quant-") as tmp:
        dirs = _write_adapters(base, Path(tmp), 16)
        memory = {}
        for method in ("none", *METHODS):  # bench_adapters' fresh-process probe, on each base
            mode = "one-base" if method == "none" else f"one-base:{method}"
            args = [sys.executable, bench_adapters.__file__, "--memory", mode, shape, *map(str, dirs)]
            done = subprocess.run(args, capture_output=True, text=True, check=True, cwd=Path(__file__).parent)
            memory[method] = {"method": method, **json.loads(done.stdout.strip().splitlines()[-1])}
        served = {method: _served(_quantized(base, method), dirs) for method in ("none", *METHODS)}
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, base.config.vocab_size, (rows, seq), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    names = [f"a{i % 16}" for i in range(rows)]
    device = torch.device("cpu")
    with torch.inference_mode():
        runs = {
            m: (lambda m=m: timed(lambda: mixed_logits(served[m], names, **batch), device)) for m in served
        }
        for run in runs.values():
            run()  # warm-up
        times = interleave(runs, reps)
        logits = {m: mixed_logits(model, names, **batch)[0] for m, model in served.items()}
    return {
        "model": shape,
        "adapters": 16,
        "rows": rows,
        "seq": seq,
        "memory": memory,
        "times": {m: summarize(t) for m, t in times.items()},
        "time_ratios": {m: ratio_stats(times[m], times["none"]) for m in METHODS},
        "memory_ratios": {m: memory[m]["rss_bytes"] / memory["none"]["rss_bytes"] for m in METHODS},
        "max_abs_logit_diff_vs_float32": {
            m: float((logits[m] - logits["none"]).abs().max()) for m in METHODS
        },
    }


def quant_section(train: tuple, serve: tuple) -> dict[str, Any]:
    """The whole section: ``train`` = (shape, rows, seq, rounds), ``serve`` = (shape, rows, seq, rounds)."""
    import bench_speed

    shape, rows, seq, rounds = train
    steps = bench_speed.train_step_benchmark(
        shape, rows, seq, rounds, contenders=CONTENDERS, peak_from_built=True
    )
    return {"training": steps, "serving": serving(*serve)}


def quant_targets(r: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """The section's targets as (target, measured, met)."""
    t, s = r["training"], r["serving"]
    where, at = f"{t['model']} {t['batch']}×{t['seq']}", f"{s['model']}, {s['adapters']} adapters"
    rows = []
    nf4_bytes = t["base_bytes_ratios"]["lorakit-nf4_over_lorakit"]
    rows.append(
        (f"{t['model']}: nf4 base weight bytes ≤ 0.30× float32", f"{nf4_bytes:.3f}", nf4_bytes <= 0.30)
    )
    for m in METHODS:
        memory, step = (
            t["memory_ratios"][f"lorakit-{m}_over_lorakit"],
            t["round_ratios"][f"lorakit-{m}_over_lorakit"],
        )
        rows.append(
            (f"{where} {m}: peak training memory ≤ 0.75× float32 base", f"{memory:.3f}", memory <= 0.75)
        )
        rows.append((f"{where} {m}: step ≤ 1.5× float32 base", ci(step), step["ratio_median"] <= 1.5))
        resident, batch = s["memory_ratios"][m], s["time_ratios"][m]
        rows.append((f"{at} {m}: resident memory ≤ 0.55× float32 base", f"{resident:.3f}", resident <= 0.55))
        rows.append(
            (
                f"{at} {m}: mixed batch {s['rows']}×{s['seq']} ≤ 1.5× float32 base",
                ci(batch),
                batch["ratio_median"] <= 1.5,
            )
        )
    return rows


def render(data: dict[str, Any]) -> list[str]:
    """The quantized-base section of RESULTS.md."""
    r = data["result"]
    t, s = r["training"], r["serving"]
    lines = header(f"Quantized base (model.quantize): {t['model']} training, {s['model']} serving", data)
    rows = []
    for name in CONTENDERS:
        c = t["contenders"][name]
        rows.append(
            [name, mib(c["base_bytes"]), f"{c['median_s']:.2f} s", c["reps"], mib(c["peak_memory_bytes"])]
        )
    lines += table(["contender", "base weights", "median step", "rounds", "peak memory from built"], rows)
    rows = [
        [
            m,
            mib(s["memory"][m]["base_bytes"]),
            mib(s["memory"][m]["rss_bytes"]),
            f"{s['times'][m]['median_s'] * 1e3:.0f} ms",
        ]
        + (
            [ci(s["time_ratios"][m]), f"{s['max_abs_logit_diff_vs_float32'][m]:.2e}"]
            if m != "none"
            else ["1", "0"]
        )
        for m in ("none", *METHODS)
    ]
    head = [
        "base",
        "base weights",
        "resident with 16 adapters",
        "mixed batch (median)",
        "batch vs float32",
        "max |logit diff|",
    ]
    lines += table(head, rows)
    lines += [data["note"], ""] if data.get("note") else []
    return lines + [
        "Training: one worker process per contender, steps interleaved round by round; peak memory is the "
        "worker's VmHWM restarted once the model is built. Serving: resident memory of a fresh process over "
        "what it held before the model; the three bases' mixed batches interleaved in one process. The "
        "targets are in the Targets table above. "
        "Reproduce: `python scripts/bench.py --only quant --out benchmarks`.",
        "",
    ]
