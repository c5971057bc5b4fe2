"""Speed and memory: one training step (forward, backward, AdamW step) for lorakit LoRA, PEFT LoRA and
full fine-tuning; inference latency of the base model, lorakit unmerged and merged, and PEFT unmerged.

Training steps run in one worker process per contender, so that each one's peak memory is its own
(peak resident set size on the CPU, ``torch.cuda.max_memory_allocated`` on a GPU). The parent drives the
workers in turn, one step at a time, so their timed steps interleave as they would in one process.
"""

from __future__ import annotations

import copy
import multiprocessing as mp
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

import torch
from bench_common import (
    CONTENDERS,
    SHAPES,
    ModelShape,
    Timing,
    apply_contender,
    build_base,
    current_rss_bytes,
    interleave,
    peak_rss_bytes,
    setup_torch,
    summarize,
    timed,
    trainable_count,
)
from torch import nn

LR, WEIGHT_DECAY = 1e-4, 0.01  # the values do not change the cost of a step
FULL_FUSED = "full_fused"  # full fine-tuning with fused AdamW: see train_step_benchmark
STEP_CONTENDERS = (*CONTENDERS, FULL_FUSED)
WARMUP_ROWS = 2  # a small first step: creates AdamW's state and the kernels' caches, cheaply


def make_batch(shape: ModelShape, rows: int, seq: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random token ids (and labels) of a full ``rows`` × ``seq`` batch, no padding."""
    gen = torch.Generator().manual_seed(1)
    vocab = shape.config.get("vocab_size", 50257)
    ids = torch.randint(3, vocab, (rows, seq), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if shape.family == "gpt2":
        batch["labels"] = ids.clone()
    else:
        batch["labels"] = torch.randint(0, shape.config["num_labels"], (rows,), generator=gen)
    return {k: v.to(device) for k, v in batch.items()}


def _train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor], kind: str
):
    from lorakit.optimization import task_loss

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = task_loss(logits, batch["labels"], kind, 0.0)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _set_fused(optimizer: torch.optim.Optimizer, fused: bool, saved: list[tuple[Any, Any]]) -> None:
    """Switch AdamW to torch's fused kernel, or back to its ``saved`` (fused, foreach) settings; AdamW
    reads them at every ``step``. The state (moments, step count) has the same layout either way, so one
    optimizer serves both timings and the worker holds one copy of it. Only the step counters move: the
    fused kernel wants them on the parameters' device, the other paths keep them on the CPU."""
    for group, (was_fused, was_foreach) in zip(optimizer.param_groups, saved, strict=True):
        group["fused"], group["foreach"] = (True, False) if fused else (was_fused, was_foreach)
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and "step" in state:
                state["step"] = state["step"].to(p.device if fused else "cpu")


def _step_worker(conn: Connection, job: dict[str, Any]) -> None:
    """One contender in its own process: build, then answer ("warmup" | "step", fused) / "stop"."""
    from lorakit.optimization import build_optimizer

    device = setup_torch(job["threads"])
    shape = SHAPES[job["shape"]]
    rss_start = current_rss_bytes()
    model = apply_contender(build_base(shape).to(device), shape, job["contender"], job["r"], job["alpha"])
    model.train()
    optimizer = build_optimizer(model, LR, WEIGHT_DECAY)
    saved = [(g.get("fused"), g.get("foreach")) for g in optimizer.param_groups]
    kind = "generation" if shape.family == "gpt2" else "classification"
    batch = make_batch(shape, job["rows"], job["seq"], device)
    warm = {k: v[:WARMUP_ROWS] for k, v in batch.items()}
    conn.send({"trainable": trainable_count(model), "rss_start": rss_start, "rss_built": current_rss_bytes()})
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    while True:
        msg = conn.recv()
        if msg == "stop":
            peak = {"peak_rss_bytes": peak_rss_bytes()}
            if device.type == "cuda":
                peak["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
            conn.send(peak)
            return
        what, fused = msg
        _set_fused(optimizer, fused, saved)
        rows = warm if what == "warmup" else batch
        conn.send(timed(lambda rows=rows: _train_step(model, optimizer, rows, kind), device))
        _set_fused(optimizer, False, saved)


def train_step_benchmark(
    shape_name: str, rows: int, seq: int, reps: int, r: int = 8, alpha: float = 16.0
) -> dict[str, Any]:
    """Median step time and peak memory of each contender on ``shape_name``, and the ratios.

    Full fine-tuning is timed twice, in the same worker: with lorakit's AdamW (``build_optimizer``, what
    ``method: full`` trains with) and with torch's fused AdamW kernel over the same parameter groups,
    the Hugging Face Trainer's default (``adamw_torch_fused``) and the stronger baseline.
    """
    ctx = mp.get_context("spawn")  # a fresh interpreter each: nothing inherited, memory measured alone
    workers: dict[str, tuple[Any, Connection]] = {}
    info: dict[str, dict[str, Any]] = {}
    try:
        for name in CONTENDERS:
            parent, child = ctx.Pipe()
            # Spawned workers import bench_common afresh: they get the thread count explicitly.
            threads = torch.get_num_threads()
            job = dict(
                shape=shape_name, contender=name, rows=rows, seq=seq, r=r, alpha=alpha, threads=threads
            )
            proc = ctx.Process(target=_step_worker, args=(child, job), daemon=True)
            proc.start()
            workers[name] = (proc, parent)
        for name, (_, conn) in workers.items():  # all built in parallel; timing starts once all are ready
            info[name] = conn.recv()
        for name, (_, conn) in workers.items():
            conn.send(("warmup", False))
            info[name]["warmup_s"] = conn.recv()[0]

        def runner(name: str):
            worker = "full" if name == FULL_FUSED else name

            def run() -> Timing:
                conn = workers[worker][1]
                conn.send(("step", name == FULL_FUSED))
                return conn.recv()

            return run

        times = interleave({name: runner(name) for name in STEP_CONTENDERS}, reps)
        for name, (proc, conn) in workers.items():
            conn.send("stop")
            info[name].update(conn.recv())
            proc.join(timeout=60)
    finally:
        for proc, _ in workers.values():
            if proc.is_alive():
                proc.kill()
    info[FULL_FUSED] = info["full"]  # one process: the same model, optimizer state and memory
    result: dict[str, Any] = {"model": shape_name, "batch": rows, "seq": seq, "r": r, "contenders": {}}
    for name in STEP_CONTENDERS:
        peak = info[name].get("cuda_max_allocated_bytes", info[name]["peak_rss_bytes"])
        result["contenders"][name] = {**info[name], **summarize(times[name]), "peak_memory_bytes": peak}
    c = result["contenders"]
    result["memory_kind"] = "cuda_max_allocated" if "cuda_max_allocated_bytes" in c["full"] else "peak_rss"
    result["ratios"] = {
        "time_lorakit_over_peft": c["lorakit"]["median_s"] / c["peft"]["median_s"],
        "time_lorakit_over_peft_min": c["lorakit"]["min_s"] / c["peft"]["min_s"],
        "cpu_lorakit_over_peft": c["lorakit"]["cpu_median_s"] / c["peft"]["cpu_median_s"],
        "cpu_lorakit_over_full": c["lorakit"]["cpu_median_s"] / c["full"]["cpu_median_s"],
        "cpu_lorakit_over_full_fused": c["lorakit"]["cpu_median_s"] / c[FULL_FUSED]["cpu_median_s"],
        "time_lorakit_over_full": c["lorakit"]["median_s"] / c["full"]["median_s"],
        "time_lorakit_over_full_fused": c["lorakit"]["median_s"] / c[FULL_FUSED]["median_s"],
        "time_peft_over_full": c["peft"]["median_s"] / c["full"]["median_s"],
        "memory_lorakit_over_full": c["lorakit"]["peak_memory_bytes"] / c["full"]["peak_memory_bytes"],
        "memory_lorakit_over_peft": c["lorakit"]["peak_memory_bytes"] / c["peft"]["peak_memory_bytes"],
    }
    return result


def same_process_ab(shape_name: str, rows: int, seq: int, reps: int, r: int = 8) -> dict[str, Any]:
    """lorakit LoRA against PEFT LoRA in one process: two copies of one model, steps alternating.

    Separate worker processes give each contender its own memory figure but also their own memory
    layout, which can move a step by a percent or two either way; here both share one process, so what
    is left between them is the LoRA layers themselves.
    """
    from lorakit.optimization import build_optimizer

    device = setup_torch()
    shape = SHAPES[shape_name]
    base = build_base(shape).to(device)
    kind = "generation" if shape.family == "gpt2" else "classification"
    batch = make_batch(shape, rows, seq, device)
    runs = {}
    for name in ("lorakit", "peft"):
        model = apply_contender(copy.deepcopy(base), shape, name, r, 2.0 * r).train()
        optimizer = build_optimizer(model, LR, WEIGHT_DECAY)
        runs[name] = lambda m=model, o=optimizer: timed(lambda: _train_step(m, o, batch, kind), device)
    del base
    for run in runs.values():  # one untimed step each: AdamW's state, kernel caches
        run()
    stats = {k: summarize(v) for k, v in interleave(runs, reps).items()}
    ours, theirs = stats["lorakit"], stats["peft"]
    return {
        "model": shape_name,
        "batch": rows,
        "seq": seq,
        "contenders": stats,
        "time_lorakit_over_peft": ours["median_s"] / theirs["median_s"],
        "cpu_lorakit_over_peft": ours["cpu_median_s"] / theirs["cpu_median_s"],
    }


def _randomize_lora(model: nn.Module) -> None:
    # B starts at zero; a non-zero adapter makes "merged" and "unmerged" mean something.
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def _copy_adapter_to_peft(ours: nn.Module, theirs: nn.Module) -> None:
    """PEFT gets lorakit's A and B (plain LinearLoRA targets only), so both run the same adapter."""
    from lorakit.lora import lora_modules

    with torch.no_grad():
        mods = dict(theirs.base_model.model.named_modules())
        for path, module in lora_modules(ours):
            peft_layer = mods[path]
            peft_layer.lora_A["default"].weight.copy_(module.lora_A)
            peft_layer.lora_B["default"].weight.copy_(module.lora_B)


def inference_benchmark(
    shape_name: str, batch_sizes: Sequence[int], seq: int, reps: Sequence[int], r: int = 8
) -> dict[str, Any]:
    """Forward latency (eval mode, no autograd) of the base model, lorakit unmerged, lorakit merged
    (``unload_lora``: plain modules again) and PEFT unmerged, at each batch size; medians and ratios."""
    from lorakit.lora import unload_lora

    device = setup_torch()
    shape = SHAPES[shape_name]
    base = build_base(shape).to(device).eval()
    ours = apply_contender(copy.deepcopy(base), shape, "lorakit", r, 2.0 * r)
    _randomize_lora(ours)
    merged = unload_lora(copy.deepcopy(ours))
    theirs = apply_contender(copy.deepcopy(base), shape, "peft", r, 2.0 * r)
    _copy_adapter_to_peft(ours, theirs)
    models = {
        "base": base,
        "lorakit_unmerged": ours.eval(),
        "lorakit_merged": merged,
        "peft_unmerged": theirs,
    }
    models["peft_unmerged"].eval()
    result: dict[str, Any] = {"model": shape_name, "seq": seq, "r": r, "batches": {}}
    probe = make_batch(shape, 2, seq, device)
    with torch.inference_mode():
        outs = {k: m(input_ids=probe["input_ids"]).logits for k, m in models.items()}
    result["max_abs_diff_vs_lorakit_unmerged"] = {
        k: float((v - outs["lorakit_unmerged"]).abs().max()) for k, v in outs.items()
    }
    for rows, n in zip(batch_sizes, reps, strict=True):
        ids = make_batch(shape, rows, seq, device)["input_ids"]

        def runner(model: nn.Module, ids: torch.Tensor = ids):
            def run() -> Timing:
                with torch.inference_mode():
                    return timed(lambda: model(input_ids=ids), device)

            return run

        runs = {k: runner(m) for k, m in models.items()}
        if rows == batch_sizes[0]:
            for warm in runs.values():  # one untimed pass each, before anything is timed
                warm()
        times = interleave(runs, n)
        stats = {k: summarize(v) for k, v in times.items()}
        base_median = stats["base"]["median_s"]
        base_cpu = stats["base"]["cpu_median_s"]
        for s in stats.values():
            s["ratio_to_base"] = s["median_s"] / base_median
            s["cpu_ratio_to_base"] = s["cpu_median_s"] / base_cpu
        result["batches"][str(rows)] = stats
    return result
