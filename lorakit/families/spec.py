"""What lorakit knows of each model family, keyed by Hugging Face ``config.model_type``: one ``FamilySpec``
a family, in one table (``FAMILIES``).

Plain data (no torch, no transformers import): the LoRA core (``lorakit.lora``) never reads this table; the
rest of this package turns it into what the core takes (target names, ``LoraConfig.fused_slices``). Every
module name was checked against the installed transformers by building each family's tiny model
(tests/test_families.py, tests/test_fused_families.py, tests/test_family_spec.py). The only code here is
the arithmetic that sizes a fused projection's slices from a config's attributes, read by duck typing: a
Hugging Face ``PretrainedConfig`` or any object with the same attributes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

# A Hugging Face PretrainedConfig; any object with the attributes will do.
HfConfig = Any
# The rows of a fused projection's output as its attention code reads them: the rows of each slice (in the
# order of its slice names) within one group, and how many groups repeat that pattern (1: contiguous
# blocks, q's rows then k's then v's; num_heads or num_kv_heads: a per-head layout).
SliceRows = Callable[[HfConfig], "tuple[tuple[int, ...], int]"]

# The sequence-classification head of a family this table does not know: transformers' two usual names,
# of which callers keep those the model has (lorakit.models filters them by presence).
DEFAULT_HEADS = ("classifier", "score")


@dataclass(frozen=True)
class FamilySpec:
    """Everything lorakit knows of one model family (one Hugging Face ``model_type``)."""

    # The LoRA paper's choice (W_q and W_v) in target_modules notation: module-name suffixes, and
    # "c_attn[q,v]" for slices q and v of a fused projection. None: no default, the user picks.
    paper_targets: tuple[str, ...] | None
    # Freshly initialised modules of the sequence classifier: trained and saved with the adapter.
    seq_cls_heads: tuple[str, ...] = DEFAULT_HEADS
    # Module-name suffix of the classifier's output projection: its rows are the labels, so an adapter
    # file that saves the head tells the label count without a recipe (``lorakit predict`` of a PEFT dir).
    head_output: str = "classifier"
    # Fused q|k|v projections: module-name suffix -> slice names in order.
    fused_slices: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}))
    # The rows of each slice and the groups they repeat in, from the model's config (``SliceRows``): the
    # core adapts whichever rows it is told, so a layout declared otherwise is refused
    # (``lorakit.families.check_slice_targets``).
    slice_rows: SliceRows | None = None
    # Position ids start past the pad id (RoBERTa's create_position_ids_from_input_ids): the position
    # table holds pad_token_id + 1 fewer tokens than max_position_embeddings says.
    positions_past_pad: bool = False
    # A config attribute that, when false, leaves the model without an absolute position table (relative
    # positions only, so no length limit from it): DeBERTa's position_biased_input.
    absolute_positions_flag: str | None = None


def _head_dim(config: HfConfig) -> int:
    # As the models compute it: an explicit head_dim (Phi-3 may set one) wins over hidden / heads.
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def _gpt2_rows(config: HfConfig) -> tuple[tuple[int, ...], int]:
    # Conv1D(3 · n_embd, n_embd), split with .split(n_embd) in GPT2Attention: equal thirds.
    d = int(config.n_embd)
    return (d, d, d), 1


def _phi3_rows(config: HfConfig) -> tuple[tuple[int, ...], int]:
    # Phi3Attention: query_pos = num_attention_heads · head_dim, then num_key_value_heads · head_dim each.
    head = _head_dim(config)
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    q, kv = int(config.num_attention_heads) * head, int(kv_heads) * head
    return (q, kv, kv), 1


def _gpt_bigcode_rows(config: HfConfig) -> tuple[tuple[int, ...], int]:
    # GPTBigCodeAttention with multi_query (its default, StarCoder's): c_attn(x).split((embed_dim, kv_dim,
    # kv_dim)), one k/v head. Without it: c_attn(x).view(..., num_heads, 3 · head_dim), q|k|v per head.
    hidden, heads = int(config.n_embd), int(config.n_head)
    head = hidden // heads
    if getattr(config, "multi_query", True):
        return (hidden, head, head), 1
    return (head, head, head), heads


def _modernbert_rows(config: HfConfig) -> tuple[tuple[int, ...], int]:
    # ModernBertAttention: Wqkv(x).view(..., 3, -1, head_dim): q, k, v each num_heads · head_dim rows.
    d = int(config.hidden_size) // int(config.num_attention_heads) * int(config.num_attention_heads)
    return (d, d, d), 1


def _per_head_rows(config: HfConfig) -> tuple[tuple[int, ...], int]:
    # GPTNeoXAttention: query_key_value(x).view(..., -1, 3 · head_size).chunk(3); BloomAttention._reshape:
    # .view(..., num_heads, 3, head_dim). q|k|v of head 0, then of head 1...
    heads = int(config.num_attention_heads)  # BLOOM's n_head, through its attribute_map
    head = int(config.hidden_size) // heads
    return (head, head, head), heads


def _falcon_rows(config: HfConfig) -> tuple[tuple[int, ...], int]:
    # FalconAttention: with new_decoder_architecture, .view(..., num_kv_heads, -1, head_dim): each key/value
    # group's q heads, then its k and v (Falcon-40B/180B); with multi_query, .split([num_heads, 1, 1]) on
    # head_dim rows: contiguous q|k|v (Falcon-7B); otherwise .unflatten(-2, (num_heads, 3)): per head.
    heads = int(config.num_attention_heads)
    head = int(config.hidden_size) // heads
    if getattr(config, "new_decoder_architecture", False):
        kv_heads = int(config.num_kv_heads)
        return (heads // kv_heads * head, head, head), kv_heads
    if getattr(config, "multi_query", True):
        return (heads * head, head, head), 1
    return (head, head, head), heads


QKV = ("q", "k", "v")
# The paper adapts the attention query and value projections only (LoRA, sections 4 and 7).
_QV = ("q_proj", "v_proj")
_ENCODER_QV = ("query", "value")
# The decoders' classifiers read the last non-pad token's state through one bias-free ``score``
# projection, fresh in every causal-LM checkpoint.
_SCORE = ("score",)


def _spec(**kwargs: Any) -> FamilySpec:
    # Mappings read-only, so the shared table cannot be changed by a caller that edits what it was given.
    if "fused_slices" in kwargs:
        kwargs["fused_slices"] = MappingProxyType(dict(kwargs["fused_slices"]))
    return FamilySpec(**kwargs)


FAMILIES: Mapping[str, FamilySpec] = MappingProxyType(
    {
        # RoBERTa's ``classifier`` is a dense + tanh layer on the first token followed by the output
        # projection (``out_proj``), the head the paper trains. Listed first: ``head_outputs`` keeps this
        # order, in which no suffix shadows another.
        "roberta": _spec(
            paper_targets=_ENCODER_QV,
            seq_cls_heads=("classifier",),
            head_output="out_proj",
            positions_past_pad=True,
        ),
        "xlm-roberta": _spec(
            paper_targets=_ENCODER_QV,
            seq_cls_heads=("classifier",),
            head_output="out_proj",
            positions_past_pad=True,
        ),
        # CamemBERT is RoBERTa's code under another name (CamembertClassificationHead included).
        "camembert": _spec(
            paper_targets=_ENCODER_QV,
            seq_cls_heads=("classifier",),
            head_output="out_proj",
            positions_past_pad=True,
        ),
        # BERT splits RoBERTa's two head layers into ``pooler`` and ``classifier``; its pooler comes from
        # next-sentence prediction, which later BERT-family checkpoints (sentence-transformers' MiniLM
        # among them) never trained, so it trains with the classifier, as RoBERTa's dense layer does.
        "bert": _spec(paper_targets=_ENCODER_QV, seq_cls_heads=("classifier", "pooler")),
        "electra": _spec(paper_targets=_ENCODER_QV, seq_cls_heads=("classifier",), head_output="out_proj"),
        # DeBERTa-v2's ContextPooler is not in the pretrained checkpoints at all: it belongs with the head.
        "deberta-v2": _spec(
            paper_targets=("query_proj", "value_proj"),
            seq_cls_heads=("classifier", "pooler"),
            absolute_positions_flag="position_biased_input",
        ),
        # DeBERTa v1 fuses q|k|v in one in_proj; adapting it whole is the fallback.
        "deberta": _spec(
            paper_targets=("in_proj",),
            seq_cls_heads=("classifier", "pooler"),
            absolute_positions_flag="position_biased_input",
        ),
        # DistilBERT's pre_classifier is RoBERTa's dense layer, absent from its masked-LM checkpoints.
        "distilbert": _spec(paper_targets=("q_lin", "v_lin"), seq_cls_heads=("pre_classifier", "classifier")),
        # Fused q|k|v in contiguous blocks: the q and v slices, as loralib's MergedLinear adapts them.
        # Adapting the whole fused module would silently adapt W_k too, which is not the paper's choice.
        "gpt2": _spec(
            paper_targets=("c_attn[q,v]",),
            seq_cls_heads=_SCORE,
            head_output="score",
            fused_slices={"c_attn": QKV},
            slice_rows=_gpt2_rows,
        ),
        # Decoders with separate projections (Llama's naming, which the others copied). Phi keeps q/k/v
        # apart too (its output projection is ``dense``); OPT's attention is BART's (``out_proj``).
        **{
            t: _spec(paper_targets=_QV, seq_cls_heads=_SCORE, head_output="score")
            for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi", "opt")
        },
        # BART's classifier reads the last EOS token's state through ``classification_head`` (dense, tanh,
        # ``out_proj``), fresh in its pretrained checkpoints; q_proj/v_proj name the encoder's and decoder's
        # self-attention and the decoder's cross-attention alike, as PEFT's suffix match adapts them.
        "bart": _spec(paper_targets=_QV, seq_cls_heads=("classification_head",), head_output="out_proj"),
        # Grouped-query attention: k and v narrower than q, by the checkpoint's head counts (Phi-3-mini's
        # qkv_proj is 3072 | 3072 | 3072, Phi-3-medium's 5120 | 1280 | 1280).
        "phi3": _spec(
            paper_targets=("qkv_proj[q,v]",),
            seq_cls_heads=_SCORE,
            head_output="score",
            fused_slices={"qkv_proj": QKV},
            slice_rows=_phi3_rows,
        ),
        # Multi-query (one k/v head after a wide q) by default, per head without it.
        "gpt_bigcode": _spec(
            paper_targets=("c_attn[q,v]",),
            seq_cls_heads=_SCORE,
            head_output="score",
            fused_slices={"c_attn": QKV},
            slice_rows=_gpt_bigcode_rows,
        ),
        # ModernBERT pools through ``head`` (dense, activation, norm) into ``classifier``; ``head`` is the
        # masked-LM checkpoint's own transform, retrained here as BERT's pooler is. Equal slices.
        "modernbert": _spec(
            paper_targets=("Wqkv[q,v]",),
            seq_cls_heads=("head", "classifier"),
            fused_slices={"Wqkv": QKV},
            slice_rows=_modernbert_rows,
        ),
        # Fused q|k|v laid out per head (per key/value group for Falcon's newer models): each slice is
        # every group's share of it, adapted as one LoRA pair whose B rows follow the heads.
        **{
            t: _spec(
                paper_targets=("query_key_value[q,v]",),
                seq_cls_heads=_SCORE,
                head_output="score",
                fused_slices={"query_key_value": QKV},
                slice_rows=rows,
            )
            for t, rows in (("gpt_neox", _per_head_rows), ("bloom", _per_head_rows), ("falcon", _falcon_rows))
        },
    }
)


def family(model_type: str | None) -> FamilySpec | None:
    """The spec of a Hugging Face ``model_type`` (None for a family lorakit does not know)."""
    return FAMILIES.get(model_type or "")


def paper_targets(model_type: str) -> list[str]:
    """The paper's target modules for an architecture; KeyError says how to choose them instead."""
    spec = family(model_type)
    if spec is None or spec.paper_targets is None:
        # One line that a recipe author can act on: the three forms ``target_modules`` accepts.
        raise KeyError(
            f"no default LoRA targets for model type {model_type!r}; set lora.target_modules, "
            "e.g. [q_proj, v_proj] (module names), a regular expression, or all-linear"
        )
    return list(spec.paper_targets)


def seq_cls_heads(model_type: str) -> list[str]:
    """Head modules of a sequence-classification model of this architecture (transformers' two usual
    names for one this table does not know: keep those the model has)."""
    spec = family(model_type)
    return list(spec.seq_cls_heads if spec is not None else DEFAULT_HEADS)


def head_outputs() -> tuple[str, ...]:
    """Weight-name suffixes of the classifiers' output projections, every known family's, in table order:
    the first that an adapter file holds gives its label count (its rows)."""
    return tuple(dict.fromkeys(f"{s.head_output}.weight" for s in FAMILIES.values()))
