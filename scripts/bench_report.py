"""RESULTS.md and its plots, rendered from the section JSON files a benchmark run leaves in a directory.
Every number in the page is read from those files; the prose is the fixed text below."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench_adapters import adapter_targets
from bench_adapters import render as render_adapters
from bench_common import read_json
from bench_format import NAMES, bars, ci, header, mib, ms, table
from bench_generation_serve import render as render_generation
from bench_llama import llama_targets
from bench_llama import render as render_llama
from bench_overload import render as render_overload
from bench_quality_render import render as render_quality
from bench_quality_render import targets as quality_targets
from bench_quant import quant_targets
from bench_quant import render as render_quant
from bench_serve import render as render_serve
from bench_serve import serve_targets
from bench_whole_run import render as render_whole_run
from bench_whole_run import whole_run_targets
from own_data import render as render_own_data

METHOD = """\
lorakit's LoRA against PEFT's LoRA (same targets, rank, alpha, head) and against full fine-tuning, measured
by `scripts/bench.py` (`make bench`; `make bench-quick` writes `benchmarks/quick/`, small models, not the
headline figures). Speed and memory use models of the paper's shapes with random weights
(`lorakit.paper_models`); every contender trains with torch's fused AdamW. Contenders run interleaved, in
rounds whose orders balance who runs first and after whom, and a ratio (or difference) is taken within each
round, then the median over rounds; the bootstrap 95% interval over rounds is in brackets. Training steps
run in one process per contender, so that each peak memory (peak RSS on the CPU) is its own. "One adapted
layer" times the first attention block's adapted projection alone, where the two LoRA implementations
differ. "Many adapters" loads 16 adapters onto one model (lorakit by name, PEFT with `load_adapter`) and
times mixed-task batches against one adapter, PEFT's `adapter_names=` batch and one merged model per task.
"Serving" load-tests `lorakit serve` processes over loopback (scripts/bench_serve.py says how).
Quality (scripts/bench_quality.py, `make bench-quality`, its own resumable run) fine-tunes the real
pretrained MiniLM-L6 (BERT) on five GLUE tasks at full training budgets: lorakit LoRA and full fine-tuning
through `lorakit sweep`, PEFT through the Hugging Face Trainer on the same rows, tokenization, batch,
epochs, schedule, warmup, weight decay, clipping and head modules. The machine is a
shared 2-core CPU: absolute times are noisy, ratios within a round less so; each section's line gives its
date and the load average at its start."""

RULES = """\
## Rules

A ratio target is met when its median is within the bound; the bootstrap 95% interval is reported beside
it. A difference target is met when its median is within the bound. The quality targets compare each
contender's score (the median over its seeds of the final dev metric), averaged over the five tasks; their
rules are stated in the quality section. A target not met says **no**."""

INFER = {"base": "base", "lorakit_unmerged": "lorakit unmerged", "lorakit_merged": "lorakit merged"}
INFER |= {"peft_unmerged": "PEFT unmerged"}


def targets(
    sections: dict[str, Any],
    overload: dict[str, Any] | None = None,
    generation: dict[str, Any] | None = None,
    quality: dict[str, Any] | None = None,
) -> list[tuple[str, str, bool]]:
    """Every target as (target, measured, met); ``overload`` and ``generation``: the results of
    scripts/bench_overload.py and scripts/bench_generation_serve.py, which run on their own."""
    rows: list[tuple[str, str, bool]] = []
    layers = []
    if "speed" in sections:
        result = sections["speed"]["result"]
        for m in result["models"]:
            where = f"{m['model']} {m['batch']}×{m['seq']}"
            rounds = m["round_ratios"]
            peft, full = rounds["lorakit_over_peft"], rounds["lorakit_over_full"]
            rows.append((f"{where}: LoRA step ≤ 1.00× PEFT's", ci(peft), peft["ratio_median"] <= 1.0))
            rows.append((f"{where}: LoRA step ≤ 0.75× full's", ci(full), full["ratio_median"] <= 0.75))
            memory = m["ratios"]["memory_lorakit_over_full"]
            rows.append((f"{where}: LoRA peak memory ≤ 0.80× full's", f"{memory:.3f}", memory <= 0.80))
        layers += result.get("layers", [])
    if "speed-bf16" in sections:  # the bounds of issue 16, fixed before the first bf16 run
        for m in sections["speed-bf16"]["result"]["models"]:
            where = f"{m['model']} {m['batch']}×{m['seq']} bf16"
            rounds = m["round_ratios"]
            peft, full = rounds["lorakit_over_peft"], rounds["lorakit_over_full"]
            rows.append((f"{where}: LoRA step ≤ 0.95× PEFT's", ci(peft), peft["ratio_median"] <= 0.95))
            rows.append((f"{where}: LoRA step ≤ 0.70× full's", ci(full), full["ratio_median"] <= 0.70))
    if "speed-llama" in sections:  # the bounds of issue 24, fixed before the first Llama run
        for m in sections["speed-llama"]["result"]["models"]:
            rows += llama_targets(m)
    # bf16 inference keeps the fp32 bounds (issue 16, fixed before the first bf16 inference run).
    for key, tag in (("inference", ""), ("inference-bf16", " bf16")):
        if key not in sections:
            continue
        result = sections[key]["result"]
        for batch, s in result["batches"].items():
            where = f"{result['model']} batch {batch}×{result['seq']}{tag}"
            merged = s["lorakit_merged"]["round_ratio_to_base"]
            rows.append((f"{where}: merged ≤ 1.02× base", ci(merged), merged["ratio_median"] <= 1.02))
            peft = s["lorakit_unmerged"]["round_ratio_to_peft"]
            rows.append((f"{where}: unmerged ≤ 1.00× PEFT unmerged", ci(peft), peft["ratio_median"] <= 1.0))
        layers += result.get("layers", [])
    for m in layers:
        diff = m["rounds"]["lorakit_minus_peft"]
        name = f"{m['model']} {m['module']}, {m['tokens']:,} tokens, {m['mode']}: LoRA overhead − PEFT's ≤ 0"
        rows.append((name, ci(diff, "diff"), diff["median_s"] <= 0))
    if "adapters" in sections:
        rows += adapter_targets(sections["adapters"]["result"])
    if "serve" in sections:
        rows += serve_targets(sections["serve"]["result"])
    if "quant" in sections:
        rows += quant_targets(sections["quant"]["result"])
    if generation:
        g = generation["summary"]
        ratio = f"{g['ratio_median']:.3f} [range {g['ratio_min']:.3f}, {g['ratio_max']:.3f}]"
        rows.append(
            ("serve generation: mixed-adapter tokens/s ≥ 0.85× one adapter's", ratio, g["target_met"])
        )
    if overload:
        t = overload["targets"]
        rows += [
            (f"serve overload: {name}", ratio, t[name])
            for name, ratio in (
                ("accepted rows/s >= 0.9x unloaded", _range(overload["throughput_ratio"])),
                ("peak RSS <= 1.10x unloaded", _range(overload["rss_ratio"])),
                ("no 5xx", ""),
            )
        ]
    if "whole-run" in sections:
        rows += whole_run_targets(sections["whole-run"]["result"])
    rows += quality_targets(quality)
    return rows


def _range(stats: dict[str, Any]) -> str:
    return f"{stats['median']:.3f} [range {stats['min']:.3f}, {stats['max']:.3f}]"


def _many_tasks(data: dict[str, Any]) -> list[str]:
    rows = [
        [t["task"], t["dev_rows"], t["metric"], f"{t['eval_alone']:.2f}", f"{t['predict_mixed']:.2f}"]
        + [
            f"max |Δ| {t['max_abs_difference']:.1e}"
            if t["same_predictions"] is None
            else t["same_predictions"]
        ]
        for t in data["tasks"]
    ]
    head = ["task", "dev rows", "metric", "`lorakit eval` alone", "one mixed `lorakit predict`", "same rows"]
    return [
        "## Many tasks on one base, for real (`python scripts/many_tasks.py`)",
        "",
        *table(head, rows),
    ] + [
        "The real MiniLM-L6 with adapters trained by `lorakit train` (configs/minilm-sst2.yaml with each "
        f"task's rows and swept learning rate); one `lorakit predict` over all {data['rows']:,} dev rows, "
        f"shuffled together, took {data['seconds']['predict (mixed)']:.0f} s as a whole process.",
        "",
    ]


def _speed(data: dict[str, Any], out: Path, precision: str = "fp32") -> list[str]:
    bf16 = precision == "bf16"
    title = "Training step under bf16 autocast (float32 weights)" if bf16 else "Training step"
    lines = header(f"{title}: forward, backward, AdamW step", data)
    rows, groups, series = [], [], {n: [] for n in NAMES.values()}
    for m in data["result"]["models"]:
        groups.append(f"{m['model']} {m['batch']}×{m['seq']}")
        for name, c in m["contenders"].items():
            rows.append(
                [groups[-1], NAMES[name], f"{c['trainable']:,}", f"{c['median_s']:.2f} s", c["reps"]]
                + [mib(c["peak_memory_bytes"])]
            )
            series[NAMES[name]].append(c["median_s"])
    lines += table(["model", "contender", "trainable", "median step", "rounds", "peak memory"], rows)
    png = "train_step_bf16.png" if bf16 else "train_step.png"
    bars(out / png, f"{title} (median)", groups, series, "seconds")
    return lines + [f"![{title.lower()}]({png})", ""]


def _inference(data: dict[str, Any], out: Path) -> list[str]:
    r = data["result"]
    bf16 = r.get("precision") == "bf16"
    title = "Inference latency under bf16 autocast" if bf16 else "Inference latency"
    png = "inference_bf16.png" if bf16 else "inference.png"
    lines = header(f"{title}: {r['model']}, seq {r['seq']}, r = {r['r']}", data)
    rows, series = [], {label: [] for label in INFER.values()}
    for batch, stats in r["batches"].items():
        cells = [batch, stats["base"]["reps"]]
        for key, label in INFER.items():
            ratio = stats[key]["round_ratio_to_base"]["ratio_median"]
            cells.append(f"{ms(stats[key]['median_s'])} ({ratio:.3f}×)")
            series[label].append(ratio)
        rows.append(cells)
    lines += table(["batch", "rounds", *(f"{v} (× base)" for v in INFER.values())], rows)
    same = r.get("merged_structure_is_base")
    lines += [f"Merged model has exactly the base model's modules, shapes and dtypes: {same}.", ""]
    bars(out / png, f"{title} / base model", [f"batch {b}" for b in r["batches"]], series, "×")
    return lines + [f"![{title.lower()}]({png})", ""]


def _layers(sections: dict[str, Any]) -> list[str]:
    layers = [
        m for k in ("speed", "inference") if k in sections for m in sections[k]["result"].get("layers", [])
    ]
    if not layers:
        return []
    rows = []
    for m in layers:
        c, rd = m["contenders"], m["rounds"]
        rows.append(
            [
                m["model"],
                m["module"],
                m["mode"],
                f"{m['tokens']:,}",
                c["base"]["reps"],
                ms(c["base"]["median_s"]),
            ]
            + [ms(rd["lorakit_overhead"]["median_s"]), ms(rd["peft_overhead"]["median_s"])]
            + [ci(rd["lorakit_minus_peft"], "diff")]
        )
    head = ["model", "module", "mode", "tokens", "rounds", "bare layer", "lorakit overhead", "PEFT overhead"]
    return ["## One adapted layer", ""] + table([*head, "lorakit − PEFT [95%]"], rows)


def _sizes(data: dict[str, Any]) -> list[str]:
    lines = header("Adapter size against model size", data)
    rows = [
        [
            m["model"],
            m["r"],
            f"{m['lora_params']:,}",
            m["paper_lora_params"],
            mib(m["adapter_bytes_lora_only"]),
        ]
        + [mib(m["adapter_bytes_with_head"]), mib(m["model_bytes_fp32"])]
        + [f"{100 * m['lora_only_fraction_of_model']:.2f}%"]
        for m in data["result"]["models"]
    ]
    head = [
        "model",
        "r",
        "LoRA params",
        "paper",
        "adapter file",
        "with head",
        "model (fp32)",
        "adapter / model",
    ]
    return lines + table(head, rows)


def render(out: Path) -> Path:
    """Write ``out/RESULTS.md`` (and PNGs) from the section JSON files in ``out``; returns its path."""
    names = ("sizes", "speed", "speed-bf16", "speed-llama", "inference", "inference-bf16", "adapters")
    names += ("serve", "quant", "whole-run")
    sections = {n: d for n in names if (d := read_json(out / f"{n}.json"))}
    quick = any(d.get("quick") for d in sections.values())
    lines = ["# lorakit benchmarks", "", METHOD + (" **Quick run.**" if quick else ""), ""]
    measured = [sections[n] for n in names if n in sections]
    if measured:
        took = " + ".join(f"{d['section']} {d['seconds']:.0f} s" for d in measured)
        lines += [f"This run: {took} = {sum(d['seconds'] for d in measured) / 60:.1f} minutes.", ""]
    lines += [RULES, ""]
    quality = read_json(out / "quality.json")  # scripts/bench_quality.py, its own resumable run
    rows = targets(
        sections, read_json(out / "serve-overload.json"), read_json(out / "serve-generation.json"), quality
    )
    if rows:
        lines += ["## Targets", ""] + table(
            ["target", "measured: median [95%]", "met"],
            [[t, m, "yes" if ok else "**no**"] for t, m, ok in rows],
        )
    out.mkdir(parents=True, exist_ok=True)
    if "speed" in sections:
        lines += _speed(sections["speed"], out)
    if "speed-bf16" in sections:
        lines += _speed(sections["speed-bf16"], out, "bf16")
    if "speed-llama" in sections:
        lines += render_llama(sections["speed-llama"])
    for key in ("inference", "inference-bf16"):
        if key in sections:
            lines += _inference(sections[key], out)
    lines += _layers(sections)
    if "sizes" in sections:
        lines += _sizes(sections["sizes"])
    if "adapters" in sections:
        lines += render_adapters(sections["adapters"])
    if "serve" in sections:
        lines += render_serve(sections["serve"])
    if overload := read_json(out / "serve-overload.json"):  # scripts/bench_overload.py, its own run
        lines += render_overload(overload)
    if generation := read_json(out / "serve-generation.json"):  # scripts/bench_generation_serve.py
        lines += render_generation(generation)
    if "quant" in sections:
        lines += render_quant(sections["quant"])
    if "whole-run" in sections:
        lines += render_whole_run(sections["whole-run"])
    if many := read_json(out / "many-tasks.json"):
        lines += _many_tasks(many)
    if own := read_json(out / "own-data.json"):
        lines += [render_own_data(own)]
    lines += render_quality(quality)
    path = out / "RESULTS.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path
