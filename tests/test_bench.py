"""The benchmark script's cheap paths: adapter sizes through the real command line, and one training
step per contender on a tiny model through ``bench.main``. Fields are checked, never timings."""

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


def test_one_step_timing_on_a_tiny_model(bench, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = bench._plan(quick=True)
    tiny = {
        "speed": [("roberta-tiny", 2, 16, 3, 2)],  # 3 rounds, full fine-tuning in the first 2
        "paired": [("roberta-tiny", 2, 16, 3)],
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
    assert {"time_lorakit_over_peft", "time_lorakit_over_full", "memory_lorakit_over_full"} <= set(
        model["ratios"]
    )
    # Round by round: round i is each contender's i-th step.
    rounds = model["round_ratios"]
    assert set(rounds) == {"lorakit_over_peft", "lorakit_over_full", "peft_over_full"}
    ours, peft = contenders["lorakit"]["times_s"], contenders["peft"]["times_s"]
    assert rounds["lorakit_over_peft"]["ratios"] == pytest.approx(
        [a / b for a, b in zip(ours, peft, strict=True)]
    )
    assert rounds["lorakit_over_peft"]["ratio_median"] == pytest.approx(
        statistics.median(a / b for a, b in zip(ours, peft, strict=True))
    )
    full = contenders["full"]["times_s"]  # against full: the rounds it ran in
    assert rounds["lorakit_over_full"]["ratios"] == pytest.approx(
        [a / b for a, b in zip(ours[:2], full, strict=True)]
    )
    (pair,) = data["result"]["paired"]
    assert pair["pairs"] == 3 and len(pair["ratios"]) == 3
    assert pair["first"]["reps"] == pair["second"]["reps"] == 3
    low, high = pair["ratio_ci95"]
    assert min(pair["ratios"]) <= low <= pair["ratio_median"] <= high <= max(pair["ratios"])
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
    assert "## Training step" in results and "## Targets" in results
    assert "### lorakit against PEFT, in pairs" in results and "| roberta-tiny | 2 × 16 | 3 |" in results
    assert "### One adapted layer, forward and backward" in results
    assert "| roberta-tiny: lorakit step no slower than PEFT's (aim 0.90) | step in pairs " in results
    ours_over, peft_over = (layer["rounds"][k]["median_s"] for k in ("lorakit_overhead", "peft_overhead"))
    ratio = layer["overhead_lorakit_over_peft"]
    if peft_over > 0:
        assert ratio == pytest.approx(ours_over / peft_over)
    else:  # a tiny layer's overhead can come out ≤ 0 on a noisy machine: no ratio then
        assert ratio is None
    (row,) = [line for line in results.splitlines() if "lorakit step no slower than PEFT's" in line]
    assert "; query overhead " in row and " vs PEFT's " in row and "lorakit − PEFT " in row
    assert row.endswith("| yes |") == (ours_over <= peft_over and pair["ratio_ci95"][0] <= 1.0)
    assert "| roberta-tiny | 2 × 16 | lorakit LoRA |" in results
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
    assert "| batch 3: merged within 2% of the base model |" in results
    assert (
        "| batch 1: merged within 2% of the base model | the base model's modules, shapes and dtypes: yes; "
        in results
    )
    assert "| batch 1: unmerged overhead ≤ PEFT's | query overhead " in results
    assert "### One adapted layer, inference forward" in results
    assert (tmp_path / "quick" / "inference.png").is_file()


def test_layer_benchmark_adapts_gpt2_slices_as_each_library_does(bench) -> None:
    import bench_speed

    result = bench_speed.layer_benchmark("gpt2-small4", 1, 4, 1)
    assert result["module"] == "c_attn (q|k|v)" and result["tokens"] == 4
    ours = bench_speed._one_layer(bench_speed.SHAPES["gpt2-small4"], "lorakit", 8)
    theirs = bench_speed._one_layer(bench_speed.SHAPES["gpt2-small4"], "peft", 8)
    count = lambda m: sum(p.numel() for n, p in m.named_parameters() if "lora_" in n)  # noqa: E731
    # q and v at rank r each against c_attn whole at rank r: the same number of LoRA parameters.
    assert count(ours) == count(theirs) == 8 * (256 + 3 * 256)


def test_sweep_picks_each_tasks_rates_then_quality_and_variants_train_with_them(
    bench, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real MiniLM on a few real SST-2 rows: every grid point is trained and scored on held-out
    training rows, the best of each method is its pick, and the quality section then trains with it."""
    from bench_quality import LORA_VARIANTS, SWEEP_LR, TaskPlan

    plan = bench._plan(quick=True)
    tiny = TaskPlan("sst2", "SST-2", 32, 1, eval_rows=32)
    monkeypatch.setattr(
        bench,
        "_plan",
        lambda quick: {
            **plan,
            "quality": [tiny],
            "lr_sweep": [(tiny, 24)],
            "lora_variants": (tiny, 24, 48),
            "quality_seeds": [(tiny, (1,))],
        },
    )
    argv = ["--quick", "--only", "lr-sweep", "--only", "quality", "--only", "lora-variants"]
    argv += ["--only", "quality-seeds"]
    assert bench.main([*argv, "--out", str(tmp_path)]) == 0
    sweep = json.loads((tmp_path / "quick" / "lr-sweep.json").read_text())["result"]
    (task,) = sweep["tasks"]
    assert task["task"] == "sst2" and task["heldout_rows"] == 24
    assert sorted((r["method"], r["lr"]) for r in task["runs"]) == sorted(
        [("lora", lr) for lr in SWEEP_LR["lora"]] + [("full", lr) for lr in SWEEP_LR["full"]]
    )
    for method in ("lora", "full"):
        best = max((r for r in task["runs"] if r["method"] == method), key=lambda r: r["main"])
        assert task["picks"][method] == best["lr"]
    quality = json.loads((tmp_path / "quick" / "quality.json").read_text())["result"]
    contenders = quality["tasks"][0]["contenders"]
    assert contenders["lorakit"]["lr"] == contenders["peft"]["lr"] == task["picks"]["lora"]
    assert contenders["full"]["lr"] == task["picks"]["full"]
    assert quality["tasks"][0]["eval_split"] == "dev" and quality["tasks"][0]["eval_rows"] == 32
    variants = json.loads((tmp_path / "quick" / "lora-variants.json").read_text())["result"]
    runs = variants["runs"]
    # Full fine-tuning, each LoRA setup, then full fine-tuning and lorakit's default on twice the rows.
    assert len(runs) == 1 + len(LORA_VARIANTS) + 2
    assert [r["train_rows"] for r in runs] == [32] * (1 + len(LORA_VARIANTS)) + [48, 48]
    assert all(r["lr"] == task["picks"]["lora"] for r in runs if r["setup"].startswith("LoRA"))
    trainable = {r["setup"]: r["trainable"] for r in runs if r["train_rows"] == 32}
    default, frozen_pooler, every_linear = (trainable["LoRA: " + k] for k in list(LORA_VARIANTS)[:3])
    assert frozen_pooler == default - (384 * 384 + 384)  # the pooler's dense layer stays frozen
    assert every_linear > default
    # Seed 1: another training draw, at the swept rates; the targets then take medians over seeds 0 and 1.
    (seeded,) = json.loads((tmp_path / "quick" / "quality-seeds.json").read_text())["result"]["tasks"]
    (run,) = seeded["runs"]
    assert run["seed"] == 1 and set(run) == {"seed", "lorakit", "full"}
    scores = {n: [contenders[n]["main"], run[n]] for n in ("lorakit", "full")}
    gap = statistics.median(scores["lorakit"]) - statistics.median(scores["full"])
    results = (tmp_path / "quick" / "RESULTS.md").read_text()
    assert "## Learning-rate sweep: each task" in results and "(picked)" in results
    seed0 = contenders["lorakit"]["main"] - contenders["full"]["main"]
    row = f"| sst2: LoRA within 2 points of full, medians over 2 seeds | {gap:+.1f} (seed 0 alone: "
    assert f"{row}{seed0:+.1f})" in results
    assert "## Quality over seeds" in results
    assert "## LoRA setups on sst2, scored on 24 held-out training rows" in results
