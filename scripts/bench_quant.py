"""The quantized-base section of `make bench` (issue 27): LoRA on an nf4 / int8 base against LoRA on the
float32 base, side by side in one run, each measure in its own process (peak memory is per process).

    python scripts/bench_quant.py [--steps 3] [--rounds 5] [--out benchmarks/quant.json]

Targets, fixed before the first run:
- gpt2-medium shape (random weights): base weight bytes nf4 <= 0.30x float32; peak training RSS at 4x128
  <= 0.75x LoRA on the float32 base; step time <= 1.5x;
- roberta-base shape, 16 adapters, inference: resident memory <= 0.55x the float32 base with the same
  adapters; mixed-batch time (64 rows x 32 tokens) <= 1.5x.
The quality target (real MiniLM, SST-2 / STS-B, 3 seeds) is run by bench_quality-style recipes with
`--set model.quantize=nf4`; not part of this script.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
METHODS = ("none", "nf4", "int8")


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _trim() -> None:
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed float32 weights back to the system


class PeakSampler:
    """Peak RSS while a block runs, sampled every 2 ms."""

    def __enter__(self) -> PeakSampler:
        self.peak, self._stop = _rss(), False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._thread.join()
        self.peak = max(self.peak, _rss())


def gpt2_worker(method: str, steps: int) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    from lorakit.families import fused_slices, lora_defaults
    from lorakit.lora import LoraConfig, inject_lora, mark_trainable
    from lorakit.quantization import base_weight_bytes, quantize_model

    torch.manual_seed(0)
    config = GPT2Config(n_embd=1024, n_layer=24, n_head=16)  # gpt2-medium's shape
    model = GPT2LMHeadModel(config)
    dense_bytes = base_weight_bytes(model)
    if method != "none":
        quantize_model(model, method)
    _trim()
    base_bytes = base_weight_bytes(model)
    lora = lora_defaults(model, LoraConfig(r=4, alpha=32, fused_slices=fused_slices(model.config)))
    inject_lora(model, lora)
    mark_trainable(model)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (4, 128), generator=torch.Generator().manual_seed(1))
    times = []
    _trim()
    before = _rss()
    with PeakSampler() as sampler:
        for _ in range(steps + 1):  # the first step warms up
            start = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
    return {
        "method": method,
        "dense_base_bytes": dense_bytes,
        "base_bytes": base_bytes,
        "rss_before_steps": before,
        "peak_training_rss": sampler.peak,
        "process_max_rss": _maxrss(),
        "step_seconds": times[1:],
    }


def _maxrss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def roberta_worker(method: str, rounds: int) -> dict:
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from lorakit.lora import LoraConfig, inject_lora, mixed_batch
    from lorakit.quantization import base_weight_bytes, quantize_model

    _trim()
    start_rss = _rss()
    torch.manual_seed(0)
    model = RobertaForSequenceClassification(RobertaConfig(num_labels=2)).eval()  # roberta-base's shape
    if method != "none":
        quantize_model(model, method)
    names = [f"task{i}" for i in range(16)]
    for name in names:
        inject_lora(model, LoraConfig(r=8, alpha=16, target_modules=["query", "value"]), adapter=name)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.02)
    _trim()
    resident = _rss()
    ids = torch.randint(3, 50000, (64, 32), generator=torch.Generator().manual_seed(2))
    routing = [names[i % 16] for i in range(64)]
    routing.sort()
    times = []
    with torch.inference_mode():
        for _ in range(rounds + 1):
            start = time.perf_counter()
            with mixed_batch(model, routing):
                model(input_ids=ids)
            times.append(time.perf_counter() - start)
    return {
        "method": method,
        "resident_rss": resident,
        "rss_before_model": start_rss,
        "base_bytes": base_weight_bytes(model),
        "mixed_batch_seconds": times[1:],
    }


def _run_worker(kind: str, method: str, n: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--method", method, "--n", str(n)]
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} {method} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _ratio(num: float, den: float) -> float:
    return round(num / den, 3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "quant.json")
    parser.add_argument("--worker")
    parser.add_argument("--method")
    parser.add_argument("--n", type=int)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("LORAKIT_BENCH_THREADS", "2")))
    if args.worker:
        worker = gpt2_worker if args.worker == "gpt2" else roberta_worker
        print(json.dumps(worker(args.method, args.n)))
        return
    gpt2 = {m: _run_worker("gpt2", m, args.steps) for m in METHODS}
    roberta = {m: _run_worker("roberta", m, args.rounds) for m in METHODS}
    med = statistics.median
    results: dict = {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "gpt2_medium": gpt2,
        "roberta_base_16_adapters": roberta,
        "targets": {},
    }
    for m in ("nf4", "int8"):
        g, g0, r, r0 = gpt2[m], gpt2["none"], roberta[m], roberta["none"]
        steps = [a / b for a, b in zip(g["step_seconds"], g0["step_seconds"], strict=True)]
        batches = [a / b for a, b in zip(r["mixed_batch_seconds"], r0["mixed_batch_seconds"], strict=True)]
        results["targets"][m] = {
            "gpt2_base_bytes_vs_fp32": (_ratio(g["base_bytes"], g0["base_bytes"]), 0.30),
            "gpt2_peak_training_rss_vs_fp32": (_ratio(g["peak_training_rss"], g0["peak_training_rss"]), 0.75),
            "gpt2_step_time_vs_fp32": (
                round(med(steps), 3),
                1.5,
                [round(min(steps), 3), round(max(steps), 3)],
            ),
            "roberta_resident_vs_fp32": (_ratio(r["resident_rss"], r0["resident_rss"]), 0.55),
            # the same without the interpreter and libraries (RSS before the model was built)
            "roberta_model_resident_vs_fp32": (
                _ratio(
                    r["resident_rss"] - r["rss_before_model"], r0["resident_rss"] - r0["rss_before_model"]
                ),
                0.55,
            ),
            "roberta_mixed_batch_time_vs_fp32": (
                round(med(batches), 3),
                1.5,
                [round(min(batches), 3), round(max(batches), 3)],
            ),
        }
        for key, value in results["targets"][m].items():
            results["targets"][m][key] = {
                "value": value[0],
                "target": value[1],
                "met": value[0] <= value[1],
                **({"range": value[2]} if len(value) > 2 else {}),
            }
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results["targets"], indent=1))


if __name__ == "__main__":
    main()
