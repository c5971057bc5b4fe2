"""The adapters a prediction run serves: ``--adapter NAME=DIR`` resolved into what each one needs (its
task kind, labels, tokenization, decoding, the base it was trained on), and the check that they all
belong to one base model before any weight is read.

DIR is a lorakit run directory (its ``recipe.yaml`` gives the base, the task, the max length and the
decoding) or a plain PEFT adapter directory, whose base comes from ``--base`` (else the
``base_model_name_or_path`` it records) and whose label count comes from its head.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorakit.errors import UserError
from lorakit.families import head_outputs
from lorakit.lora import CONFIG_NAME, PEFT_PREFIX, WEIGHTS_NAME, read_json_object, safetensors_shapes
from lorakit.runs import RECIPE_FILE

if TYPE_CHECKING:
    from lorakit.recipe import Recipe
    from lorakit.tasks.base import Task


@dataclass
class AdapterSource:
    """One adapter to serve, as read from its directory (no weights loaded)."""

    name: str
    path: Path
    base: str  # the base model it was trained on: a hub id or a local directory
    kind: str  # classification | regression | multilabel | generation
    num_labels: int  # 0 for generation
    label_names: list[str] | None
    task: Task | None  # the task whose prompts and output clean-up a generation adapter uses
    max_length: int | None  # None: the tokenizer's own limit
    recipe: Recipe | None  # None for a plain PEFT directory
    where: str  # "--adapter NAME=DIR", for error messages

    @property
    def spec(self) -> str:
        """``NAME=DIR`` as given on the command line."""
        return f"{self.name}={self.path}"


def parse_adapter_spec(spec: str) -> tuple[str, Path]:
    """``NAME=DIR`` into its parts; UserError naming the option for anything else."""
    name, sep, path = spec.partition("=")
    name = name.strip()
    where = f"--adapter {spec}"
    if not sep or not name or not path.strip():
        raise UserError("expected NAME=RUN_DIR, e.g. --adapter sst2=runs/sst2", where=where)
    if not all(c.isalnum() or c in "-_." for c in name):
        raise UserError(f"adapter name {name!r}: use letters, digits, '-', '_' and '.' only", where=where)
    return name, Path(path.strip())


def _recorded_head(path: Path) -> tuple[str | None, list[str] | None]:
    """The task kind and class names lorakit wrote into an adapter file's metadata (None, None for an
    adapter written by something else)."""
    from lorakit.lora import read_adapter_metadata
    from lorakit.models import KIND_METADATA, LABELS_METADATA

    meta = read_adapter_metadata(path)
    names = json.loads(meta[LABELS_METADATA]) if LABELS_METADATA in meta else None
    return meta.get(KIND_METADATA), names


def _head_width(weights: Path) -> int | None:
    """Output count of the head in an adapter file (its output projection's rows, as each model family
    names it: ``lorakit.families.head_outputs``), or None."""
    shapes = {k.removeprefix(PEFT_PREFIX): shape for k, shape in safetensors_shapes(weights).items()}
    for suffix in head_outputs():
        # Whole name components only: DistilBERT's pre_classifier.weight is not its classifier's.
        hits = [k for k in shapes if (k == suffix or k.endswith("." + suffix)) and "lora_" not in k]
        if hits:
            return int(shapes[hits[0]][0])
    return None


def read_source(
    spec: str, base: str | None, max_length: int | None, where: str | None = None
) -> AdapterSource:
    """What ``--adapter NAME=DIR`` serves; UserError (exit 2) for a directory that is not an adapter.
    ``where`` names the source in errors (default: the option as given)."""
    from lorakit.recipe import load_trained_recipe
    from lorakit.tasks import build_task

    name, path = parse_adapter_spec(spec)
    where = where or f"--adapter {spec}"
    if not path.is_dir():
        raise UserError("not found (expected a lorakit run directory or a PEFT adapter directory)", where)
    if not (path / WEIGHTS_NAME).is_file() or not (path / CONFIG_NAME).is_file():
        what = "a full fine-tuning run, not an adapter" if (path / "model").is_dir() else "no adapter"
        raise UserError(f"{what} ({WEIGHTS_NAME} and {CONFIG_NAME})", where)
    width = _head_width(path / WEIGHTS_NAME)
    if (path / RECIPE_FILE).is_file():
        recipe = load_trained_recipe(path / RECIPE_FILE)
        task = build_task(recipe.task)
        kind = task.kind
        return AdapterSource(
            name=name,
            path=path,
            base=recipe.model.name_or_path,
            kind=kind,
            num_labels=task.num_labels,
            label_names=task.label_names,
            task=task if kind == "generation" else None,
            max_length=max_length or recipe.task.max_length,
            recipe=recipe,
            where=where,
        )
    file_config = read_json_object(path / CONFIG_NAME)
    recorded = file_config.get("base_model_name_or_path")
    if base is None and not recorded:
        raise UserError("a PEFT adapter without a recipe: name its base model with --base", where)
    generation = file_config.get("task_type") == "CAUSAL_LM"
    if not generation and width is None:
        raise UserError("holds no classification head (modules_to_save): nothing would predict", where)
    kind, names = _recorded_head(path)
    kind = kind or ("generation" if generation else "regression" if width == 1 else "classification")
    return AdapterSource(
        name=name,
        path=path,
        base=base or str(recorded),
        kind=kind,
        num_labels=0 if generation else int(width or 0),
        label_names=names,
        task=None,  # no recipe, no task template: the text is the prompt as it is
        max_length=max_length,
        recipe=None,
        where=where,
    )


def _fingerprint(base: str) -> dict[str, Any] | None:
    """For a local model directory: its config's shape keys and a digest of its weight files."""
    path = Path(base)
    if not (path / "config.json").is_file():
        return None
    files = [path / "config.json", *sorted(path.glob("*.safetensors")), *sorted(path.glob("*.bin"))]
    # Keyed on the files' sizes and times: each adapter added is checked against the base, and the base's
    # weights (gigabytes) are then read once, not once per check.
    return _digest(tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


@functools.lru_cache(maxsize=8)
def _digest(files: tuple[tuple[str, int, int], ...]) -> dict[str, Any]:
    config = json.loads(Path(files[0][0]).read_text())
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "n_embd")
    digest = hashlib.sha256()
    for name, _, _ in files[1:]:
        with Path(name).open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return {"shape": {k: config[k] for k in keys if k in config}, "weights": digest.hexdigest()}


def check_one_base(sources: list[AdapterSource], base: str | None) -> str:
    """The one base model every adapter was trained on; UserError naming the adapter that differs.

    The same name (or the same local directory) is the same base. Two local directories are the same
    base when their configs' shapes and their weight files agree; anything else is refused.
    """
    first = base or sources[0].base
    kinds = {s.kind == "generation" for s in sources}
    if len(kinds) > 1:
        gen = next(s for s in sources if s.kind == "generation")
        raise UserError(
            "generation and classification adapters need different model heads: run them separately",
            gen.where,
        )
    reference = None
    for source in sources:
        if _same_name(source.base, first):
            continue
        reference = reference or _fingerprint(first)
        other = _fingerprint(source.base)
        if reference is not None and other is not None and reference == other:
            continue
        detail = ""
        if reference is not None and other is not None and reference["shape"] != other["shape"]:
            diff = {k: (reference["shape"].get(k), v) for k, v in other["shape"].items()}
            diff = {k: v for k, v in diff.items() if v[0] != v[1]}
            detail = "; " + ", ".join(f"{k} {b} here, {a} there" for k, (a, b) in diff.items())
        elif reference is not None and other is not None:
            detail = "; its weights differ"
        raise UserError(f"trained on base {source.base!r}, not {first!r}{detail}", source.where)
    return first


def _same_name(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a), Path(b)
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()
