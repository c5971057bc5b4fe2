"""The benchmark script on tiny inputs: adapter sizes through the real command line, training steps,
inference and one adapted layer on a tiny model, through ``bench.main``; the JSON's fields and RESULTS.md's
targets are checked, never timings. The quality benchmark's plumbing: test_bench_quality.py."""

from __future__ import annotations

import collections
import itertools
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"


@pytest.fixture()
def bench(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))  # spawned workers inherit sys.path, so they find it too
    import bench

    return bench


def test_quick_sizes_writes_json_and_results(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench.py"), "--quick", "--only", "sizes", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "quick" / "sizes.json").read_text())
    assert data["section"] == "sizes" and data["quick"] is True
    assert {"device", "torch", "peft", "torch_threads"} <= set(data["environment"])
    models = {m["model"]: m for m in data["result"]["models"]}
    base = models["roberta-base"]
    assert base["lora_params"] == 294_912  # the paper's 0.3M: 12 layers · 2 · 8 · (768 + 768)
    # The file holds the A/B tensors as float32 plus a small header and config.
    assert 4 * base["lora_params"] < base["adapter_bytes_lora_only"] < 4 * base["lora_params"] + 65_536
    assert base["adapter_bytes_with_head"] > base["adapter_bytes_lora_only"]
    assert models["gpt2-medium"]["lora_params"] == 393_216
    results = (tmp_path / "quick" / "RESULTS.md").read_text()
    assert "## Adapter size against model size" in results
    assert "| roberta-base | 8 | 294,912 | 0.3M |" in results


def _target(results: str, name: str) -> str:
    (row,) = [line for line in results.splitlines() if line.startswith(f"| {name} |")]
    return row


def test_one_step_timing_on_a_tiny_model(bench, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = bench._plan(quick=True)
    tiny = {
        "speed": [("roberta-tiny", 2, 16, 3, 2)],  # 3 rounds, full fine-tuning in the first 2
        "layers": [("roberta-tiny", 2, 16, 2)],
    }
    monkeypatch.setattr(bench, "_plan", lambda quick: {**plan, **tiny})
    assert bench.main(["--quick", "--only", "speed", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "quick" / "speed.json").read_text())
    (model,) = data["result"]["models"]
    assert model["model"] == "roberta-tiny" and model["batch"] == 2 and model["seq"] == 16
    contenders = model["contenders"]
    assert set(contenders) == {"lorakit", "peft", "full"}
    for name, c in contenders.items():
        reps = 2 if name == "full" else 3
        assert c["reps"] == reps and len(c["times_s"]) == reps and c["median_s"] > 0
        assert c["peak_memory_bytes"] > 0 and c["trainable"] > 0
    # Same targets, rank and head: both LoRA contenders train exactly the same number of parameters.
    assert contenders["lorakit"]["trainable"] == contenders["peft"]["trainable"]
    assert contenders["lorakit"]["trainable"] < contenders["full"]["trainable"]
    # Round by round: round i is each contender's i-th step.
    rounds = model["round_ratios"]
    assert set(rounds) == {"lorakit_over_peft", "lorakit_over_full", "peft_over_full"}
    ours, peft = contenders["lorakit"]["times_s"], contenders["peft"]["times_s"]
    ratios = [a / b for a, b in zip(ours, peft, strict=True)]
    assert rounds["lorakit_over_peft"]["ratios"] == pytest.approx(ratios)
    assert rounds["lorakit_over_peft"]["ratio_median"] == pytest.approx(statistics.median(ratios))
    low, high = rounds["lorakit_over_peft"]["ratio_ci95"]
    assert min(ratios) <= low <= rounds["lorakit_over_peft"]["ratio_median"] <= high <= max(ratios)
    full = contenders["full"]["times_s"]  # against full: the rounds it ran in
    assert rounds["lorakit_over_full"]["ratios"] == pytest.approx(
        [a / b for a, b in zip(ours[:2], full, strict=True)]
    )
    (layer,) = data["result"]["layers"]
    assert layer["module"] == "query" and layer["tokens"] == 32
    assert set(layer["contenders"]) == {"base", "lorakit", "peft"}
    assert layer["mode"] == "forward+backward" and layer["calls_per_unit"] == 1
    # Overheads are per-round differences: round i is each contender's i-th pass.
    times = {k: c["times_s"] for k, c in layer["contenders"].items()}
    for key, (a, b) in {
        "lorakit_overhead": ("lorakit", "base"),
        "peft_overhead": ("peft", "base"),
        "lorakit_minus_peft": ("lorakit", "peft"),
    }.items():
        diffs = [x - y for x, y in zip(times[a], times[b], strict=True)]
        assert layer["rounds"][key]["differences_s"] == pytest.approx(diffs)
        assert layer["rounds"][key]["median_s"] == pytest.approx(statistics.median(diffs))
    results = (tmp_path / "quick" / "RESULTS.md").read_text()
    assert results.index("## Rules") < results.index("## Targets") < results.index("## Training step")
    # Each target is met on its median alone, and one that is missed says **no**.
    row = _target(results, "roberta-tiny 2×16: LoRA step ≤ 1.00× PEFT's")
    median = rounds["lorakit_over_peft"]["ratio_median"]
    assert f"| {median:.3f} [{low:.3f}, {high:.3f}] |" in row
    assert row.endswith("| yes |" if median <= 1.0 else "| **no** |")
    row = _target(results, "roberta-tiny 2×16: LoRA peak memory ≤ 0.80× full's")
    memory = model["ratios"]["memory_lorakit_over_full"]
    assert row.endswith("| yes |" if memory <= 0.8 else "| **no** |")
    diff = layer["rounds"]["lorakit_minus_peft"]["median_s"]
    row = _target(results, "roberta-tiny query, 32 tokens, forward+backward: LoRA overhead − PEFT's ≤ 0")
    assert row.endswith("| yes |" if diff <= 0 else "| **no** |")
    assert "| roberta-tiny 2×16 | lorakit LoRA |" in results and "## One adapted layer" in results
    assert "aim" not in results
    assert (tmp_path / "quick" / "train_step.png").is_file()


def test_structure_tells_an_adapted_model_from_its_base(bench) -> None:
    import copy

    from bench_common import SHAPES, apply_contender, build_base
    from bench_speed import _structure

    shape = SHAPES["roberta-tiny"]
    base = build_base(shape).eval()
    assert _structure(copy.deepcopy(base)) == _structure(base)
    assert _structure(copy.deepcopy(base).train()) != _structure(base)  # dropout would run
    assert _structure(apply_contender(copy.deepcopy(base), shape, "lorakit", 4, 8.0)) != _structure(base)
    assert _structure(copy.deepcopy(base).half()) != _structure(base)


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_round_orders_balance_who_runs_first_and_after_whom(bench, n: int) -> None:
    """Over a full cycle of rows, each name runs first equally often and follows every other name
    equally often: no contender always inherits the same predecessor's caches."""
    from bench_common import round_orders

    names = "ABCDE"[:n]
    cycle = n if n % 2 == 0 else 2 * n
    orders = round_orders(names, cycle)
    assert all(sorted(order) == list(names) for order in orders)
    firsts = collections.Counter(order[0] for order in orders)
    assert set(firsts.values()) == {cycle // n}
    follows = collections.Counter(pair for order in orders for pair in itertools.pairwise(order))
    assert len(follows) == n * (n - 1) and len(set(follows.values())) == 1
    assert round_orders(names, cycle + 1)[-1] == orders[0]  # the cycle repeats


def test_ratio_stats_takes_ratios_round_by_round(bench) -> None:
    from bench_common import ratio_stats

    # Round 2 ran on a machine twice as slow for both sides: its ratio is unaffected.
    num = [(2.0, 4.0), (6.0, 12.0), (3.0, 5.0)]
    den = [(1.0, 2.0), (3.0, 6.0), (1.0, 1.0)]
    stats = ratio_stats(num, den)
    assert stats["ratios"] == [2.0, 2.0, 3.0]
    assert stats["ratio_median"] == 2.0 and stats["cpu_ratio_median"] == 2.0
    low, high = stats["ratio_ci95"]
    assert 2.0 <= low <= high <= 3.0


def test_inference_on_a_tiny_model(bench, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = bench._plan(quick=True)
    monkeypatch.setattr(
        bench,
        "_plan",
        lambda quick: {
            **plan,
            "inference": ("roberta-tiny", (1, 3), 16, (2, 3)),
            "inference_layers": [("roberta-tiny", 1, 16, 3, 8, False)],
        },
    )
    assert bench.main(["--quick", "--only", "inference", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "quick" / "inference.json").read_text())["result"]
    diffs = result["max_abs_diff_vs_lorakit_unmerged"]
    # Merging changes nothing but rounding; the adapter itself moves the logits; PEFT has the same adapter.
    assert diffs["lorakit_merged"] < 1e-5 and diffs["peft_unmerged"] < 1e-5
    assert diffs["base"] > 1e-6 and diffs["base"] > 10 * diffs["lorakit_merged"]
    assert result["merged_structure_is_base"] is True
    assert set(result["batches"]) == {"1", "3"}
    for rows, reps in (("1", 2), ("3", 3)):
        stats = result["batches"][rows]
        base = stats["base"]["times_s"]
        for name in ("lorakit_unmerged", "lorakit_merged", "peft_unmerged"):
            rr = stats[name]["round_ratio_to_base"]
            assert rr["ratios"] == pytest.approx(
                [a / b for a, b in zip(stats[name]["times_s"], base, strict=True)]
            )
            assert len(rr["ratios"]) == reps
        assert stats["base"]["round_ratio_to_base"]["ratio_median"] == 1.0
        vs_peft = stats["lorakit_unmerged"]["round_ratio_to_peft"]["ratios"]
        ours, theirs = stats["lorakit_unmerged"]["times_s"], stats["peft_unmerged"]["times_s"]
        assert vs_peft == pytest.approx([a / b for a, b in zip(ours, theirs, strict=True)])
    (layer,) = result["layers"]
    assert layer["mode"] == "inference forward" and layer["tokens"] == 16
    assert layer["calls_per_unit"] == 512 // 16 and layer["contenders"]["base"]["reps"] == 3
    assert set(layer["contenders"]) == {"base", "lorakit", "peft", "merged"}
    merged, base = layer["contenders"]["merged"]["times_s"], layer["contenders"]["base"]["times_s"]
    assert layer["rounds"]["merged_over_base"]["ratios"] == pytest.approx(
        [a / b for a, b in zip(merged, base, strict=True)]
    )
    results = (tmp_path / "quick" / "RESULTS.md").read_text()
    assert "## Inference latency: roberta-tiny, seq 16, r = 8" in results
    for rows in ("1", "3"):
        merged = result["batches"][rows]["lorakit_merged"]["round_ratio_to_base"]["ratio_median"]
        row = _target(results, f"roberta-tiny batch {rows}×16: merged ≤ 1.02× base")
        assert row.endswith("| yes |" if merged <= 1.02 else "| **no** |")
        _target(results, f"roberta-tiny batch {rows}×16: unmerged ≤ 1.00× PEFT unmerged")
    _target(results, "roberta-tiny query, 16 tokens, inference forward: LoRA overhead − PEFT's ≤ 0")
    assert (tmp_path / "quick" / "inference.png").is_file()


def test_layer_benchmark_adapts_gpt2_slices_as_each_library_does(bench) -> None:
    import bench_speed

    from lorakit.lora import count_parameters

    result = bench_speed.layer_benchmark("gpt2-small4", 1, 4, 1)
    assert result["module"] == "c_attn (q|k|v)" and result["tokens"] == 4
    ours = bench_speed._one_layer(bench_speed.SHAPES["gpt2-small4"], "lorakit", 8)
    theirs = bench_speed._one_layer(bench_speed.SHAPES["gpt2-small4"], "peft", 8)
    # q and v at rank r each against c_attn whole at rank r: the same number of LoRA parameters.
    assert count_parameters(ours).trainable == count_parameters(theirs).trainable == 8 * (256 + 3 * 256)


def test_the_bf16_step_runs_under_autocast_with_float32_weights_and_has_its_own_targets(
    bench, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bench_speed
    import torch
    from bench_common import SHAPES, apply_contender, build_base

    from lorakit.training.optimization import build_optimizer

    shape = SHAPES["roberta-tiny"]
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = apply_contender(build_base(shape), shape, "lorakit", 8, 16.0).train()
        optimizer = build_optimizer(model, 1e-2, 0.0)
        seen = []
        model.classifier.dense.register_forward_hook(lambda m, i, out, seen=seen: seen.append(out.dtype))
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        batch = bench_speed.make_batch(shape, 2, 16, torch.device("cpu"))
        bench_speed._train_step(model, optimizer, batch, "classification", precision)
        assert seen == [dtype]  # the head's matmul ran in the autocast dtype
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        assert {p.dtype for p in trainable.values()} == {torch.float32}
        assert any(not torch.equal(p, before[n]) for n, p in trainable.items())

    plan = bench._plan(quick=True)
    monkeypatch.setattr(bench, "_plan", lambda quick: {**plan, "speed": [("roberta-tiny", 2, 16, 2, 2)]})
    assert bench.main(["--quick", "--only", "speed-bf16", "--out", str(tmp_path)]) == 0
    (model_result,) = json.loads((tmp_path / "quick" / "speed-bf16.json").read_text())["result"]["models"]
    assert model_result["precision"] == "bf16" and set(model_result["contenders"]) == {
        "lorakit",
        "peft",
        "full",
    }
    results = (tmp_path / "quick" / "RESULTS.md").read_text()
    assert "roberta-tiny 2×16 bf16: LoRA step ≤ 0.95× PEFT's" in results
    assert "roberta-tiny 2×16 bf16: LoRA step ≤ 0.70× full's" in results
    assert (
        "Training step under bf16 autocast" in results
        and (tmp_path / "quick" / "train_step_bf16.png").is_file()
    )


def test_inference_under_bf16_autocast(bench, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = bench._plan(quick=True)
    monkeypatch.setattr(
        bench, "_plan", lambda quick: {**plan, "inference": ("roberta-tiny", (1, 3), 16, (2, 2))}
    )
    assert bench.main(["--quick", "--only", "inference-bf16", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "quick" / "inference-bf16.json").read_text())["result"]
    assert result["precision"] == "bf16" and result["merged_structure_is_base"] is True
    diffs = result["max_abs_diff_vs_lorakit_unmerged"]
    # bf16 rounds the merged weight and PEFT's separate matmuls differently, within bf16's precision.
    assert diffs["lorakit_merged"] < 0.05 and diffs["peft_unmerged"] < 0.05
    assert diffs["base"] > diffs["lorakit_merged"]
    results = (tmp_path / "quick" / "RESULTS.md").read_text()
    assert "## Inference latency under bf16 autocast: roberta-tiny, seq 16, r = 8" in results
    for rows in ("1", "3"):
        merged = result["batches"][rows]["lorakit_merged"]["round_ratio_to_base"]["ratio_median"]
        row = _target(results, f"roberta-tiny batch {rows}×16 bf16: merged ≤ 1.02× base")
        assert row.endswith("| yes |" if merged <= 1.02 else "| **no** |")
    assert (tmp_path / "quick" / "inference_bf16.png").is_file()


@pytest.mark.slow
def test_whole_run_times_both_processes_and_reports_where_time_went(
    bench, shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bench_report
    import bench_whole_run
    import torch
    from bench_common import environment

    from lorakit.runs import write_json

    monkeypatch.setattr(bench_whole_run, "ROWS", 64)
    # bf16 on a CPU without bf16 instructions is recorded as not measured, not timed emulated.
    monkeypatch.setattr(bench_whole_run, "cpu_has_bf16", lambda: False)
    result = bench_whole_run.whole_run_section(shared_data / "glue", rounds=2, precisions=("fp32", "bf16"))
    assert set(result["precisions"]) == {"fp32"} and "AVX-512 BF16" in result["not_measured"]["bf16"]
    p = result["precisions"]["fp32"]
    for lorakit, trainer in zip(p["runs"]["lorakit"], p["runs"]["trainer"], strict=True):
        for run in (lorakit, trainer):
            assert set(run["seconds"]) == set(bench_whole_run.PHASES)
            assert sum(run["seconds"].values()) <= run["wall_s"] and 0 <= run["accuracy"] <= 100
    pairs = zip(p["runs"]["lorakit"], p["runs"]["trainer"], strict=True)
    assert p["ratios"] == [pytest.approx(a["wall_s"] / b["wall_s"]) for a, b in pairs]
    # The second lorakit run read its rows from the tokenized-rows cache the first wrote.
    assert result["later_runs_read_the_cache"] is True
    write_json(
        tmp_path / "whole-run.json",
        {
            "section": "whole-run",
            "quick": True,
            "seconds": 1.0,
            "environment": environment(torch.device("cpu")),
            "result": result,
        },
    )
    results = bench_report.render(tmp_path).read_text()
    row = _target(results, "MiniLM SST-2 whole `lorakit train` fp32: wall ≤ 0.60× Trainer + PEFT")
    assert row.endswith("| yes |" if p["ratio_median"] <= 0.6 else "| **no** |")
    assert "| fp32 | Trainer + PEFT |" in results
    row = _target(results, "MiniLM SST-2 whole `lorakit train` bf16: wall ≤ 0.60× Trainer + PEFT")
    assert "not measured: this CPU has no AVX-512 BF16" in row and row.endswith("| **no** |")
    assert "bf16: not measured in this run" in results
    assert "the 1 after it read them from the tokenized-rows cache" in results


def test_the_own_data_section_says_no_when_the_demo_differs_from_the_built_in_task(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import bench_report
    import own_data

    measured = json.loads((REPO / "benchmarks" / "own-data.json").read_text())
    assert "rows: yes; the two adapter files are byte-identical" in own_data.render(measured)
    measured["demo_rule_met"], measured["demo_adapters_identical"] = False, False
    (tmp_path / "own-data.json").write_text(json.dumps(measured))
    text = bench_report.render(tmp_path).read_text()
    assert "## Your own data" in text and "rows: **no**; the two adapter files are **not** identical" in text


def test_the_llama_shape_is_a_350m_decoder_adapted_on_q_proj_and_v_proj(bench) -> None:
    """The modern decoder's shape from its config alone, on the meta device (no 350M weights): about 350M
    parameters, a causal LM, and both LoRA contenders adapt q_proj and v_proj with the same count."""
    import torch
    from bench_common import SHAPES, apply_contender, build_base

    from lorakit.lora import count_parameters

    shape = SHAPES["llama-350m"]
    assert shape.family == "llama" and shape.decoder and shape.heads == ()
    assert shape.lorakit_targets == shape.peft_targets == ["q_proj", "v_proj"]
    c = shape.config
    assert (c["hidden_size"], c["num_hidden_layers"], c["num_key_value_heads"]) == (1024, 24, 8)
    with torch.device("meta"):
        model = build_base(shape)
    assert type(model).__name__ == "LlamaForCausalLM"
    # 24 · (q, o 1024² + k, v 1024·512 + SwiGLU 3 · 1024·2816 + 2 norms) + untied embedding and head + norm
    layer = 2 * 1024**2 + 2 * 1024 * 512 + 3 * 1024 * 2816 + 2 * 1024
    assert count_parameters(model).total == 24 * layer + 2 * 32000 * 1024 + 1024 == 348_701_696
    # r = 8 on q_proj (1024 → 1024) and v_proj (1024 → 512, grouped-query) in every layer.
    lora = 24 * 8 * ((1024 + 1024) + (1024 + 512))
    for contender in ("lorakit", "peft"):
        with torch.device("meta"):
            adapted = apply_contender(build_base(shape), shape, contender, 8, 16.0)
        assert count_parameters(adapted).trainable == lora == 688_128


def test_the_llama_step_section_on_a_tiny_llama(
    bench, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = bench._plan(quick=True)
    assert [spec[0] for spec in bench._plan(quick=False)["speed_llama"]] == ["llama-350m"]
    monkeypatch.setattr(bench, "_plan", lambda quick: {**plan, "speed_llama": [("llama-tiny", 2, 16, 3, 2)]})
    assert bench.main(["--quick", "--only", "speed-llama", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "quick" / "speed-llama.json").read_text())
    (model,) = data["result"]["models"]
    assert model["model"] == "llama-tiny" and (model["batch"], model["seq"], model["r"]) == (2, 16, 8)
    contenders = model["contenders"]
    assert {k: c["reps"] for k, c in contenders.items()} == {"lorakit": 3, "peft": 3, "full": 2}
    # q_proj 32 → 32 and v_proj 32 → 16 (2 key/value heads of 8), r = 8, 2 layers; no head trains.
    assert contenders["lorakit"]["trainable"] == contenders["peft"]["trainable"] == 2 * 8 * (64 + 48)
    shape = data["result"]["shapes"]["llama-tiny"]
    assert shape["family"] == "llama" and shape["lorakit_targets"] == ["q_proj", "v_proj"]
    results = (tmp_path / "quick" / "RESULTS.md").read_text()
    assert "## Training step, a modern decoder: Llama architecture, 0.1M parameters" in results
    rounds = model["round_ratios"]
    for name, key, bound in (("PEFT's", "lorakit_over_peft", 1.0), ("full's", "lorakit_over_full", 0.75)):
        row = _target(results, f"llama-tiny 2×16: LoRA step ≤ {bound:.2f}× {name}")
        median = rounds[key]["ratio_median"]
        low, high = rounds[key]["ratio_ci95"]
        assert f"| {median:.3f} [{low:.3f}, {high:.3f}] |" in row
        assert row.endswith("| yes |" if median <= bound else "| **no** |")
    assert "--quick --only speed-llama" in results
    assert not list((tmp_path / "quick").glob("*.png"))  # a table, no plot


def test_the_overload_run_is_rendered_with_its_targets_and_says_no_when_missed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """RESULTS.md takes scripts/bench_overload.py's JSON: its section, its note and its rows in the
    Targets table, each target's verdict read from the run (a missed one is **no**)."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import bench_report

    measured = json.loads((REPO / "benchmarks" / "serve-overload.json").read_text())
    (tmp_path / "serve-overload.json").write_text(json.dumps(measured))
    text = bench_report.render(tmp_path).read_text()
    assert "## `lorakit serve` under overload" in text and measured["note"] in text
    t = measured["throughput_ratio"]
    row = _target(text, "serve overload: accepted rows/s >= 0.9x unloaded")
    assert f"| {t['median']:.3f} [range {t['min']:.3f}, {t['max']:.3f}] |" in row
    assert row.endswith(
        "| yes |" if measured["targets"]["accepted rows/s >= 0.9x unloaded"] else "| **no** |"
    )
    measured["targets"]["peak RSS <= 1.10x unloaded"] = False
    (tmp_path / "serve-overload.json").write_text(json.dumps(measured))
    text = bench_report.render(tmp_path).read_text()
    assert _target(text, "serve overload: peak RSS <= 1.10x unloaded").endswith("| **no** |")
    assert "| ≤ 1.10× | **no** |" in text


@pytest.mark.slow  # 90 s on 2 cores: three training workers and three 16-adapter servers
def test_the_quantized_base_section_measures_nf4_and_int8_against_the_float32_base(
    bench, tmp_path: Path
) -> None:
    """The quick quant section on small shapes whose layers nf4 can block: the quantized bases hold fewer
    base bytes, their 16-adapter mixed batches stay close to the float32 base's, and every target row of
    RESULTS.md reads its verdict from the measured ratio."""
    assert bench.main(["--quick", "--only", "quant", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "quick" / "quant.json").read_text())["result"]
    t, s = r["training"], r["serving"]
    assert set(t["contenders"]) == {"lorakit", "lorakit-nf4", "lorakit-int8"}
    # The same LoRA trains on each base; the quantized ones hold far fewer base bytes.
    assert len({c["trainable"] for c in t["contenders"].values()}) == 1
    assert (
        t["base_bytes_ratios"]["lorakit-nf4_over_lorakit"]
        < t["base_bytes_ratios"]["lorakit-int8_over_lorakit"]
        < 0.6
    )
    assert {c["reps"] for c in t["contenders"].values()} == {2}
    for m in ("nf4", "int8"):
        assert s["memory"][m]["base_bytes"] < s["memory"]["none"]["base_bytes"]
        assert 0 < s["max_abs_logit_diff_vs_float32"][m] < 0.5  # quantized, and still the same model
    results = (tmp_path / "quick" / "RESULTS.md").read_text()
    assert "## Quantized base (model.quantize): gpt2-small4 training, roberta-small serving" in results
    nf4 = t["base_bytes_ratios"]["lorakit-nf4_over_lorakit"]
    row = _target(results, "gpt2-small4: nf4 base weight bytes ≤ 0.30× float32")
    assert f"| {nf4:.3f} |" in row and row.endswith("| yes |" if nf4 <= 0.30 else "| **no** |")
    step = t["round_ratios"]["lorakit-int8_over_lorakit"]
    row = _target(results, "gpt2-small4 4×64 int8: step ≤ 1.5× float32 base")
    assert row.endswith("| yes |" if step["ratio_median"] <= 1.5 else "| **no** |")


def test_the_generation_serving_run_is_rendered_with_its_target(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """RESULTS.md takes scripts/bench_generation_serve.py's JSON: its section and its target's verdict."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import bench_report

    measured = json.loads((REPO / "benchmarks" / "serve-generation.json").read_text())
    s = measured["summary"]
    for met in (True, False):
        s["target_met"] = met
        (tmp_path / "serve-generation.json").write_text(json.dumps(measured))
        text = bench_report.render(tmp_path).read_text()
        assert "## `lorakit serve` generation: OpenAI routes, mixed-adapter decoding" in text
        row = _target(text, "serve generation: mixed-adapter tokens/s ≥ 0.85× one adapter's")
        assert f"| {s['ratio_median']:.3f} [range {s['ratio_min']:.3f}, {s['ratio_max']:.3f}] |" in row
        assert row.endswith("| yes |" if met else "| **no** |")
