"""Many adapters on one base (``make bench``'s ``adapters`` section): switching, loading, mixed-task batches
and memory, lorakit against PEFT and against what users do today (one merged model per task).

On a roberta-base-shaped model (random weights, 2-label heads so that PEFT can mix them too) with K
adapters written by lorakit's ``save_adapter`` (r = 8 on query and value, the head's projection saved):

* switch: lorakit ``set_active_adapter`` against PEFT ``set_adapter``, 16 adapters loaded;
* load one more: lorakit ``load_named_adapter`` against PEFT ``load_adapter``, from the same file;
* a batch of ROWS rows, row i for adapter i mod K, K = 1, 4, 16: lorakit's mixed batch (``mixed_logits``)
  against the same batch through one adapter, against PEFT's ``adapter_names=`` mixed batch, and against K
  merged models each running its own rows; rounds interleaved, ratios taken round by round;
* memory: a fresh process holding one base with 16 adapters, against one holding 16 merged models.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bench_common import SHAPES, build_base, current_rss_bytes, interleave, ratio_stats, summarize, timed
from bench_format import NAMES, ci, header, mib, ms, table
from torch import nn

R, ALPHA = 8, 16.0
# Each adapter's own head: the classifier's output projection. PEFT mixes batches over saved modules that
# are Linear, Embedding or Conv layers only, so a whole RoBERTa classifier (dense + tanh + projection) would
# leave PEFT out of the comparison; lorakit mixes either.
HEAD = "classifier.out_proj"


def _write_adapters(base: nn.Module, root: Path, count: int) -> list[Path]:
    """``count`` adapter directories (random non-zero A, B and head), all for ``base``."""
    from lorakit.lora import LoraConfig, inject_lora, mark_trainable, save_adapter

    model = copy.deepcopy(base)
    config = LoraConfig(r=R, alpha=ALPHA, target_modules=["query", "value"], modules_to_save=[HEAD])
    inject_lora(model, config)
    trainable = mark_trainable(model, "none", config.modules_to_save)
    params = dict(model.named_parameters())
    dirs = []
    for k in range(count):
        gen = torch.Generator().manual_seed(k)
        with torch.no_grad():
            for name in trainable:
                params[name].normal_(std=0.02, generator=gen)
        # No task type: PEFT would add the whole classifier to the saved modules for SEQ_CLS.
        dirs.append(save_adapter(model, root / f"a{k}", config))
    return dirs


def _served(base: nn.Module, dirs: list[Path]) -> nn.Module:
    from lorakit.lora import load_named_adapter

    model = copy.deepcopy(base)
    for k, path in enumerate(dirs):
        load_named_adapter(model, path, f"a{k}")
    return model


def _peft(base: nn.Module, dirs: list[Path]) -> nn.Module:
    import peft

    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(dirs[0]), adapter_name="a0")
    for k, path in enumerate(dirs[1:], 1):
        model.load_adapter(str(path), adapter_name=f"a{k}")
    return model.eval()


def _merged(base: nn.Module, path: Path) -> nn.Module:
    from lorakit.lora import load_adapter, unload_lora

    model = copy.deepcopy(base)
    load_adapter(model, path)
    return unload_lora(model, merge=True).eval()


def _per_op_us(fn: Any, names: list[str], repeat: int) -> list[float]:
    """Microseconds per call of ``fn(name)`` over ``repeat`` passes through ``names``, one figure a pass."""
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        for name in names:
            fn(name)
        out.append(1e6 * (time.perf_counter() - start) / len(names))
    return out


def switch_and_load(served: nn.Module, peft_model: nn.Module, extra: Path, reps: int) -> dict[str, Any]:
    """Switching between loaded adapters, and loading one more, lorakit against PEFT, interleaved."""
    from lorakit.lora import delete_adapter, load_named_adapter, set_active_adapter

    names = [f"a{k}" for k in range(16)] * 4
    device = torch.device("cpu")

    def lorakit_load() -> tuple[float, float]:
        took = timed(lambda: load_named_adapter(served, extra, "extra"), device)
        delete_adapter(served, "extra")
        return took

    def peft_load() -> tuple[float, float]:
        took = timed(lambda: peft_model.load_adapter(str(extra), adapter_name="extra"), device)
        peft_model.delete_adapter("extra")
        return took

    switch = {"lorakit": [], "peft": []}
    for _ in range(reps):
        switch["lorakit"] += _per_op_us(lambda n: set_active_adapter(served, n), names, 1)
        switch["peft"] += _per_op_us(peft_model.set_adapter, names, 1)
    loads = interleave({"lorakit": lorakit_load, "peft": peft_load}, reps)
    return {
        "switch_us": {k: summarize([(v * 1e-6, 0.0) for v in vals]) for k, vals in switch.items()},
        "switch_ratio": ratio_stats(
            [(v, 1.0) for v in switch["lorakit"]], [(v, 1.0) for v in switch["peft"]]
        ),
        "load_s": {k: summarize(v) for k, v in loads.items()},
        "load_ratio": ratio_stats(loads["lorakit"], loads["peft"]),
    }


@torch.inference_mode()
def mixed_batches(
    base: nn.Module,
    served: nn.Module,
    peft_model: nn.Module,
    dirs: list[Path],
    rows: int,
    seq: int,
    ks: tuple,
    reps: int,
) -> list[dict[str, Any]]:
    """For each K: the mixed batch against one adapter, PEFT's mixed batch and K merged models."""
    from lorakit.lora import mixed_logits, set_active_adapter

    device = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, base.config.vocab_size, (rows, seq), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    merged = [_merged(base, path) for path in dirs[: max(ks)]]
    results = []
    for k in ks:
        names = [f"a{i % k}" for i in range(rows)]
        groups = [torch.tensor([i for i in range(rows) if i % k == j]) for j in range(k)]
        parts = [({n: t[g] for n, t in batch.items()}, m) for g, m in zip(groups, merged, strict=False)]

        def one() -> Any:
            set_active_adapter(served, "a0")
            return served(**batch)

        runs = {
            "one": one,
            "mixed": lambda names=names: mixed_logits(served, names, **batch),
            "peft": lambda names=names: peft_model(**batch, adapter_names=names),
            "merged": lambda parts=parts: [m(**part) for part, m in parts],
        }
        one()  # warm-up
        times = interleave({name: (lambda fn=fn: timed(fn, device)) for name, fn in runs.items()}, reps)
        ours = mixed_logits(served, names, **batch)[0]
        reference = torch.empty_like(ours)
        for (part, m), g in zip(parts, groups, strict=True):
            reference[g] = m(**part).logits
        results.append(
            {
                "adapters": k,
                "rows": rows,
                "seq": seq,
                "times": {name: summarize(t) for name, t in times.items()},
                "mixed_vs_one": ratio_stats(times["mixed"], times["one"]),
                "mixed_vs_peft": ratio_stats(times["mixed"], times["peft"]),
                "mixed_vs_merged": ratio_stats(times["mixed"], times["merged"]),
                "max_abs_diff_vs_merged": float((ours - reference).abs().max()),
            }
        )
    return results


def memory_probe(mode: str, shape: str, dirs: list[str]) -> dict[str, Any]:
    """In a fresh process, resident memory over the process's own before any model: after building the
    base model (``model_rss_bytes``), then with every adapter of ``dirs`` loaded beside it ("one-base"; or
    "one-base:nf4", "one-base:int8" on a base quantized as ``model.quantize`` would, its freed float32
    weights given back first), or with one merged model per adapter ("merged")."""
    from bench_common import reset_peak_rss

    from lorakit.lora import adapter_bytes, adapter_names, load_named_adapter
    from lorakit.quantization import base_weight_bytes, quantize_model

    mode, _, quantize = mode.partition(":")
    before = current_rss_bytes()
    base = build_base(SHAPES[shape])
    model_rss = current_rss_bytes() - before
    model_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    if quantize:
        quantize_model(base, quantize, keep=("classifier",))  # the head stays dense, as modules_to_save
        reset_peak_rss()
    if mode == "one-base":
        for k, path in enumerate(dirs):
            load_named_adapter(base, Path(path), f"a{k}")
        own = sum(adapter_bytes(base, name) for name in adapter_names(base))
        held = [base]
    else:
        held = [_merged(base, Path(path)) for path in dirs]
        del base
        own = 0
    return {
        "mode": mode,
        "rss_bytes": current_rss_bytes() - before,
        "model_rss_bytes": model_rss,
        "model_bytes": model_bytes,
        "adapter_bytes": own,
        "base_bytes": base_weight_bytes(held[0]),  # the adapters' tensors included
        "models": len(held),
    }


def memory(shape: str, dirs: list[Path]) -> dict[str, Any]:
    """``memory_probe`` in fresh processes, one for each mode. The bound: one model, as resident in its
    own process, plus the adapters' own bytes, plus 5%."""
    out = {}
    for mode in ("one-base", "merged"):
        args = [sys.executable, __file__, "--memory", mode, shape, *map(str, dirs)]
        done = subprocess.run(args, capture_output=True, text=True, check=True, cwd=Path(__file__).parent)
        out[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    one = out["one-base"]
    bound = 1.05 * (one["model_rss_bytes"] + one["adapter_bytes"])
    return {**out, "bound_bytes": bound, "one_base_over_bound": one["rss_bytes"] / bound}


def adapters_section(shape: str, rows: int, seq: int, ks: tuple[int, ...], reps: int) -> dict[str, Any]:
    """The whole section (see the module docstring)."""
    base = build_base(SHAPES[shape]).eval()
    with tempfile.TemporaryDirectory(prefix="lorakit-adapters-") as tmp:
        dirs = _write_adapters(base, Path(tmp), max(16, max(ks)) + 1)
        extra, dirs = dirs[-1], dirs[:-1]
        served, peft_model = _served(base, dirs), _peft(base, dirs)
        result = {
            "model": shape,
            "r": R,
            "switching": switch_and_load(served, peft_model, extra, reps),
            "mixed": mixed_batches(base, served, peft_model, dirs, rows, seq, ks, reps),
        }
        del served, peft_model
        result["memory"] = memory(shape, dirs[:16])
    return result


def adapter_targets(r: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """The many-adapters targets: 16 adapters in one batch within 1.15× one adapter's time, no slower than
    PEFT's mixed batch, and one base with 16 adapters within one model's memory plus the adapters', + 5%."""
    rows, where = [], f"{r['model']}, {r['mixed'][0]['rows']} rows × {r['mixed'][0]['seq']}"
    for m in r["mixed"]:
        one, peft, k = m["mixed_vs_one"], m["mixed_vs_peft"], m["adapters"]
        if k == 16:
            rows.append((f"{where}: 16 adapters ≤ 1.15× one adapter", ci(one), one["ratio_median"] <= 1.15))
        if k > 1:
            label = f"{where}: {k} adapters ≤ 1.00× PEFT's adapter_names= batch"
            rows.append((label, ci(peft), peft["ratio_median"] <= 1.0))
    mem, one = r["memory"], r["memory"]["one-base"]
    measured = f"{mib(one['rss_bytes'])} vs {mib(mem['bound_bytes'])}: {mem['one_base_over_bound']:.3f}×"
    label = f"{r['model']} + 16 adapters: memory ≤ 1.05 × (one model + the adapters' bytes)"
    return [*rows, (label, measured, mem["one_base_over_bound"] <= 1.0)]


def render(data: dict[str, Any]) -> list[str]:
    r, keys = data["result"], ("one", "mixed", "peft", "merged")
    lines = header(f"Many adapters on one base: {r['model']}, r = {r['r']}", data)
    rows = [
        [m["adapters"], f"{m['rows']} × {m['seq']}", *(ms(m["times"][k]["median_s"]) for k in keys)]
        + [
            *(ci(m[f"mixed_vs_{k}"]) for k in ("one", "merged", "peft")),
            f"{m['max_abs_diff_vs_merged']:.1e}",
        ]
        for m in r["mixed"]
    ]
    head = ["adapters", "batch", "one adapter", "lorakit mixed", "PEFT mixed", "merged models", "mixed / one"]
    lines += table([*head, "mixed / merged", "mixed / PEFT", "max |Δ| vs merged"], rows)
    sw, us, load = r["switching"], r["switching"]["switch_us"], r["switching"]["load_s"]
    ops = [
        ["switch the active adapter", *(f"{us[k]['median_s'] * 1e6:,.0f} µs" for k in NAMES if k in us)],
        ["load one more adapter", *(ms(load[k]["median_s"]) for k in NAMES if k in load)],
    ]
    ops = [[*op, ci(sw[key])] for op, key in zip(ops, ("switch_ratio", "load_ratio"), strict=True)]
    lines += table(["with 16 adapters loaded", "lorakit", "PEFT", "lorakit / PEFT [95%]"], ops)
    one, merged = r["memory"]["one-base"], r["memory"]["merged"]
    return lines + [
        f"Memory, each in a fresh process (resident set over the process's own before any model): one base "
        f"with 16 adapters {mib(one['rss_bytes'])} (the base alone {mib(one['model_rss_bytes'])}, its "
        f"parameters {mib(one['model_bytes'])}; the adapters' own tensors {mib(one['adapter_bytes'])}); 16 "
        f"merged models {mib(merged['rss_bytes'])}. Each adapter saves the classifier's output projection "
        "(PEFT mixes only saved modules that are Linear, Embedding or Conv layers); row i belongs to adapter "
        "i mod K; merged models: each adapter's rows through its own merged copy, in turn.",
        "",
    ]


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "--memory":
    from bench_common import setup_torch

    setup_torch()
    print(json.dumps(memory_probe(sys.argv[2], sys.argv[3], sys.argv[4:])))
