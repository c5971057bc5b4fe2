"""Mixed-adapter decoding in ``lorakit serve``: generated tokens/s and time to first token of concurrent
clients spread over several adapters, against the same clients all on one adapter, in one server.

    python scripts/bench_generation_serve.py --out benchmarks
    # 12 minutes once on 2 CPU cores that other work kept busy (load average 4-5); less on a quiet machine

A GPT-2-small-shaped base (768 wide, 12 layers, random weights: no hub here, and speed does not depend on
the weights) with ``ADAPTERS`` PEFT LoRA adapters (r = 8 on ``c_attn``, random A and B), one ``lorakit
serve`` process. Prompts are real E2E meaning representations (the dev set) in the E2E prompt form.
``CLIENTS`` closed-loop clients each stream ``REQUESTS`` completions of ``max_tokens`` tokens (greedy; 8
and 16 fewer for every second and third client, so that requests end at different steps and the next
ones join while others decode),
through ``/v1/completions`` with ``stream: true``. Two kinds of phase on the same server, interleaved in
``ROUNDS`` rounds (the order alternating, so a drift of the machine's speed falls on both):

* mixed: client i names adapter i mod ADAPTERS, so every decoding step holds rows of every adapter;
* single: every client names the first adapter.

Generated tokens/s is the phase's completion tokens (``usage``) over its wall time; time to first token
is measured by the client, from sending to the first piece of text. The ratio mixed / single is taken
round by round; the median decides, the range over rounds is its interval. Target, fixed before the
first run: mixed ≥ 0.85 × single. The server's own histogram of rows per decoding step says how full the
shared steps were (requests join at step boundaries). Before that, in process (``in_process``): the
decoding loop alone, mixed against single, and against PEFT's own mixed batch (``generate(adapter_names=
...)``) on the same rows. The 1-minute load average before each HTTP phase is recorded: on a machine
shared with other work the ratios say little.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LORAKIT_SHARED_DATA", REPO.parent / "shared" / "data"))
TARGET_RATIO = 0.85


def build(root: Path, adapters: int, width: int, layers: int) -> tuple[Path, list[Path]]:
    """The base (GPT-2 tokenizer beside it) and the adapters, written under ``root``."""
    import peft
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=width, n_layer=layers, n_head=width // 64, n_positions=1024)
    base = root / "base"
    GPT2LMHeadModel(config).save_pretrained(base)
    AutoTokenizer.from_pretrained(DATA / "tokenizers" / "gpt2").save_pretrained(base)
    dirs = []
    for i in range(adapters):
        torch.manual_seed(i + 1)
        model = GPT2LMHeadModel.from_pretrained(base)
        lora = peft.LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=["c_attn"],
            fan_in_fan_out=True,
            task_type="CAUSAL_LM",
            init_lora_weights=False,
        )
        peft.get_peft_model(model, lora).save_pretrained(root / f"a{i}")
        dirs.append(root / f"a{i}")
    return base, dirs


def e2e_prompts(count: int) -> list[str]:
    """Real E2E dev meaning representations, as the E2E task prompts them."""
    from lorakit.tasks import get_task

    task = get_task("e2e")
    with (DATA / "e2e" / "devset.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    mrs = list(dict.fromkeys(r["mr"] for r in rows))[:count]
    return [task.prompt_from_input(mr) for mr in mrs]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    base: Path, adapters: list[Path], log: Path, max_tokens: int
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = [a for i, d in enumerate(adapters) for a in ("--adapter", f"a{i}={d}")]
    command = [sys.executable, "-m", "lorakit", "serve", *args, "--base", str(base), "--port", str(port)]
    # PEFT folders decode 64 tokens by default (their /v1/predict decoding), within the cap.
    command += ["--max-new-tokens", str(max(64, max_tokens)), "--log-level", "warning"]
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited {process.returncode}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError("the server did not come up")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.5)


async def one_request(client: httpx.AsyncClient, body: dict[str, Any]) -> tuple[float, int]:
    """(time to first text, completion tokens) of one streamed completion."""
    sent, first, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {await response.aread()!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"] and first is None:
                first = time.perf_counter() - sent
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first if first is not None else float("nan"), tokens


async def phase(
    url: str, models: list[str], prompts: list[str], requests: int, max_tokens: int
) -> dict[str, Any]:
    """Every client (one per entry of ``models``) sends ``requests`` completions in turn."""
    ttfts: list[float] = []
    tokens = 0

    async def client_loop(i: int, model: str, client: httpx.AsyncClient) -> None:
        nonlocal tokens
        for k in range(requests):
            prompt = prompts[(i * requests + k) % len(prompts)]
            # Lengths differ by client, so requests end at different steps and the next ones join the
            # batch while others decode (continuous batching), as under real load.
            length = max(max_tokens - 8 * (i % 3), 1)
            body = {"model": model, "prompt": prompt, "max_tokens": length, "temperature": 0}
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
            ttft, n = await one_request(client, body)
            ttfts.append(ttft)
            tokens += n

    limits = httpx.Limits(max_connections=len(models) + 2)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(i, m, client) for i, m in enumerate(models)))
        seconds = time.perf_counter() - started
    ttfts.sort()
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "ttft_p50_s": ttfts[len(ttfts) // 2],
        "ttft_p90_s": ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))],
    }


def step_rows(url: str) -> tuple[float, float]:
    """(steps, rows summed over steps) from the server's ``lorakit_decode_step_rows`` histogram."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=30).text
    found = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}
    return found.get("lorakit_decode_step_rows_count", 0.0), found.get("lorakit_decode_step_rows_sum", 0.0)


def in_process(base: Path, dirs: list[Path], prompts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """No HTTP: the decoding loop alone (``DecodeEngine``, ``CLIENTS`` rows of greedy decoding from one
    prefill), mixed against single, and PEFT's own mixed batch (``generate(adapter_names=...)``, left-padded)
    on the same rows, interleaved in rounds. Tokens/s = rows × max_tokens over the wall time."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from lorakit.predict import Predictor, read_sources
    from lorakit.serve.decoding import DecodeEngine, DecodeRow, Sampling
    from lorakit.serve.text_stream import TextStream

    specs = [f"a{i}={d}" for i, d in enumerate(dirs)]
    predictor = Predictor(list(read_sources(specs, str(base), None).values()), str(base))
    tok = predictor.tokenizer
    engine = DecodeEngine(predictor.model, None, tok.pad_token_id)  # no end of text: every row runs full
    names = [f"a{i}" for i in range(len(dirs))]
    chosen = prompts[: args.clients]
    encoded = [tok(p, add_special_tokens=False)["input_ids"] for p in chosen]

    def ours(models: list[str]) -> float:
        rows = [
            DecodeRow(m, ids, args.max_tokens, Sampling(0.0), TextStream(tok))
            for m, ids in zip(models, encoded, strict=True)
        ]
        started = time.perf_counter()
        engine.step(rows)
        while engine.rows:
            engine.step([])
        return len(rows) * args.max_tokens / (time.perf_counter() - started)

    model = AutoModelForCausalLM.from_pretrained(base).eval()
    wrapped = peft.PeftModel.from_pretrained(model, str(dirs[0]), adapter_name="a0")
    for i, d in enumerate(dirs[1:], 1):
        wrapped.load_adapter(str(d), adapter_name=f"a{i}")
    tok.padding_side = "left"
    batch = tok(chosen, return_tensors="pt", padding=True, add_special_tokens=False)
    tok.padding_side = "right"

    def peft_mixed(models: list[str]) -> float:
        started = time.perf_counter()
        with torch.no_grad():
            wrapped.generate(
                **batch,
                adapter_names=models,
                do_sample=False,
                max_new_tokens=args.max_tokens,
                min_new_tokens=args.max_tokens,
                pad_token_id=tok.pad_token_id,
            )
        return len(models) * args.max_tokens / (time.perf_counter() - started)

    mixed = [names[i % len(names)] for i in range(args.clients)]
    single = [names[0]] * args.clients
    ours(mixed), peft_mixed(mixed)  # warm-up
    rounds = []
    for r in range(args.rounds):
        kinds = [
            ("mixed", lambda: ours(mixed)),
            ("single", lambda: ours(single)),
            ("peft_mixed", lambda: peft_mixed(mixed)),
        ]
        if r % 2:
            kinds.reverse()
        found = {kind: f() for kind, f in kinds}
        found["mixed_over_single"] = found["mixed"] / found["single"]
        found["mixed_over_peft_mixed"] = found["mixed"] / found["peft_mixed"]
        rounds.append(found)
        print(
            f"in process, round {r + 1}: " + ", ".join(f"{k} {v:.3f}" for k, v in found.items()), flush=True
        )
    summary = {}
    for key in ("mixed_over_single", "mixed_over_peft_mixed", "mixed", "single", "peft_mixed"):
        values = [r[key] for r in rounds]
        summary[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return {"rounds": rounds, "summary": summary}


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, dirs = build(root, args.adapters, args.width, args.layers)
        prompts = e2e_prompts(64)
        engine = in_process(base, dirs, prompts, args)
        process, url = start_server(base, dirs, root / "serve.log", args.max_tokens)
        try:
            names = [f"a{i}" for i in range(args.adapters)]
            mixed = [names[i % len(names)] for i in range(args.clients)]
            single = [names[0]] * args.clients
            asyncio.run(phase(url, mixed, prompts, 1, 4))  # warm-up: first-call costs out of the way
            rounds = []
            for r in range(args.rounds):
                order = [("mixed", mixed), ("single", single)]
                if r % 2:
                    order.reverse()
                result: dict[str, Any] = {}
                for kind, models in order:
                    result[f"{kind}_load_before"] = os.getloadavg()[0]
                    steps0, rows0 = step_rows(url)
                    result[kind] = asyncio.run(phase(url, models, prompts, args.requests, args.max_tokens))
                    steps1, rows1 = step_rows(url)
                    result[kind]["rows_per_step"] = (rows1 - rows0) / max(steps1 - steps0, 1)
                result["ratio"] = result["mixed"]["tokens_per_s"] / result["single"]["tokens_per_s"]
                rounds.append(result)
                print(
                    f"round {r + 1}: mixed {result['mixed']['tokens_per_s']:.1f} tok/s, single "
                    f"{result['single']['tokens_per_s']:.1f} tok/s, ratio {result['ratio']:.3f}",
                    flush=True,
                )
        finally:
            process.terminate()
            process.wait(60)
    ratios = [r["ratio"] for r in rounds]
    median = statistics.median(ratios)

    def med(kind: str, key: str) -> float:
        return statistics.median(r[kind][key] for r in rounds)

    return {
        "command": "python scripts/bench_generation_serve.py " + " ".join(sys.argv[1:]),
        "setup": {
            "base": f"GPT-2 shape, n_embd {args.width}, {args.layers} layers, random weights",
            "adapters": args.adapters,
            "lora": "r 8, alpha 16, c_attn, random A and B (PEFT)",
            "clients": args.clients,
            "requests_per_client": args.requests,
            "max_tokens": args.max_tokens,
            "prompts": "E2E dev meaning representations in the E2E prompt form, greedy",
            "rounds": args.rounds,
        },
        # Other work on the machine shares its cores: the 1-minute load average before each phase is kept
        # in the rounds (2 CPUs: a load over 2 means the phases ran beside other processes).
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "rounds": rounds,
        "in_process": engine,
        "summary": {
            "ratio_median": median,
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "mixed_tokens_per_s_median": med("mixed", "tokens_per_s"),
            "single_tokens_per_s_median": med("single", "tokens_per_s"),
            "mixed_ttft_p50_s_median": med("mixed", "ttft_p50_s"),
            "single_ttft_p50_s_median": med("single", "ttft_p50_s"),
            "mixed_rows_per_step_median": med("mixed", "rows_per_step"),
            "single_rows_per_step_median": med("single", "rows_per_step"),
            "target_ratio_min": TARGET_RATIO,
            "target_met": median >= TARGET_RATIO,
        },
    }


def render(r: dict[str, Any]) -> list[str]:
    """The generation-serving section of RESULTS.md, its target met or **no**."""
    s, setup, inp = r["summary"], r["setup"], r["in_process"]["summary"]
    loads = [x[f"{k}_load_before"] for x in r["rounds"] for k in ("mixed", "single")]

    def spread(v: dict[str, float]) -> str:
        return f"{v['median']:.3f} [{v['min']:.3f}, {v['max']:.3f}]"

    from bench_format import table

    ratio = f"{s['ratio_median']:.3f} [{s['ratio_min']:.3f}, {s['ratio_max']:.3f}]"
    met = "yes" if s["target_met"] else "**no**"

    return [
        "## `lorakit serve` generation: OpenAI routes, mixed-adapter decoding",
        "",
        f"{setup['base']}; {setup['adapters']} adapters ({setup['lora']}); {setup['clients']} streaming "
        f"clients × {setup['requests_per_client']} requests of up to {setup['max_tokens']} tokens "
        f"({setup['prompts']}); {setup['rounds']} rounds, mixed and single interleaved on one server; "
        f"{r['machine']['cpus']} CPUs, load average {min(loads):.1f}–{max(loads):.1f} before the phases. "
        "New requests join the decoding batch at step boundaries. Medians over rounds, the range in "
        f"brackets. `{r['command'].strip()}` (benchmarks/serve-generation.json).",
        "",
        *table(
            ["measure", "mixed (client i: adapter i mod n)", "one adapter", "ratio, median [range]"]
            + ["target", "met"],
            [
                ["generated tokens/s over HTTP", f"{s['mixed_tokens_per_s_median']:.1f}"]
                + [f"{s['single_tokens_per_s_median']:.1f}", ratio, f"≥ {s['target_ratio_min']:.2f}×", met],
                ["time to first token p50", f"{s['mixed_ttft_p50_s_median']:.2f} s"]
                + [f"{s['single_ttft_p50_s_median']:.2f} s", "", "", ""],
                ["rows per decoding step", f"{s['mixed_rows_per_step_median']:.2f}"]
                + [f"{s['single_rows_per_step_median']:.2f}", "", "", ""],
            ],
        ),
        f"In process (the decoding loop alone): mixed / single {spread(inp['mixed_over_single'])}; mixed / "
        f"PEFT's mixed batch (`generate(adapter_names=...)`) {spread(inp['mixed_over_peft_mixed'])}.",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks")
    parser.add_argument("--adapters", type=int, default=3)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--requests", type=int, default=2, help="completions per client and phase")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    args = parser.parse_args()
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve-generation.json").write_text(json.dumps(result, indent=2) + "\n")
    s = result["summary"]
    print(
        f"mixed / single tokens/s: {s['ratio_median']:.3f} "
        f"(range {s['ratio_min']:.3f}-{s['ratio_max']:.3f}); "
        f"target >= {TARGET_RATIO}: {'met' if s['target_met'] else 'missed'}"
    )
    import bench_report  # scripts/ is on the path when this file runs

    print(f"[bench] wrote {bench_report.render(args.out)}")


if __name__ == "__main__":
    main()
