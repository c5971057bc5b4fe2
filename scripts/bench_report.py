"""RESULTS.md and its plots, rendered from the section JSON files a benchmark run leaves in a directory.

Every number in the page is read from those files; nothing here measures anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench_common import read_json
from bench_format import header, mib
from bench_report_quality import quality_section, seed_scores, seeds_section, sweep_section, variants_section
from bench_report_speed import inference_section, inference_targets, speed_section, speed_targets


def _sizes(data: dict[str, Any]) -> list[str]:
    lines = header("Adapter size against model size", data)
    lines += [
        "| model | r | LoRA params | paper | adapter file (LoRA only) | with task head | model (fp32) | "
        "adapter / model |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in data["result"]["models"]:
        lines.append(
            f"| {m['model']} | {m['r']} | {m['lora_params']:,} | {m['paper_lora_params']} | "
            f"{mib(m['adapter_bytes_lora_only'])} | {mib(m['adapter_bytes_with_head'])} | "
            f"{mib(m['model_bytes_fp32'])} | {100 * m['lora_only_fraction_of_model']:.2f}% |"
        )
    lines += [
        "",
        "Query and value adapted. Built on the meta device from configs; the adapter's tensors are "
        "materialised and written by `save_adapter`, so file sizes are exact (safetensors header and "
        "adapter_config.json included). Heads: the 3-label MNLI classifier (DeBERTa: with its pooler). "
        "Model: parameters × 4 bytes. GPT-2's file holds the PEFT-equivalent rank-2r pair on `c_attn` "
        "(stacked A, block B with zero blocks for k), about twice its 393,216 trainable parameters. "
        "The paper's 0.35M for GPT-2 M is below the 24 · 2 · 4 · (1024 + 1024) = 393,216 that q and "
        "v at r = 4 give.",
        "",
    ]
    return lines


def _targets(sections: dict[str, Any]) -> list[str]:
    rows = speed_targets(sections["speed"]) if "speed" in sections else []
    if "inference" in sections:
        rows += inference_targets(sections["inference"])
    if "quality" in sections:
        for task, s in seed_scores(sections["quality"], sections.get("quality-seeds")).items():
            n = len(s["seeds"])
            seed0 = s["lorakit"][0] - s["full"][0]
            if n == 1:
                rows.append((f"{task}: LoRA within 2 points of full", f"{seed0:+.1f}", seed0 >= -2.0))
                continue
            rows.append(
                (
                    f"{task}: LoRA within 2 points of full, medians over {n} seeds",
                    f"{s['median_gap']:+.1f} (seed 0 alone: {seed0:+.1f})",
                    s["median_gap"] >= -2.0,
                )
            )
    if not rows:
        return []
    lines = [
        "## Targets",
        "",
        "Time ratios: the median over rounds (or pairs) of the ratio within one, wall clock, with a "
        "bootstrap 95% interval in brackets. A bound (≤, within) counts as met on the median. 'No "
        "slower than PEFT' and 'overhead ≤ PEFT's' look where the models differ, the adapted layers, "
        "timed round by round (see 'One adapted layer'): met when lorakit's layer overhead is no more "
        "than PEFT's and the whole step's or model's interval does not lie above 1.0. A whole pass lasts "
        "seconds, over which this machine's speed drifts by more than the few percent of it that the "
        "LoRA layers take, so its median alone could not tell a tie from a loss. Merged latency: the "
        "merged model must have exactly the base model's modules, parameter shapes and dtypes (so it "
        "runs the same kernels), and neither the merged layer's nor the whole model's interval may lie "
        "above 1.02; two identical modules timed here differ by a few percent either way from round to "
        "round, so a median alone would be a coin toss. "
        "Quality: medians over seeds where the seeds section ran (the mean per-seed gap is in its table).",
        "",
        "| target | measured | met |",
        "|---|---:|---|",
    ]
    lines += [f"| {name} | {value} | {'yes' if ok else '**no**'} |" for name, value, ok in rows]
    return lines + [""]


def render(out: Path) -> Path:
    """Write ``out/RESULTS.md`` (and PNGs) from the section JSON files in ``out``; returns its path."""
    sections = {
        n: read_json(out / f"{n}.json")
        for n in ("speed", "inference", "sizes", "quality", "quality-seeds", "lr-sweep", "lora-variants")
    }
    sections = {k: v for k, v in sections.items() if v}
    quick = any(v.get("quick") for v in sections.values())
    lines = [
        "# lorakit benchmarks",
        "",
        "lorakit's LoRA against PEFT's LoRA (same targets, rank, init) and full fine-tuning, measured in one "
        "run by `scripts/bench.py` (`make bench`; `make bench-quick` writes `benchmarks/quick/`). "
        "Contenders are interleaved and figures are medians; a time ratio is the median of ratios taken "
        "round by round, each round running every contender once. "
        "Timings come from a shared 2-core machine, so their absolute values are noisy; the ratios less so."
        + (" **Quick run: small models and subsets; not the headline figures.**" if quick else ""),
        "",
    ]
    lines += _targets(sections)
    if "speed" in sections:
        lines += speed_section(sections["speed"], out)
    if "inference" in sections:
        lines += inference_section(sections["inference"], out)
    if "sizes" in sections:
        lines += _sizes(sections["sizes"])
    if "quality" in sections:
        lines += quality_section(sections["quality"], out)
    if "quality-seeds" in sections and "quality" in sections:
        lines += seeds_section(sections["quality-seeds"], sections["quality"])
    if "lr-sweep" in sections:
        lines += sweep_section(sections["lr-sweep"])
    if "lora-variants" in sections:
        lines += variants_section(sections["lora-variants"])
    path = out / "RESULTS.md"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path
