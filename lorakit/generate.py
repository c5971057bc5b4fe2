"""Ad-hoc generation with a trained model: what ``lorakit generate`` runs.

The model is either a run directory (the base model with the run's adapter, unmerged) or a directory
written by ``lorakit merge`` (a plain Hugging Face causal LM with its tokenizer beside it). Inputs are a
literal text or a file with one input per line (blank lines skipped; ``-`` reads standard input). For a
generation task the raw input becomes the task's prompt, exactly as training and evaluation build it:

* E2E: a meaning representation in the original CSV form (``name[Alimentum], area[city centre]``) or the
  LoRA files' form (``name : Alimentum | area : city centre``; a whole ``MR||reference`` line of those
  files also works, its reference ignored);
* WikiSQL: a JSON object ``{"question": "...", "header": ["col", ...]}``, since the prompt names the
  table's columns.

Without a task (a merged model given no recipe, or ``--task none``) the input is the prompt as it is.

Decoding follows the recipe's ``generation`` section through the evaluator's own ``generate_texts``, so a
dev-set input gives the text that ``lorakit eval`` wrote for it. A merged model carries no recipe: pass
the run's (``--recipe RUN_DIR/recipe.yaml``) to get its task and decoding, else the defaults apply.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorakit.errors import UserError

if TYPE_CHECKING:
    from lorakit.recipe import Recipe
    from lorakit.tasks.base import Task

RAW = "none"  # --task value: use inputs as prompts unchanged
# A literal --input with one of these endings (and no spaces) is taken for a missing file, not a text.
_FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".tsv")


@dataclass
class Input:
    """One raw input and where it came from (``FILE:LINE`` or ``--input``), for error messages."""

    text: str
    where: str


@dataclass
class Loaded:
    """A model ready to generate, its tokenizer, and the recipe that decides prompts and decoding."""

    model: Any
    tokenizer: Any
    recipe: Recipe | None  # None: a merged model given no recipe


def read_inputs(spec: str) -> list[Input]:
    """The inputs named by ``--input``: the lines of a file (or of standard input for ``-``), else the
    text itself. Raises UserError for an unreadable or empty file, or a missing one named like a file."""
    if spec == "-":
        return _lines(sys.stdin.read(), "<stdin>")
    kind = _path_kind(spec)
    if kind == "file":
        try:
            text = Path(spec).read_bytes().decode("utf-8-sig")
        except OSError as exc:
            raise UserError(f"cannot read the input file: {exc.strerror or exc}", where=spec) from None
        except UnicodeDecodeError as exc:
            raise UserError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", where=spec) from None
        return _lines(text, spec)
    if kind == "dir":
        raise UserError("is a directory, not an input file", where=spec)
    if not any(c.isspace() for c in spec) and spec.lower().endswith(_FILE_SUFFIXES):
        raise UserError("input file not found", where=spec)
    if not spec.strip():
        raise UserError("empty input", where="--input")
    return [Input(spec.strip(), "--input")]


def _path_kind(spec: str) -> str | None:
    """``file`` or ``dir`` when ``spec`` names one, else None (a text that merely looks like a path)."""
    if "\n" in spec or not spec.strip():
        return None
    try:
        path = Path(spec)
        return "file" if path.is_file() else "dir" if path.is_dir() else None
    except OSError:  # a long literal text is an invalid file name (ENAMETOOLONG), not an input file
        return None


def _lines(text: str, where: str) -> list[Input]:
    lines = enumerate(text.splitlines(), 1)
    inputs = [Input(line.strip(), f"{where}:{n}") for n, line in lines if line.strip()]
    if not inputs:
        raise UserError("no inputs (every line is blank)", where=where)
    return inputs


def build_prompts(inputs: list[Input], task: Task | None, tokenizer: Any = None) -> list[str]:
    """Each input as the prompt of ``task`` (its ``prompt_from_input``), or unchanged for None. A chat
    task renders with ``tokenizer``'s template; without it the inputs are only checked."""
    if task is None:
        return [item.text for item in inputs]
    prompts = []
    for item in inputs:
        try:
            if tokenizer is not None and getattr(task, "chat", False):
                prompts.append(task.prompt_from_input(item.text, tokenizer))  # type: ignore[call-arg]
            else:
                prompts.append(task.prompt_from_input(item.text))
        except ValueError as exc:
            raise UserError(f"not a valid {task.name} input: {exc}", where=item.where) from None
    return prompts


def _load_recipe(path: Path) -> Recipe:
    from lorakit.recipe import load_trained_recipe

    if not path.is_file():
        raise UserError("recipe file not found", where=str(path))
    recipe = load_trained_recipe(path)
    if not recipe.task.is_generation:
        what = recipe.task.name or f"type {recipe.task.type}"
        raise UserError(f"generation needs a generation task, not {what}", where=recipe.where("task"))
    return recipe


def resolve_recipe(model_dir: Path, recipe_path: Path | None = None) -> Recipe | None:
    """The recipe that decides prompts and decoding for ``model_dir``, read without loading weights.

    A run directory has its own ``recipe.yaml``; a merged model takes ``recipe_path`` (or a
    ``recipe.yaml`` beside its weights), or none. Raises UserError when ``model_dir`` is neither a run
    nor a merged model, or the recipe is not of a generation task.
    """
    if not model_dir.is_dir():
        raise UserError("not found (expected a run directory or a merged model)", where=str(model_dir))
    merged = (model_dir / "config.json").is_file()
    own = model_dir / "recipe.yaml"
    if not merged and not own.is_file():
        raise UserError(
            "neither a lorakit run (recipe.yaml) nor a merged model (config.json)", where=str(model_dir)
        )
    if not merged and recipe_path is not None:
        raise UserError("a run decodes with its own recipe; --recipe is for merged models", "--recipe")
    path = recipe_path or (own if own.is_file() else None)
    return _load_recipe(path) if path is not None else None


def load_model(model_dir: Path, recipe: Recipe | None) -> Loaded:
    """A run directory's base model with its adapter (unmerged), or a merged model directory's model.

    ``recipe``: what ``resolve_recipe`` gave for ``model_dir``. Raises UserError when the model cannot
    be loaded or is not a causal language model.
    """
    if not (model_dir / "config.json").is_file():
        from lorakit.models import load_trained
        from lorakit.tasks import build_task

        if recipe is None:
            raise UserError("a run directory needs its recipe.yaml", where=str(model_dir))
        prepared = load_trained(model_dir, recipe, build_task(recipe.task))
        return Loaded(prepared.model, prepared.tokenizer, recipe)

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lorakit.models import DTYPES

    where = str(model_dir)
    try:
        config = AutoConfig.from_pretrained(model_dir)
        architectures = config.architectures or []
        if architectures and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
            raise UserError(f"not a causal language model ({', '.join(architectures)})", where=where)
        dtype = DTYPES[recipe.model.dtype] if recipe is not None else "auto"
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the merged model: {' '.join(str(exc).split())[:300]}", where) from None
    if tokenizer.pad_token is None:
        # As lorakit.models.load_tokenizer does for GPT-2: batches need a pad id, and eos serves.
        tokenizer.pad_token = tokenizer.eos_token
    return Loaded(model, tokenizer, recipe)


def decoding(
    recipe: Recipe | None,
    num_beams: int | None = None,
    max_new_tokens: int | None = None,
    greedy: bool = False,
) -> Any:
    """The recipe's ``generation`` section (the defaults without a recipe) with the command's overrides."""
    from lorakit.recipe import Recipe

    if greedy and num_beams not in (None, 1):
        raise UserError(f"--greedy decodes with one beam; drop --num-beams {num_beams}", where="--greedy")
    base = recipe.generation if recipe is not None else Recipe().generation
    update: dict[str, int] = {}
    if greedy or num_beams is not None:
        update["num_beams"] = 1 if greedy else int(num_beams)  # type: ignore[arg-type]
    if max_new_tokens is not None:
        update["max_new_tokens"] = max_new_tokens
    return base.model_copy(update=update)


def _task(task: str | None, recipe: Recipe | None) -> Task | None:
    """The task whose prompts and clean-up apply: ``--task`` (a built-in generation task, or ``none``),
    else the recipe's."""
    from lorakit.tasks import GENERATION_NAMES, build_task, get_task

    if task is None:
        return build_task(recipe.task) if recipe is not None else None
    name = task.strip().lower()
    if name == RAW:
        return None
    if name not in GENERATION_NAMES:
        choices = ", ".join((*GENERATION_NAMES, RAW))
        raise UserError(f"unknown task {task!r}; choose one of {choices}", "--task")
    return get_task(name)


def one_line(text: str, task: Task | None) -> str:
    """A generated text as one output line, as ``lorakit generate`` prints it (the task's clean-up)."""
    return task.clean_output(text) if task is not None else " ".join(text.splitlines()).strip()


def generate(
    model_dir: Path,
    input_spec: str,
    recipe_path: Path | None = None,
    task: str | None = None,
    num_beams: int | None = None,
    max_new_tokens: int | None = None,
    greedy: bool = False,
) -> list[str]:
    """One output per input of ``input_spec`` (a text, a file, or ``-``), from the model in ``model_dir``.

    ``task`` picks the prompt template (``e2e``, ``wikisql``, or ``none`` for raw prompts; default: the
    recipe's task); ``num_beams``, ``max_new_tokens`` and ``greedy`` override the recipe's decoding.
    Inputs are checked before the model is loaded, so a bad file fails at once.
    """
    from accelerate import Accelerator

    inputs = read_inputs(input_spec)
    recipe = resolve_recipe(model_dir, recipe_path)
    chosen = _task(task, recipe)
    build_prompts(inputs, chosen)  # before loading weights: a bad input fails at once
    settings = decoding(recipe, num_beams, max_new_tokens, greedy)
    loaded = load_model(model_dir, recipe)
    prompts = build_prompts(inputs, chosen, loaded.tokenizer)
    from lorakit.models import prompt_room

    # A prompt keeps its last tokens, as many as the model's positions leave beside the new ones.
    max_length = prompt_room(loaded.model.config, settings.max_new_tokens)
    if recipe is not None:
        max_length = min(recipe.task.max_length, max_length)
    accelerator = Accelerator(mixed_precision=recipe.train.mixed_precision if recipe is not None else "no")
    model = accelerator.prepare(loaded.model)
    texts = generate_from_prompts(model, loaded.tokenizer, prompts, settings, max_length, accelerator)
    return [one_line(text, chosen) for text in texts]


def generate_from_prompts(
    model: Any, tokenizer: Any, prompts: list[str], settings: Any, max_length: int, accelerator: Any
) -> list[str]:
    """The model's continuation of each prompt (cut to its last ``max_length`` tokens, left-padded into
    batches of ``settings.batch_size``), decoded as ``settings`` (a recipe's generation section) says:
    what ``lorakit generate`` and ``lorakit predict`` both run."""
    import datasets

    from lorakit.data import PaddingCollator, build_eval_dataloader, tokenize_prompts
    from lorakit.evaluation import generate_texts

    rows = tokenize_prompts(datasets.Dataset.from_dict({"prompt": prompts}), tokenizer, max_length)
    loader = build_eval_dataloader(rows, PaddingCollator(tokenizer, padding_side="left"), settings.batch_size)
    return generate_texts(model, accelerator.prepare(loader), tokenizer, settings, accelerator)
