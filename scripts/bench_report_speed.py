"""RESULTS.md's speed sections: the training step, lorakit against PEFT in pairs, one adapted layer, and
inference latency; and the speed targets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench_format import INFER_NAMES, NAMES, count, header, mib, ms, plot_bars, round_ratio


def speed_section(data: dict[str, Any], out: Path) -> list[str]:
    """The training-step table and plots, then the paired and per-layer tables."""
    lines = header("Training step: forward, backward, AdamW step", data)
    lines += [
        "| model | batch × seq | contender | trainable params | median step (min) | CPU time | peak memory | "
        "vs PEFT | vs full | memory vs full |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    models = data["result"]["models"]
    names = list(models[0]["contenders"]) if models else []
    groups, times, mems = [], {n: [] for n in names}, {n: [] for n in names}
    for m in models:
        groups.append(m["model"])
        c = m["contenders"]
        for name, x in c.items():
            vs = " | ".join(round_ratio(x, c[other]) for other in ("peft", "full"))
            lines.append(
                f"| {m['model']} | {m['batch']} × {m['seq']} | {NAMES[name]} | {count(x['trainable'])} | "
                f"{x['median_s']:.2f} s ({x['min_s']:.2f}) | {x['cpu_median_s']:.2f} s | "
                f"{mib(x['peak_memory_bytes'])} | {vs} | "
                f"{x['peak_memory_bytes'] / c['full']['peak_memory_bytes']:.2f} |"
            )
            times[name].append(x["median_s"])
            mems[name].append(x["peak_memory_bytes"] / 2**30)
    kind = models[0]["memory_kind"] if models else ""
    reps = models[0]["contenders"]["lorakit"]["reps"] if models else 0
    full_reps = models[0]["contenders"]["full"]["reps"] if models else 0
    lines += [
        "",
        f"Median (and minimum) wall-clock time of {reps} rounds after one small untimed warm-up step, each "
        "contender in its own process; a round runs one step of each contender, in orders that balance "
        "who runs first and after whom"
        + (
            f"; full fine-tuning runs in the first {full_reps} only (its step is the longest, and LoRA's "
            "margin to the 0.75 target is wide)"
            if full_reps < reps
            else ""
        )
        + ". "
        "Ratios: the median over rounds of the ratio within a round, wall clock, then (in brackets) the "
        "process's CPU time; the ratio of two medians taken minutes apart on this shared machine moves by "
        "more than the differences measured. Every contender trains with lorakit's `build_optimizer`: "
        "torch's fused AdamW, the Hugging Face Trainer's default, so full fine-tuning is at its fastest. "
        "GPT-2: lorakit adapts the q and v slices of `c_attn` (rank r each); PEFT adapts `c_attn` whole "
        "with the same r, which has exactly the same parameter count (r · (1024 + 3072) = "
        "2 · r · (1024 + 1024)); on the CPU it runs 4 × 128 rather than 16 × 128, to keep `make bench` "
        "within its time budget (16 × 128 "
        "on a GPU). Peak memory: "
        + (
            "`torch.cuda.max_memory_allocated`."
            if kind != "peak_rss"
            else "the worker process's peak resident set size (VmHWM), which includes about 0.5 GiB of "
            "Python, torch and transformers, and the model's construction."
        ),
        "",
    ]
    plot_bars(
        out / "train_step.png",
        "Training step time (median)",
        groups,
        {NAMES[n]: v for n, v in times.items()},
        "seconds",
    )
    plot_bars(
        out / "train_memory.png",
        "Peak training memory",
        groups,
        {NAMES[n]: v for n, v in mems.items()},
        "GiB",
    )
    lines += ["![training step time](train_step.png) ![peak training memory](train_memory.png)", ""]
    lines += _paired(data["result"].get("paired", []))
    lines += _layers(data["result"].get("layers", []))
    return lines


def _paired(runs: list[dict[str, Any]]) -> list[str]:
    if not runs:
        return []
    lines = [
        "### lorakit against PEFT, in pairs",
        "",
        "| model | batch × seq | pairs | lorakit step (median) | PEFT step (median) | lorakit / PEFT: median "
        "of pair ratios [95% interval] | CPU time |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for p in runs:
        low, high = p["ratio_ci95"]
        lines.append(
            f"| {p['model']} | {p['batch']} × {p['seq']} | {p['pairs']} | {p['first']['median_s']:.2f} s | "
            f"{p['second']['median_s']:.2f} s | **{p['ratio_median']:.3f}** [{low:.3f}, {high:.3f}] | "
            f"{p['cpu_ratio_median']:.3f} |"
        )
    lines += [
        "",
        "Both LoRA models in one process, from the same weights; each pair is one lorakit step and one "
        "PEFT step back to back, the order alternating. The speed of this shared machine's cores drifts by "
        "tens of percent over seconds (and so do medians taken minutes apart), but within a pair both "
        "steps see about the same machine: the median of the pairs' ratios is the lorakit-against-PEFT "
        "figure the targets use. The interval is a bootstrap over the pairs.",
        "",
    ]
    return lines


def _layers(runs: list[dict[str, Any]]) -> list[str]:
    """One adapted layer's table: forward and backward (training) or forward (inference) runs."""
    if not runs:
        return []
    train = runs[0]["mode"] == "forward+backward"
    title = "One adapted layer, forward and backward" if train else "One adapted layer, inference forward"
    merged_col = " merged / bare [95%] |" if not train else ""
    lines = [
        f"### {title}",
        "",
        "| model | module | tokens | bare layer | lorakit LoRA | PEFT LoRA | lorakit overhead | "
        "PEFT overhead | overhead, lorakit / PEFT | lorakit − PEFT per round [95% interval] |" + merged_col,
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if not train else ""),
    ]
    for m in runs:
        c, rounds = m["contenders"], m["rounds"]
        ratio = m["overhead_lorakit_over_peft"]
        diff = rounds["lorakit_minus_peft"]
        low, high = diff["ci95_s"]
        lines.append(
            f"| {m['model']} | {_cell(m['module'])} | {m['tokens']:,} | {ms(c['base']['median_s'])} | "
            f"{ms(c['lorakit']['median_s'])} | {ms(c['peft']['median_s'])} | "
            f"{ms(rounds['lorakit_overhead']['median_s'])} | {ms(rounds['peft_overhead']['median_s'])} | "
            f"{'—' if ratio is None else f'{ratio:.2f}'} | "
            f"{ms(diff['median_s'])} [{ms(low)}, {ms(high)}] |"
            + (f" {_ratio_cell(rounds['merged_over_base'])} |" if not train else "")
        )
    reps = runs[0]["contenders"]["base"]["reps"]
    what = (
        "forward + backward passes, frozen base (dL/dx only, as inside a LoRA model)"
        if train
        else "timed units under `torch.inference_mode`, a unit repeating the forward pass until about "
        "512 tokens have passed (the table's times are per unit)"
    )
    lines += [
        "",
        f"The first attention block's adapted projection at the model's width: {reps} interleaved rounds "
        f"of {what}, r = 8, non-zero B. An overhead is the median over rounds of the LoRA layer's time "
        "minus the bare layer's in the same round: the part of a pass that the LoRA implementation "
        "decides, and all that differs between the whole models compared above"
        + ("" if train else "; merged: lorakit's layer after `unload_lora`, the bare module type again")
        + ". A layer runs for "
        "milliseconds, far shorter than the seconds over which this machine's speed drifts, so its "
        "rounds resolve differences that whole passes cannot.",
        "",
    ]
    return lines


def inference_section(data: dict[str, Any], out: Path) -> list[str]:
    """The inference-latency table and plot."""
    r = data["result"]
    lines = header(f"Inference latency: {r['model']}, seq {r['seq']}, r = {r['r']}", data)
    lines += [
        "| batch | " + " | ".join(INFER_NAMES.values()) + " | lorakit unmerged / PEFT unmerged [95%] |",
        "|---|" + "---:|" * (len(INFER_NAMES) + 1),
    ]
    series: dict[str, list[float]] = {v: [] for v in INFER_NAMES.values()}
    for rows, stats in r["batches"].items():
        cells = []
        for key, label in INFER_NAMES.items():
            s = stats[key]
            rr = s["round_ratio_to_base"]
            cells.append(f"{ms(s['median_s'])}: {rr['ratio_median']:.3f}× ({rr['cpu_ratio_median']:.3f}×)")
            series[label].append(rr["ratio_median"])
        reps = stats["base"]["reps"]
        vs_peft = stats["lorakit_unmerged"]["round_ratio_to_peft"]
        cells.append(_ratio_cell(vs_peft))
        lines.append(f"| {rows} ({reps} reps) | " + " | ".join(cells) + " |")
    diffs = r["max_abs_diff_vs_lorakit_unmerged"]
    lines += [
        "",
        "Median latency, then the median over rounds of the ratio to the base model's pass in the same "
        "round, wall clock (CPU time in brackets); a round runs each model once, in orders that balance "
        "who runs first and after whom. Eval "
        "mode, `torch.inference_mode`, after one untimed pass each. Without autograd, lorakit's unmerged "
        "layers fold BA into a transient weight when a call carries more tokens than the weight has rows "
        "(here: batch 32, not batch 1; `lorakit.lora.low_rank.folding_is_cheaper`), so the update costs "
        "one small GEMM per layer there, and the model itself stays unmerged. "
        "The adapter is non-zero; max |Δ logits| against lorakit unmerged: "
        + ", ".join(f"{INFER_NAMES[k]} {v:.1e}" for k, v in diffs.items() if k != "lorakit_unmerged")
        + " (the base model differs by the adapter's effect).",
        "",
    ]
    plot_bars(
        out / "inference.png",
        "Inference latency relative to the base model",
        [f"batch {b}" for b in r["batches"]],
        series,
        "× base",
    )
    lines += ["![inference latency](inference.png)", ""]
    lines += _layers(r.get("layers", []))
    return lines


def _cell(text: str) -> str:
    """``text`` safe inside a Markdown table cell."""
    return text.replace("|", "\\|")


def _overhead(layer: dict[str, Any]) -> tuple[str, bool]:
    """One adapted layer's LoRA overheads as text, and whether lorakit's is no more than PEFT's."""
    rounds = layer["rounds"]
    ours, theirs = rounds["lorakit_overhead"]["median_s"], rounds["peft_overhead"]["median_s"]
    diff = rounds["lorakit_minus_peft"]
    low, high = diff["ci95_s"]
    text = (
        f"{_cell(layer['module'])} overhead {ms(ours)} vs PEFT's {ms(theirs)}, lorakit − PEFT "
        f"{ms(diff['median_s'])} [{ms(low)}, {ms(high)}]"
    )
    return text, ours <= theirs


def _ratio_cell(stats: dict[str, Any]) -> str:
    low, high = stats["ratio_ci95"]
    return f"{stats['ratio_median']:.3f} [{low:.3f}, {high:.3f}]"


def speed_targets(speed: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """The speed and memory targets as (target, measured, met) rows. lorakit against PEFT: the in-process
    pairs where the run has them, else the per-process rounds, with the adapted layer's overhead (the
    only part of the step where the two differ) beside them; met when that overhead is no more than
    PEFT's and the step's interval does not lie above 1.0."""
    rows = []
    result = speed["result"]
    paired = {p["model"]: p for p in result.get("paired", [])}
    layers = {m["model"]: m for m in result.get("layers", [])}
    for m in result["models"]:
        name, rounds = m["model"], m["round_ratios"]
        vs_peft, how = (
            (paired[name], "in pairs") if name in paired else (rounds["lorakit_over_peft"], "rounds")
        )
        measured = f"step {how} {_ratio_cell(vs_peft)}"
        met = vs_peft["ratio_ci95"][0] <= 1.0
        if name in layers:
            text, ok = _overhead(layers[name])
            measured += f"; {text}"
            met = met and ok
        else:
            met = met and vs_peft["ratio_median"] <= 1.0
        rows.append((f"{name}: lorakit step no slower than PEFT's (aim 0.90)", measured, met))
        vs_full = rounds["lorakit_over_full"]
        rows.append(
            (
                f"{name}: lorakit step ≤ 0.75 × full, rounds",
                _ratio_cell(vs_full),
                vs_full["ratio_median"] <= 0.75,
            )
        )
        memory = m["ratios"]["memory_lorakit_over_full"]
        rows.append((f"{name}: LoRA peak memory clearly below full's", f"{memory:.2f}", memory <= 0.9))
    return rows


def inference_targets(inference: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """Per batch size, merged latency against the base model's and unmerged overhead against PEFT's,
    each where it arises: in the adapted layers (per-round ratios and overheads), with the whole model's
    figure beside it, whose interval must not lie above the bound."""
    rows = []
    result = inference["result"]
    layers = {(m["model"], m["tokens"]): m for m in result.get("layers", [])}
    for batch, s in result["batches"].items():
        merged = s["lorakit_merged"]["round_ratio_to_base"]
        layer = layers.get((result["model"], int(batch) * result["seq"]))
        same = result.get("merged_structure_is_base")
        if layer is not None and "merged_over_base" in layer["rounds"] and same is not None:
            merged_layer = layer["rounds"]["merged_over_base"]
            rows.append(
                (
                    f"batch {batch}: merged within 2% of the base model",
                    f"the base model's modules, shapes and dtypes: {'yes' if same else 'no'}; adapted "
                    f"layer merged / bare {_ratio_cell(merged_layer)}; whole model {_ratio_cell(merged)}",
                    same and merged_layer["ratio_ci95"][0] <= 1.02 and merged["ratio_ci95"][0] <= 1.02,
                )
            )
        else:
            rows.append(
                (
                    f"batch {batch}: merged within 2% of the base model",
                    _ratio_cell(merged),
                    merged["ratio_median"] <= 1.02,
                )
            )
        vs_peft = s["lorakit_unmerged"]["round_ratio_to_peft"]
        measured = f"whole model, lorakit / PEFT {_ratio_cell(vs_peft)}"
        met = vs_peft["ratio_ci95"][0] <= 1.0
        if layer is not None:
            text, ok = _overhead(layer)
            measured = f"{text}; {measured}"
            met = met and ok
        else:
            met = met and vs_peft["ratio_median"] <= 1.0
        rows.append((f"batch {batch}: unmerged overhead ≤ PEFT's", measured, met))
    for m in result.get("layers", []):
        if m["model"] == result["model"]:
            continue  # reported with its batch above
        text, ok = _overhead(m)
        rows.append((f"{m['model']}, {m['tokens']:,} tokens: inference overhead ≤ PEFT's", text, ok))
    return rows
