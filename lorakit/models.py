"""The base model and tokenizer for a recipe, with LoRA injected as the recipe asks.

The LoRA core (``lorakit.lora``) knows nothing of transformers, model families or recipes; this module is
where they meet: it picks the Auto class for the task, sizes the head from the task, resolves the recipe's
``lora`` section into a core ``LoraConfig`` and turns the core's errors into ``UserError`` lines that
name the recipe key at fault.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from lorakit.errors import UserError
from lorakit.families import fused_slices, lora_defaults, position_limit, seq_cls_heads
from lorakit.lora import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    LoraConfig,
    ParameterCounts,
    TargetNotFoundError,
    count_parameters,
    inject_lora,
    is_lora_parameter,
    load_adapter,
    lora_modules,
    mark_trainable,
    read_adapter,
    saved_module_names,
    suffix_matches,
)
from lorakit.quantized_base import check_quantize, model_counts, quantize_base, refresh_quantized

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

    from lorakit.recipe import Recipe
    from lorakit.tasks.base import Task

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
FULL_MODEL_DIR = "model"  # where training saves a full fine-tuning run's model, inside the run dir
# transformers' name for each kind of head, which its own loss and pipelines follow.
_PROBLEM_TYPES = {"regression": "regression", "multilabel": "multi_label_classification"}
# Adapter-file metadata (safetensors header) with the task's kind and class names, for readers without
# the run's recipe (a PEFT folder handed to `lorakit predict`).
KIND_METADATA = "lorakit.task_kind"
LABELS_METADATA = "lorakit.label_names"
# The quantization of the base the adapter was trained on (``model.quantize``: nf4 | int8; absent: none).
QUANTIZE_METADATA = "lorakit.quantize"


def head_metadata(task: Task | HeadSpec, quantize: str = "none") -> dict[str, str]:
    """The adapter-file metadata that names the task's kind and class names (and the base's
    quantization, when it was quantized)."""
    import json

    meta = {KIND_METADATA: task.kind}
    if task.label_names:
        meta[LABELS_METADATA] = json.dumps(list(task.label_names), ensure_ascii=False)
    if quantize != "none":
        meta[QUANTIZE_METADATA] = quantize
    return meta


@dataclass(frozen=True)
class HeadSpec:
    """What a model's head must be when no task names it (a plain PEFT adapter): the kind of task, the
    label count and, where known, the label names. Read where a ``Task`` is: ``model_class``,
    ``model_config``, ``build_model``."""

    kind: str  # classification | regression | multilabel | generation
    num_labels: int
    label_names: list[str] | None = None


@dataclass
class PreparedModel:
    """A model ready to train or evaluate, with what was done to it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    lora_config: LoraConfig | None  # None for full fine-tuning
    adapted: list[str]  # full names of the modules that carry LoRA
    counts: ParameterCounts


def _one_line(exc: BaseException, limit: int = 300) -> str:
    # transformers' messages span several lines; a UserError is shown as one.
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_tokenizer(recipe: Recipe) -> PreTrainedTokenizerBase:
    """The tokenizer of ``model.tokenizer`` (or of the model itself); eos doubles as pad when the
    tokenizer has no pad token (GPT-2), so batches can be padded."""
    from transformers import AutoTokenizer

    source = recipe.model.tokenizer or recipe.model.name_or_path
    key = "model.tokenizer" if recipe.model.tokenizer else "model.name_or_path"
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=recipe.model.trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(
            f"cannot load a tokenizer from {source!r}: {_one_line(exc)}", recipe.where(key)
        ) from None
    if len(tokenizer) <= len(set(tokenizer.all_special_tokens)):
        # transformers 5 builds a tokenizer of special tokens only from a directory without tokenizer
        # files; every word would then encode to nothing or <unk>.
        raise UserError(f"no tokenizer files in {source!r}; set model.tokenizer", recipe.where(key))
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_class(task: Task | HeadSpec) -> type:
    """The transformers Auto class for the task: a sequence classifier (one output for regression) or
    a causal LM for generation."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForCausalLM if task.kind == "generation" else AutoModelForSequenceClassification


def model_config(recipe: Recipe, task: Task | HeadSpec) -> PretrainedConfig:
    """The base checkpoint's config with the task's head settings (label count and names, problem
    type, pad token). Reads ``config.json`` only, so ``lorakit info`` can use it without weights."""
    from transformers import AutoConfig

    path = recipe.model.name_or_path
    where = recipe.where("model.name_or_path")
    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        raise UserError(f"{path} has no config.json, so it is not a Hugging Face model directory", where)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=recipe.model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the model config of {path!r}: {_one_line(exc)}", where) from None
    if task.kind == "generation":
        return config
    labels = getattr(task, "label_names", None)
    if labels:
        # Setting id2label resizes num_labels too; passing both to from_pretrained warns when the
        # checkpoint was itself a classifier with another label count.
        config.id2label = dict(enumerate(labels))
        config.label2id = {name: i for i, name in enumerate(labels)}
    else:
        config.num_labels = task.num_labels
    # Set explicitly so that a checkpoint fine-tuned on another kind of task does not carry its own.
    config.problem_type = _PROBLEM_TYPES.get(task.kind, "single_label_classification")
    if getattr(config, "pad_token_id", None) is None:
        # Decoder classifiers refuse batches of more than one row without a pad id, and plain transformers
        # (a merged model) pools the last token that is not the pad; the tokenizer pads with eos
        # (load_tokenizer), so eos is the pad. Models lorakit builds pool by the attention mask instead
        # (build_model), so a text's own final eos is not taken for padding.
        eos = getattr(config, "eos_token_id", None)
        config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    return config


def prompt_room(config: PretrainedConfig, max_new_tokens: int) -> int:
    """The longest prompt a model's positions leave room for beside ``max_new_tokens`` new tokens."""
    positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", 1024)
    return max(positions - max_new_tokens, 1)


def check_max_length(recipe: Recipe, config: PretrainedConfig) -> None:
    """A UserError naming ``task.max_length`` when it was set (in the recipe or by ``--set``) to more tokens
    than the model's position table holds: a run would otherwise fail at its first long row, deep inside
    the embeddings. The default is left alone, as before: short rows never reach it."""
    if "max_length" not in recipe.task.model_fields_set:
        return
    # The family's own rules: RoBERTa's offset, DeBERTa's relative positions.
    positions = position_limit(config)
    if positions is not None and recipe.task.max_length > positions:
        raise UserError(
            f"{recipe.task.max_length} tokens, more than the {positions} positions of "
            f"{recipe.model.name_or_path!r}",
            recipe.where("task.max_length"),
        )


def build_model(
    recipe: Recipe,
    task: Task | HeadSpec,
    config: PretrainedConfig | None = None,
    quantize: str | None = None,
) -> PreTrainedModel:
    """The base model for ``task``, weights at ``model.dtype``; the head is fresh when the checkpoint
    has none or one of another size. Every parameter is left trainable. ``config``: a ready
    ``model_config(recipe, task)``, to save reading it again. A decoder classifier pools each row's last
    real token by the attention mask, so a text ending with EOS is not read as padding
    (``lorakit.pooling``); training, eval, predict, serve and merge all build their model here. The
    blocks' linear layers are then quantized as ``model.quantize`` (or ``quantize``, when given) says."""
    config = config if config is not None else model_config(recipe, task)
    path = recipe.model.name_or_path
    try:
        model = model_class(task).from_pretrained(
            path,
            config=config,
            dtype=DTYPES[recipe.model.dtype],
            trust_remote_code=recipe.model.trust_remote_code,
            # A checkpoint fine-tuned with another label count (MNLI's 3 for MRPC) gets a fresh head.
            ignore_mismatched_sizes=task.kind != "generation",
        )
    except (OSError, ValueError) as exc:
        raise UserError(
            f"cannot load the model {path!r}: {_one_line(exc)}", recipe.where("model.name_or_path")
        ) from None
    if task.kind != "generation":
        # Imported here, not in the module's import block, which edits to other functions share.
        from lorakit.pooling import pool_last_real_token

        pool_last_real_token(model)  # a no-op for encoders, which pool their first token
    quantize_base(model, recipe, quantize)
    return model


def empty_model(recipe: Recipe, task: Task, config: PretrainedConfig | None = None) -> PreTrainedModel:
    """The model's architecture on PyTorch's meta device: parameters with shapes and dtypes but no
    storage, so even a 1.5B-parameter model costs no memory and no weights are read."""
    # A copy: from_config records settings on the config it is given, and the caller may reuse it.
    config = copy.deepcopy(config) if config is not None else model_config(recipe, task)
    with torch.device("meta"):
        return model_class(task).from_config(
            config, dtype=DTYPES[recipe.model.dtype], trust_remote_code=recipe.model.trust_remote_code
        )


def lora_config(recipe: Recipe, model: nn.Module, task: Task) -> LoraConfig:
    """The core's ``LoraConfig`` for the recipe's ``lora`` section. Null ``target_modules`` stay null
    (``apply_lora`` completes them with the paper's targets for ``config.model_type``); null
    ``modules_to_save`` become the architecture's head for classification and regression, nothing for
    generation. Fused q|k|v projections get their slices' row counts from the model's config
    (``lorakit.families``), which the core cannot read."""
    section = recipe.lora
    hf_config = getattr(model, "config", None)
    model_type = getattr(hf_config, "model_type", "")
    to_save = section.modules_to_save
    if to_save is None and task.kind != "generation":
        names = [n for n, _ in model.named_modules() if n]
        # Filtered by presence: the fallback for unknown architectures names two candidates at once.
        to_save = [h for h in seq_cls_heads(model_type) if any(suffix_matches(n, h) for n in names)]
        if not to_save:
            raise UserError(
                f"cannot tell which modules form the head of a {model_type!r} model; set them",
                recipe.where("lora.modules_to_save"),
            )
    return LoraConfig(
        r=section.r,
        alpha=section.alpha,
        dropout=section.dropout,
        target_modules=section.target_modules,
        bias=section.bias,
        modules_to_save=tuple(to_save or ()),
        init=section.init,
        use_rslora=section.use_rslora,
        fused_slices=fused_slices(hf_config),
    )


def apply_lora(recipe: Recipe, model: nn.Module, task: Task) -> tuple[LoraConfig, list[str]]:
    """Inject LoRA into ``model`` as training would and mark the adapter trainable; returns the config
    and the adapted module names. Core and family errors become UserErrors at the recipe key they
    concern (a family without default targets, a slice its fused layout does not have)."""
    config = lora_config(recipe, model, task)
    try:
        # Completed here so the returned config names the targets actually used, not null.
        config = lora_defaults(model, config)
        adapted = inject_lora(model, config)
    except TargetNotFoundError as exc:
        raise UserError(_one_line(exc), recipe.where("lora.target_modules")) from None
    try:
        mark_trainable(model, config.bias, config.modules_to_save)
    except TargetNotFoundError as exc:
        raise UserError(_one_line(exc), recipe.where("lora.modules_to_save")) from None
    return config, adapted


def _init_from_run(recipe: Recipe, model: nn.Module, config: LoraConfig) -> None:
    """Load the adapter of run ``lora.init_from`` into the LoRA-injected ``model``.

    The paper starts MRPC, RTE and STS-B from the MNLI adapter: LoRA A/B carry over, but a head sized
    for 3 labels cannot serve 2, so when any head tensor's shape differs the whole head starts fresh.
    """
    run_dir = Path(str(recipe.lora.init_from))
    where = recipe.where("lora.init_from")
    if not (run_dir / WEIGHTS_NAME).is_file() or not (run_dir / CONFIG_NAME).is_file():
        raise UserError(f"{run_dir} holds no adapter ({WEIGHTS_NAME} and {CONFIG_NAME})", where)
    heads = saved_module_names(model, config.modules_to_save)
    params = dict(model.named_parameters())
    try:
        _, tensors, _ = read_adapter(run_dir)
        head_keys = {
            k for k in tensors if not is_lora_parameter(k) and any(k.startswith(h + ".") for h in heads)
        }
        resized = [k for k in sorted(head_keys) if k in params and tensors[k].shape != params[k].shape]
        if resized:
            logger.info(
                "%s: head shapes differ (%s); loading LoRA only, the head starts fresh", run_dir, resized[0]
            )
        load_adapter(model, run_dir, keep=(lambda k: k not in head_keys) if resized else None)
    except (ValueError, RuntimeError) as exc:
        raise UserError(f"cannot start from the adapter in {run_dir}: {_one_line(exc)}", where) from None
    # load_adapter marks trainable from the file's config; the recipe decides what trains now.
    mark_trainable(model, config.bias, config.modules_to_save)


def prepare_model(recipe: Recipe, task: Task) -> PreparedModel:
    """Tokenizer and model for training: LoRA injected and only the adapter trainable (``method:
    lora``, optionally starting from ``lora.init_from``), or everything trainable (``method: full``)."""
    if recipe.method == "full" and recipe.lora.init_from is not None:
        raise UserError("starting from a LoRA adapter needs method: lora", recipe.where("lora.init_from"))
    check_quantize(recipe)  # before any weight is read
    tokenizer = load_tokenizer(recipe)
    hf_config = model_config(recipe, task)
    check_max_length(recipe, hf_config)
    if recipe.method == "lora":
        # A dry run on the meta device first: a mistyped target fails in milliseconds, not after
        # gigabytes of weights have been read.
        apply_lora(recipe, empty_model(recipe, task, hf_config), task)
    model = build_model(recipe, task, hf_config)
    if recipe.method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return PreparedModel(model, tokenizer, None, [], count_parameters(model))
    config, adapted = apply_lora(recipe, model, task)
    if recipe.lora.init_from is not None:
        _init_from_run(recipe, model, config)
    refresh_quantized(model)
    return PreparedModel(model, tokenizer, config, adapted, model_counts(model))


def load_trained(
    run_dir: str | Path, recipe: Recipe, task: Task, quantize: str | None = None
) -> PreparedModel:
    """The base model with ``run_dir``'s adapter loaded, in eval mode, for evaluation and merging.

    The adapter file, not the recipe, says which modules carry LoRA, so the model is exactly the one
    that was saved. A full fine-tuning run is read from ``run_dir/model`` (where training saves it).
    The base is quantized as the run's ``model.quantize`` says (``quantize``: another choice, ``none``
    for the original weights), rebuilt from the original checkpoint.
    """
    run = Path(run_dir)
    tokenizer = load_tokenizer(recipe)
    if (run / WEIGHTS_NAME).is_file():
        model = build_model(recipe, task, quantize=quantize)
        try:
            config: LoraConfig | None = load_adapter(model, run)
        except (ValueError, RuntimeError) as exc:
            raise UserError(f"cannot load the adapter: {_one_line(exc)}", str(run)) from None
        adapted = [name for name, _ in lora_modules(model)]
    elif (run / FULL_MODEL_DIR / "config.json").is_file():
        # model_copy keeps the recipe's source, so errors still name its file.
        saved = str(run / FULL_MODEL_DIR)
        full = recipe.model_copy(update={"model": recipe.model.model_copy(update={"name_or_path": saved})})
        model, config, adapted = build_model(full, task), None, []
    else:
        raise UserError(f"no trained model here ({WEIGHTS_NAME} or {FULL_MODEL_DIR}/)", str(run))
    model.eval()
    return PreparedModel(model, tokenizer, config, adapted, model_counts(model))
