"""Speed and memory: one training step (forward, backward, AdamW step) for lorakit LoRA, PEFT LoRA and
full fine-tuning, in float32 or under bf16 autocast; inference latency of the base model, lorakit unmerged
and merged, and PEFT unmerged.

bf16 steps (section ``speed-bf16``) are what Accelerate's ``mixed_precision: bf16`` runs: the model's
weights stay float32 (the trainable ones are what AdamW updates), the forward pass runs under
``torch.autocast(dtype=torch.bfloat16)``, the backward pass follows it. Targets, fixed before the first
bf16 measurement: lorakit's bf16 step ≤ 0.95× PEFT's bf16 step, and LoRA's bf16 step ≤ 0.70× full
fine-tuning's bf16 step (medians of the round-by-round ratios).

A modern decoder (section ``speed-llama``, issue 24): the Llama architecture at ~350M parameters
(``lorakit.paper_models.FAMILY_MODELS``), a causal LM trained on next tokens as GPT-2 medium is, LoRA on
q_proj and v_proj (lorakit's preset for Llama). Targets, fixed before the first measurement: lorakit's
step ≤ 1.00× PEFT's, and LoRA's step ≤ 0.75× full fine-tuning's (medians of the round-by-round ratios).

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
    difference_stats,
    interleave,
    peak_rss_bytes,
    ratio_stats,
    reset_peak_rss,
    setup_torch,
    summarize,
    timed,
)
from torch import nn

from lorakit.lora import count_parameters
from lorakit.quantization import base_weight_bytes

LR, WEIGHT_DECAY = 1e-4, 0.01  # the values do not change the cost of a step
WARMUP_ROWS = 2  # a small first step: creates AdamW's state and the kernels' caches, cheaply


def make_batch(shape: ModelShape, rows: int, seq: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random token ids (and labels) of a full ``rows`` × ``seq`` batch, no padding."""
    gen = torch.Generator().manual_seed(1)
    vocab = shape.config.get("vocab_size", 50257)
    ids = torch.randint(3, vocab, (rows, seq), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if shape.decoder:
        batch["labels"] = ids.clone()
    else:
        batch["labels"] = torch.randint(0, shape.config["num_labels"], (rows,), generator=gen)
    return {k: v.to(device) for k, v in batch.items()}


def _train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    kind: str,
    precision: str = "fp32",
):
    from lorakit.training.optimization import task_loss

    device = batch["input_ids"].device.type
    with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = task_loss(logits, batch["labels"], kind, 0.0)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _step_worker(conn: Connection, job: dict[str, Any]) -> None:
    """One contender in its own process: build, then answer "warmup" | "step" | "stop"."""
    from lorakit.training.optimization import build_optimizer

    device = setup_torch(job["threads"])
    shape = SHAPES[job["shape"]]
    rss_start = current_rss_bytes()
    model = apply_contender(build_base(shape).to(device), shape, job["contender"], job["r"], job["alpha"])
    model.train()
    optimizer = build_optimizer(model, LR, WEIGHT_DECAY)
    kind = "generation" if shape.decoder else "classification"
    batch = make_batch(shape, job["rows"], job["seq"], device)
    warm = {k: v[:WARMUP_ROWS] for k, v in batch.items()}
    if job.get("peak_from_built"):  # the peak of training alone, not of building (a dense base first)
        reset_peak_rss()
    conn.send(
        {
            "trainable": count_parameters(model).trainable,
            "base_bytes": base_weight_bytes(model),
            "rss_start": rss_start,
            "rss_built": current_rss_bytes(),
        }
    )
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
        rows = warm if msg == "warmup" else batch
        step = lambda rows=rows: _train_step(model, optimizer, rows, kind, job["precision"])  # noqa: E731
        conn.send(timed(step, device))


def train_step_benchmark(
    shape_name: str,
    rows: int,
    seq: int,
    reps: int,
    full_reps: int | None = None,
    r: int = 8,
    alpha: float = 16.0,
    precision: str = "fp32",
    contenders: Sequence[str] = CONTENDERS,
    peak_from_built: bool = False,
) -> dict[str, Any]:
    """Median step time and peak memory of each contender on ``shape_name``, and the ratios; ``precision``
    "bf16" runs every contender's step under bf16 autocast (float32 weights). ``contenders``: lorakit,
    PEFT and full fine-tuning by default; ``QUANTIZED`` ones are compared with "lorakit" (LoRA on the float32
    base). ``peak_from_built``: peak memory counts from the built model on (training's own peak).

    ``reps`` rounds of the two LoRA contenders, the first ``full_reps`` (default: all) of them with a
    full fine-tuning step too: LoRA against full has a wide margin to its target, lorakit against PEFT
    a narrow one, and a full step is the longest of the three.

    Every contender trains with lorakit's ``build_optimizer``: torch's fused AdamW, the kernel the
    Hugging Face Trainer defaults to, so full fine-tuning is measured at its fastest.
    """
    full_reps = reps if full_reps is None else min(full_reps, reps)
    ctx = mp.get_context("spawn")  # a fresh interpreter each: nothing inherited, memory measured alone
    workers: dict[str, tuple[Any, Connection]] = {}
    info: dict[str, dict[str, Any]] = {}
    try:
        for name in contenders:
            parent, child = ctx.Pipe()
            # Spawned workers import bench_common afresh: they get the thread count explicitly.
            threads = torch.get_num_threads()
            job = dict(
                shape=shape_name,
                contender=name,
                rows=rows,
                seq=seq,
                r=r,
                alpha=alpha,
                threads=threads,
                precision=precision,
                peak_from_built=peak_from_built,
            )
            proc = ctx.Process(target=_step_worker, args=(child, job), daemon=True)
            proc.start()
            workers[name] = (proc, parent)
        for name, (_, conn) in workers.items():  # all built in parallel; timing starts once all are ready
            info[name] = conn.recv()
        for name, (_, conn) in workers.items():
            conn.send("warmup")
            info[name]["warmup_s"] = conn.recv()[0]

        def runner(name: str):
            def run() -> Timing:
                conn = workers[name][1]
                conn.send("step")
                return conn.recv()

            return run

        times = interleave({name: runner(name) for name in contenders}, full_reps)
        lora = {name: runner(name) for name in contenders if name != "full"}
        for name, more in interleave(lora, reps - full_reps).items():
            times[name] += more
        for name, (proc, conn) in workers.items():
            conn.send("stop")
            info[name].update(conn.recv())
            proc.join(timeout=60)
    finally:
        for proc, _ in workers.values():
            if proc.is_alive():
                proc.kill()
    result: dict[str, Any] = {"model": shape_name, "batch": rows, "seq": seq, "r": r, "alpha": alpha}
    result["precision"] = precision
    result["contenders"] = {}
    for name in contenders:
        peak = info[name].get("cuda_max_allocated_bytes", info[name]["peak_rss_bytes"])
        result["contenders"][name] = {**info[name], **summarize(times[name]), "peak_memory_bytes": peak}
    c = result["contenders"]
    if set(contenders) != set(CONTENDERS):
        return {**result, **_against_lorakit(c, times)}
    result["memory_kind"] = "cuda_max_allocated" if "cuda_max_allocated_bytes" in c["full"] else "peak_rss"
    result["ratios"] = {
        "time_lorakit_over_peft": c["lorakit"]["median_s"] / c["peft"]["median_s"],
        "cpu_lorakit_over_peft": c["lorakit"]["cpu_median_s"] / c["peft"]["cpu_median_s"],
        "time_lorakit_over_full": c["lorakit"]["median_s"] / c["full"]["median_s"],
        "cpu_lorakit_over_full": c["lorakit"]["cpu_median_s"] / c["full"]["cpu_median_s"],
        "time_peft_over_full": c["peft"]["median_s"] / c["full"]["median_s"],
        "memory_lorakit_over_full": c["lorakit"]["peak_memory_bytes"] / c["full"]["peak_memory_bytes"],
        "memory_lorakit_over_peft": c["lorakit"]["peak_memory_bytes"] / c["peft"]["peak_memory_bytes"],
    }
    # Round by round: each round runs every contender once, so its ratios see about the same machine.
    result["round_ratios"] = {
        f"{a}_over_{b}": ratio_stats(times[a][: len(times[b])], times[b])
        for a, b in (("lorakit", "peft"), ("lorakit", "full"), ("peft", "full"))
    }
    return result


def _against_lorakit(c: dict[str, Any], times: dict[str, list[Timing]]) -> dict[str, Any]:
    """Every other contender against lorakit LoRA on the float32 base: step time round by round, peak
    memory and base weight bytes."""
    others = [name for name in c if name != "lorakit"]
    memory = {
        f"{name}_over_lorakit": c[name]["peak_memory_bytes"] / c["lorakit"]["peak_memory_bytes"]
        for name in others
    }
    base = {f"{name}_over_lorakit": c[name]["base_bytes"] / c["lorakit"]["base_bytes"] for name in others}
    rounds = {
        f"{name}_over_lorakit": ratio_stats(times[name], times["lorakit"][: len(times[name])])
        for name in others
    }
    return {"memory_ratios": memory, "base_bytes_ratios": base, "round_ratios": rounds}


class _Holder(nn.Module):
    """One named module, called as the model."""

    def __init__(self, name: str, module: nn.Module) -> None:
        super().__init__()
        self.name = name
        self.add_module(name, module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.name)(x)


def _one_layer(shape: ModelShape, contender: str, r: int) -> nn.Module:
    """The first attention block's adapted projection of ``shape`` (random weights) in a one-module
    wrapper, bare (``base``) or adapted as ``contender`` would adapt it."""
    torch.manual_seed(0)
    if shape.family == "gpt2":
        from transformers.pytorch_utils import Conv1D

        d = shape.config["n_embd"]
        name, layer = "c_attn", Conv1D(3 * d, d)
    else:
        d = shape.config["hidden_size"]
        name, layer = shape.peft_targets[0], nn.Linear(d, d)  # W_q: RoBERTa's query, Llama's q_proj
    holder = _Holder(name, layer)
    if contender == "base":
        return holder.requires_grad_(False)
    if contender == "lorakit":
        from lorakit.lora import LoraConfig, inject_lora

        fused = {"c_attn": ("q", "k", "v")} if shape.family == "gpt2" else {}
        target = "c_attn[q,v]" if shape.family == "gpt2" else name
        inject_lora(holder, LoraConfig(r=r, alpha=2.0 * r, target_modules=[target], fused_slices=fused))
        return holder
    import peft

    config = peft.LoraConfig(
        r=r, lora_alpha=2.0 * r, target_modules=[name], fan_in_fan_out=shape.family == "gpt2"
    )
    return peft.get_peft_model(holder, config)


def layer_benchmark(
    shape_name: str, rows: int, seq: int, reps: int, r: int = 8, train: bool = True
) -> dict[str, Any]:
    """What the LoRA layers themselves cost: one adapted projection at the model's width and ``rows`` ×
    ``seq`` tokens, bare (frozen, as inside a LoRA model), with lorakit's LoRA and with PEFT's, in
    interleaved rounds. ``train``: forward and backward (dL/dx and the LoRA gradients); else a forward
    under inference_mode, each timed unit repeating it until about 512 tokens have passed (a unit of
    milliseconds, well inside the machine's drift of a second or so), with lorakit's layer merged and
    unloaded as a fourth contender.
    Non-zero B, as after the first steps.

    A LoRA model differs from its base, and lorakit's from PEFT's, only in these layers, and one layer
    runs in milliseconds, far shorter than the machine's speed drifts (seconds): this is where the
    implementations' costs can be told apart to a fraction of a percent of a whole forward pass."""
    from lorakit.lora import unload_lora

    device = setup_torch()
    shape = SHAPES[shape_name]
    layers = {name: _one_layer(shape, name, r).to(device) for name in ("base", "lorakit", "peft")}
    for module in layers.values():
        with torch.no_grad():
            for pname, p in module.named_parameters():
                if "lora_B" in pname:
                    p.normal_(0, 0.02)
    if not train:  # lorakit's layer merged and unloaded: the bare module again, W0 + BA in its weight
        layers["merged"] = unload_lora(copy.deepcopy(layers["lorakit"]))
    d = shape.config.get("n_embd", shape.config.get("hidden_size"))
    x = torch.randn(rows * seq, d, device=device, requires_grad=train)
    inner = 1 if train else max(1, 512 // (rows * seq))

    def runner(module: nn.Module):
        def step() -> None:
            y = module(x)
            y.backward(torch.ones_like(y))

        def forward() -> None:
            with torch.inference_mode():
                for _ in range(inner):
                    module(x)

        return lambda: timed(step if train else forward, device)

    runs = {name: runner(m) for name, m in layers.items()}
    for run in runs.values():
        run()
    times = interleave(runs, reps)
    stats = {k: summarize(v) for k, v in times.items()}
    # Per round: each LoRA's overhead over the bare layer, and lorakit's time minus PEFT's.
    rounds = {
        "lorakit_overhead": difference_stats(times["lorakit"], times["base"]),
        "peft_overhead": difference_stats(times["peft"], times["base"]),
        "lorakit_minus_peft": difference_stats(times["lorakit"], times["peft"]),
    }
    if "merged" in times:
        rounds["merged_over_base"] = ratio_stats(times["merged"], times["base"])
    round_over = {k: rounds[f"{k}_overhead"]["median_s"] for k in ("lorakit", "peft")}
    module = "c_attn (q|k|v)" if shape.family == "gpt2" else shape.peft_targets[0]
    return {
        "model": shape_name,
        "module": module,
        "mode": "forward+backward" if train else "inference forward",
        "tokens": rows * seq,
        "calls_per_unit": inner,
        "r": r,
        "contenders": stats,
        "rounds": rounds,
        "overhead_lorakit_over_peft": (
            round_over["lorakit"] / round_over["peft"] if round_over["peft"] > 0 else None
        ),
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


def _structure(model: nn.Module) -> list[tuple[str, str, tuple[tuple[int, ...], ...], str]]:
    """Each module's name, class, parameter shapes and dtype: what decides the kernels a forward runs."""
    return [
        (name, type(m).__name__, tuple(tuple(p.shape) for p in m.parameters(recurse=False)), str(m.training))
        for name, m in model.named_modules()
    ] + [("dtype", str({p.dtype for p in model.parameters()}), (), "")]


def inference_benchmark(
    shape_name: str,
    batch_sizes: Sequence[int],
    seq: int,
    reps: Sequence[int],
    r: int = 8,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Forward latency (eval mode, no autograd) of the base model, lorakit unmerged, lorakit merged
    (``unload_lora``: plain modules again) and PEFT unmerged, at each batch size; medians and ratios.
    ``precision="bf16"`` runs every forward under bf16 autocast, as ``lorakit eval`` and ``predict`` do
    with ``train.mixed_precision: bf16`` (the weights stay float32)."""
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
    result: dict[str, Any] = {"model": shape_name, "seq": seq, "r": r, "precision": precision, "batches": {}}
    probe = make_batch(shape, 2, seq, device)

    def precise():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    with torch.inference_mode(), precise():
        outs = {k: m(input_ids=probe["input_ids"]).logits for k, m in models.items()}
    result["max_abs_diff_vs_lorakit_unmerged"] = {
        k: float((v - outs["lorakit_unmerged"]).abs().max()) for k, v in outs.items()
    }
    result["merged_structure_is_base"] = _structure(merged) == _structure(base)
    for rows, n in zip(batch_sizes, reps, strict=True):
        ids = make_batch(shape, rows, seq, device)["input_ids"]

        def runner(model: nn.Module, ids: torch.Tensor = ids):
            def run() -> Timing:
                with torch.inference_mode(), precise():
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
        for name, s in stats.items():
            s["ratio_to_base"] = s["median_s"] / base_median
            s["cpu_ratio_to_base"] = s["cpu_median_s"] / base_cpu
            s["round_ratio_to_base"] = ratio_stats(times[name], times["base"])
        stats["lorakit_unmerged"]["round_ratio_to_peft"] = ratio_stats(
            times["lorakit_unmerged"], times["peft_unmerged"]
        )
        result["batches"][str(rows)] = stats
    return result
