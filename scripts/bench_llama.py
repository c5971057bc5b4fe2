"""The modern decoder's training-step section (issue 24, ``bench.py --only speed-llama``): its targets,
fixed before the first run (lorakit's step ≤ 1.00× PEFT's, LoRA's ≤ 0.75× full fine-tuning's, medians of the
round-by-round ratios), and its part of RESULTS.md; ``bench_speed.train_step_benchmark`` measures."""

from __future__ import annotations

from typing import Any

from bench_format import NAMES, ci, header, mib, table


def llama_targets(m: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """The modern decoder's step targets: lorakit's step ≤ 1.00× PEFT's, LoRA's ≤ 0.75× full's."""
    where, rounds = f"{m['model']} {m['batch']}×{m['seq']}", m["round_ratios"]
    peft, full = rounds["lorakit_over_peft"], rounds["lorakit_over_full"]
    return [
        (f"{where}: LoRA step ≤ 1.00× PEFT's", ci(peft), peft["ratio_median"] <= 1.0),
        (f"{where}: LoRA step ≤ 0.75× full's", ci(full), full["ratio_median"] <= 0.75),
    ]


def render(data: dict[str, Any]) -> list[str]:
    r = data["result"]
    size = ", ".join(f"{m['contenders']['full']['trainable'] / 1e6:.1f}M parameters" for m in r["models"])
    lines = header(f"Training step, a modern decoder: Llama architecture, {size}", data)
    lines += [data["note"], ""] if data.get("note") else []
    rows, ratio_rows, notes = [], [], []
    for m in r["models"]:
        where = f"{m['model']} {m['batch']}×{m['seq']}"
        for name, c in m["contenders"].items():
            rows.append(
                [where, NAMES[name], f"{c['trainable']:,}", f"{c['median_s']:.2f} s", c["reps"]]
                + [mib(c["peak_memory_bytes"])]
            )
        targets = dict(zip(("lorakit_over_peft", "lorakit_over_full"), llama_targets(m), strict=True))
        for key, label in (
            ("lorakit_over_peft", "lorakit LoRA / PEFT LoRA"),
            ("lorakit_over_full", "lorakit LoRA / full fine-tuning"),
            ("peft_over_full", "PEFT LoRA / full fine-tuning"),
        ):
            stats, target = m["round_ratios"][key], targets.get(key)
            bound = target[0].rsplit(": LoRA step ", 1)[1] if target else "—"
            met = ("yes" if target[2] else "**no**") if target else "—"
            ratio_rows.append(
                [
                    where,
                    label,
                    len(stats["ratios"]),
                    ci(stats),
                    f"{stats['cpu_ratio_median']:.3f}",
                    bound,
                    met,
                ]
            )
        ratios, shape = m["ratios"], r.get("shapes", {}).get(m["model"])
        text = (
            f"{where}: peak memory lorakit / full {ratios['memory_lorakit_over_full']:.3f}, lorakit / PEFT "
            f"{ratios['memory_lorakit_over_peft']:.3f} (no target)."
        )
        if shape:
            keys = ", ".join(f"{k} {v}" for k, v in shape["config"].items())
            text += (
                f" {m['model']}: {shape['family']} ({keys}); {m['contenders']['full']['trainable']:,} "
                "parameters (full fine-tuning's trainable), random weights, a causal LM trained on next "
                f"tokens as GPT-2 medium is; LoRA r = {m['r']}, alpha = {m.get('alpha', 16.0):g} on "
                f"{', '.join(shape['lorakit_targets'])} (lorakit's preset), PEFT on "
                f"{', '.join(shape['peft_targets'])}; {m['precision']}, torch's fused AdamW for every "
                "contender."
            )
        notes += [text, ""]
    lines += table(["model", "contender", "trainable", "median step", "rounds", "peak memory"], rows)
    head = ["model", "step time, round by round", "rounds", "wall: median [95%]", "CPU time: median"]
    lines += table([*head, "target", "met"], ratio_rows) + notes
    end = r.get("load_average_end")
    load = f"Load average at the end: {end[0]:.2f} / {end[1]:.2f} / {end[2]:.2f}. " if end else ""
    return lines + [
        f"{load}Reproduce: `python scripts/bench.py{' --quick' if data.get('quick') else ''} --only "
        "speed-llama --out benchmarks`.",
        "",
    ]
