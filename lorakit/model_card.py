"""Model cards: the ``README.md`` that the Hugging Face Hub shows beside every run directory and merged model.

The metadata follows the Hub's convention and is rendered by ``huggingface_hub`` (``ModelCardData``):
``base_model``, ``library_name`` (``peft`` for an adapter, ``transformers`` for a merged or fully fine-tuned
model), ``pipeline_tag``, ``tags``, the dataset where it is known (a built-in task's hub dataset, or a hub
``task.dataset``; never a local path), and the best evaluation's metrics as ``model-index``. The text gives
the recipe, the trainable parameters, the training time and how to load the result with PEFT, with
transformers and with lorakit.

A card is written to a temporary name and renamed. A ``README.md`` that lorakit did not write (no
``MARKER`` line) is never replaced.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from lorakit.recipe import Recipe

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
MARKER = "<!-- written by lorakit: this card is replaced when the run or merge is written again -->"
TAGS = ["lora", "lorakit"]

# Built-in tasks' datasets on the Hub (lorakit.tasks.glue, e2e, wikisql load these).
_HUB_DATASETS = {"e2e": ("tuetschek/e2e_nlg", "E2E NLG"), "wikisql": ("Salesforce/wikisql", "WikiSQL")}
_GLUE = "nyu-mll/glue"


def is_lorakit_card(path: Path) -> bool:
    """Whether ``path`` is a card lorakit wrote (and may replace)."""
    try:
        return MARKER in path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False


def _dataset(recipe: Recipe) -> tuple[str | None, str, str | None]:
    """The hub dataset id (None when the data is local), a readable name, and the dataset config."""
    task = recipe.task
    if task.name in _HUB_DATASETS:
        hub_id, name = _HUB_DATASETS[task.name]
        return hub_id, name, None
    if task.name is not None:
        return _GLUE, f"GLUE {task.name.upper()}", task.name
    if task.dataset and not Path(task.dataset).exists() and task.dataset.count("/") <= 1:
        return task.dataset, task.dataset, task.dataset_config
    source = task.train_file or task.dataset or "own data"
    return None, Path(source).name, None


def _pipeline_tag(recipe: Recipe) -> str:
    return "text-generation" if recipe.task.is_generation else "text-classification"


def _metric_values(metrics: dict[str, Any]) -> dict[str, float]:
    best = metrics.get("best") or {}
    return {
        k: float(v)
        for k, v in best.items()
        if k not in ("step", "epoch") and isinstance(v, int | float) and not isinstance(v, bool)
    }


def card_data(recipe: Recipe, metrics: dict[str, Any], name: str, merged: bool = False) -> Any:
    """The card's metadata (``huggingface_hub.ModelCardData``)."""
    from huggingface_hub import EvalResult, ModelCardData

    hub_id, dataset_name, config = _dataset(recipe)
    pipeline = _pipeline_tag(recipe)
    results = [
        EvalResult(
            task_type=pipeline,
            dataset_type=hub_id or dataset_name,
            dataset_name=dataset_name,
            dataset_config=config,
            dataset_split="validation",
            metric_type=metric,
            metric_value=value,
            metric_name=metric,
        )
        for metric, value in _metric_values(metrics).items()
    ]
    adapter = recipe.method == "lora" and not merged
    return ModelCardData(
        base_model=recipe.model.name_or_path,
        library_name="peft" if adapter else "transformers",
        pipeline_tag=pipeline,
        tags=[*TAGS, "merged"] if merged else list(TAGS),
        datasets=[hub_id] if hub_id else None,
        model_name=name if results else None,
        eval_results=results or None,
    )


def _seconds(value: float) -> str:
    return f"{value:.1f} s" if value < 120 else f"{value / 60:.1f} min"


def _facts(recipe: Recipe, metrics: dict[str, Any]) -> list[str]:
    lines = [f"- **base model**: `{recipe.model.name_or_path}`", f"- **method**: {recipe.method}"]
    if recipe.method == "lora":
        lines.append(f"- **LoRA**: r = {recipe.lora.r}, alpha = {recipe.lora.alpha:g}")
    params = metrics.get("parameters") or {}
    if "trainable" in params and "total" in params:
        lines.append(
            f"- **trainable parameters**: {params['trainable']:,} of {params['total']:,} "
            f"({params.get('trainable_percent', 100 * params['trainable'] / params['total']):.2f}%)"
        )
    if "train_seconds" in metrics:
        whole = sum((metrics.get("seconds") or {}).values())
        lines.append(
            f"- **training time**: {_seconds(metrics['train_seconds'])} of optimizer steps "
            f"({metrics.get('train_steps', '?')} steps)" + (f", {_seconds(whole)} in all" if whole else "")
        )
    values = _metric_values(metrics)
    if values:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in values.items())
        step = metrics["best"].get("step", "?")
        lines.append(f"- **dev metrics** (the best evaluation, step {step}): {shown}")
    return lines


def _auto_class(recipe: Recipe) -> str:
    return "AutoModelForCausalLM" if recipe.task.is_generation else "AutoModelForSequenceClassification"


def _usage(recipe: Recipe, merged: bool) -> str:
    auto = _auto_class(recipe)
    if merged or recipe.method == "full":
        return (
            "## Use it\n\nA plain transformers model (LoRA merged in: no extra latency):\n\n```python\n"
            f"from transformers import {auto}, AutoTokenizer\n\n"
            f'model = {auto}.from_pretrained("THIS_FOLDER_OR_REPO")\n'
            'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER_OR_REPO")\n```\n\n'
            "With lorakit: `lorakit generate THIS_FOLDER --recipe RECIPE` (generation tasks).\n"
        )
    head = "" if recipe.task.is_generation else ", num_labels=NUM_LABELS"
    return (
        "## Use it\n\nWith PEFT (the adapter is in PEFT's format; the task head is saved with it):\n\n"
        f"```python\nfrom peft import PeftModel\nfrom transformers import {auto}, AutoTokenizer\n\n"
        f'base = {auto}.from_pretrained("{recipe.model.name_or_path}"{head})\n'
        'model = PeftModel.from_pretrained(base, "THIS_FOLDER_OR_REPO")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{recipe.model.name_or_path}")\n```\n\n'
        "With lorakit, from this folder:\n\n"
        "    lorakit eval THIS_FOLDER                      # the dev metrics again\n"
        "    lorakit predict --adapter NAME=THIS_FOLDER --input rows.jsonl\n"
        "    lorakit merge THIS_FOLDER --out merged/       # a plain transformers model\n"
    )


def render(recipe: Recipe, recipe_text: str, metrics: dict[str, Any], name: str, merged: bool = False) -> str:
    """The whole card: metadata between ``---`` lines, then the text."""
    from huggingface_hub import ModelCard

    what = "merged model" if merged else ("LoRA adapter" if recipe.method == "lora" else "fine-tuned model")
    body = "\n".join(
        [
            MARKER,
            "",
            f"# {name}",
            "",
            f"A {what} for `{recipe.model.name_or_path}`, trained with lorakit "
            "(LoRA: Hu et al., arXiv:2106.09685).",
            "",
            *_facts(recipe, metrics),
            "",
            _usage(recipe, merged),
            "## Recipe",
            "",
            "```yaml",
            recipe_text.rstrip(),
            "```",
            "",
        ]
    )
    data = card_data(recipe, metrics, name, merged)
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def write_run_card(run_dir: Path, recipe: Recipe, metrics: dict[str, Any]) -> Path | None:
    """Write the card of a finished training run, ``run_dir/README.md`` (atomically), from its recipe.yaml
    and metrics.json's numbers; None, with a warning, when a README.md that lorakit did not write is there."""
    from lorakit.lora.files import atomic_write

    out_dir = Path(run_dir)
    path = out_dir / CARD_FILE
    if path.exists() and not is_lorakit_card(path):
        logger.warning("%s was not written by lorakit: left as it is (no model card written)", path)
        return None
    recipe_file = out_dir / "recipe.yaml"
    recipe_text = recipe_file.read_text(encoding="utf-8") if recipe_file.is_file() else ""
    text = render(recipe, recipe_text, metrics, out_dir.resolve().name)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path


def write_merged_card(out_dir: Path, run_dir: Path, recipe: Recipe, name: str) -> Path:
    """The card of the merged model ``name`` in ``out_dir`` (merge's fresh temporary directory, so nothing of
    the user's is there), with the run's recipe and metrics (when it has them)."""
    from lorakit.lora.files import atomic_write

    metrics_file = Path(run_dir) / "metrics.json"
    try:
        metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        metrics = {}
    recipe_file = Path(run_dir) / "recipe.yaml"
    recipe_text = recipe_file.read_text(encoding="utf-8") if recipe_file.is_file() else ""
    text = render(recipe, recipe_text, metrics, name, merged=True)
    path = Path(out_dir) / CARD_FILE
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path
