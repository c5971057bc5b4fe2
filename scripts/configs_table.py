"""Print a markdown table of the recipes in configs/, for configs/README.md.

Every ``configs/*.yaml`` is read with ``lorakit.recipe.load_recipe``, so a recipe that does not load
stops the table with the loader's one-line error. The paper's dev score comes from the recipe's header
comment, from a line such as ``# Paper's dev result (Table 2): 87.5 (...)``; recipes without one
show a dash.

    python scripts/configs_table.py            # run from the repository root
    python scripts/configs_table.py DIR        # another directory of recipes

Relative paths inside recipes (``task.data_dir``, ``lora.init_from``) resolve against the working
directory, as they do for ``lorakit train``, so run it from the repository root.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

from lorakit.errors import UserError
from lorakit.recipe import Recipe, load_recipe
from lorakit.recipe.schema import PACKAGE_SCHEME
from lorakit.tasks import TASK_NAMES

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

_DEV_SCORE = re.compile(r"Paper's dev result \(Table \d+\):\s*([0-9]+(?:\.[0-9]+)?)")
_COLUMNS = (
    "Recipe",
    "Model",
    "Task",
    "r",
    "alpha",
    "lr",
    "Batch",
    "Epochs",
    "Max len",
    "Precision",
    "Paper dev",
)
DASH = "—"
# The order of the paper's tables: models as in Table 2, GLUE tasks as in its columns, then the rest.
_PAPER_MODELS = ("roberta-base", "roberta-large", "microsoft/deberta-v2-xxlarge", "gpt2-medium", "gpt2-large")
_GLUE_ORDER = ("mnli", "sst2", "mrpc", "cola", "qnli", "qqp", "rte", "stsb")
_TASK_ORDER = _GLUE_ORDER + tuple(name for name in TASK_NAMES if name not in _GLUE_ORDER)


def paper_score(path: Path) -> str | None:
    """The paper's dev score written in the recipe's leading comment block, or None."""
    header: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            break
        header.append(stripped.lstrip("#").strip())
    match = _DEV_SCORE.search(" ".join(header))
    return match.group(1) if match else None


def format_number(value: float) -> str:
    """A learning rate or alpha as people write it: ``5e-4``, ``1.3e-4``, ``16``, ``0.5``."""
    if float(value).is_integer():
        return str(int(value))
    if abs(value) >= 0.01:
        return f"{value:g}"
    mantissa, exponent = f"{value:.3e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def model_name(path: Path, recipe: Recipe) -> str:
    """The base model as the recipe names it: ``package:NAME`` stays as written (resolved, it would be a
    directory on this machine), anything else as loaded."""
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    section = raw.get("model") if isinstance(raw, dict) else None
    written = section.get("name_or_path") if isinstance(section, dict) else None
    if isinstance(written, str) and written.startswith(PACKAGE_SCHEME):
        return written
    return recipe.model.name_or_path


def task_label(recipe: Recipe) -> str:
    """A built-in task's name, or the type of the user's own data (``own classification``)."""
    return recipe.task.name or f"own {recipe.task.type}"


def cells(path: Path, recipe: Recipe) -> list[str]:
    """The table cells for one recipe."""
    lora = recipe.method == "lora"
    train = recipe.train
    batch = str(train.batch_size) if train.grad_accum == 1 else f"{train.batch_size}×{train.grad_accum}"
    length = f"{train.max_steps} steps" if train.max_steps else str(train.epochs)
    return [
        f"[{path.name}]({path.name})",
        f"`{model_name(path, recipe)}`",
        task_label(recipe),
        str(recipe.lora.r) if lora else DASH,
        format_number(recipe.lora.alpha) if lora else DASH,
        format_number(train.lr),
        batch,
        length,
        str(recipe.task.max_length),
        "fp32" if train.mixed_precision == "no" else train.mixed_precision,
        paper_score(path) or DASH,
    ]


def _order(path: Path, recipe: Recipe) -> tuple[int, str, int, str]:
    """Sort key: the paper's models first, in its order, then the rest by name; tasks as in Table 2."""
    model = recipe.model.name_or_path
    model_rank = _PAPER_MODELS.index(model) if model in _PAPER_MODELS else len(_PAPER_MODELS)
    name = recipe.task.name
    return model_rank, model, _TASK_ORDER.index(name) if name else len(_TASK_ORDER), path.name


def row(path: Path, recipe: Recipe | None = None) -> str:
    """One markdown table row for the recipe at ``path`` (loaded here unless given)."""
    return "| " + " | ".join(cells(path, recipe or load_recipe(path))) + " |"


def table(paths: list[Path]) -> str:
    """The markdown table, header included: recipes grouped by model, tasks in the paper's order."""
    recipes = [(path, load_recipe(path)) for path in paths]
    recipes.sort(key=lambda item: _order(*item))
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "|".join("---" for _ in _COLUMNS) + "|"]
    lines += [row(path, recipe) for path, recipe in recipes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or (args and args[0] in ("-h", "--help")):
        print("usage: python scripts/configs_table.py [CONFIG_DIR]", file=sys.stderr)
        return 2
    directory = Path(args[0]) if args else CONFIGS
    paths = sorted(directory.glob("*.yaml"))
    if not paths:
        print(f"{directory}: no *.yaml recipes found", file=sys.stderr)
        return 2
    try:
        print(table(paths))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
