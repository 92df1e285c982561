"""Pure conversion between HuggingFace BERT state dicts and jaxbert models (no files, no tokenizer).

Two HuggingFace layouts are understood, one per jaxbert LayerNorm placement:

* ``bert`` (post-LN; ``BertModel`` / ``BertForMaskedLM`` / ``BertForSequenceClassification``, with or without
  the ``bert.`` prefix): ``attention.output.LayerNorm`` <-> ``attn_norm``, ``output.LayerNorm`` <-> ``ffn_norm``.
* ``roberta-prelayernorm`` (pre-LN; transformers' ``RobertaPreLayerNorm*``): ``attention.LayerNorm`` <->
  ``attn_norm``, ``intermediate.LayerNorm`` <-> ``ffn_norm``, the encoder's final ``LayerNorm`` <-> ``final_norm``.
  RoBERTa numbers positions from ``pad_token_id + 1`` (padding tokens get row ``pad_token_id``), so the
  exported position table is ours shifted down by ``pad_token_id + 1`` zero rows; import drops those rows.
  Its classification head is ``dense -> tanh -> out_proj`` on the first position, which is exactly jaxbert's
  pooler followed by the classifier, so ``classifier.dense`` <-> ``pooler``.

A bias-free model (``model.bias=false``, the default) exports zero biases, which compute exactly the same; import
always sets ``model.bias=true`` explicitly (HF BERT has biases), whatever the default. A gated feed-forward
(``model.ffn_type=glu``) has no HF BERT layout and is refused.

Dense weights are stored ``(in, out)`` in jaxbert and ``(out, in)`` in PyTorch; the fused ``qkv`` weight is
``[query.T | key.T | value.T]``. All conversions are transposes, concatenations and slices, so a round trip is
bitwise exact for float32 parameters.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PRNGKeyArray

from .. import io
from ..config import ModelConfig
from ..model import BertForClassification, BertForMLM, MLMHead
from ..model.layers import Dense

BERT, PRELN = "bert", "roberta-prelayernorm"
PREFIXES = {BERT: "bert.", PRELN: "roberta_prelayernorm."}
ARCHITECTURES = {(BERT, False): "BertForMaskedLM", (BERT, True): "BertForSequenceClassification",
                 (PRELN, False): "RobertaPreLayerNormForMaskedLM",
                 (PRELN, True): "RobertaPreLayerNormForSequenceClassification"}
ACTIVATIONS_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
ACTIVATIONS_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}  # the same function as gelu_new, faster in torch

# Parameter kinds: how a jaxbert module's leaves map to PyTorch tensors.
DENSE, NORM, TABLE, VECTOR = "dense", "norm", "table", "vector"
_LEAVES = {DENSE: (("weight", "weight", True), ("bias", "bias", False)),
           NORM: (("scale", "weight", False), ("bias", "bias", False)),
           TABLE: (("", "weight", False),), VECTOR: (("", "", False),)}

# jaxbert module (inside BertModel) -> (HF module inside the encoder prefix, kind)
_EMBEDDINGS = {"embeddings.token": ("embeddings.word_embeddings", TABLE),
               "embeddings.position": ("embeddings.position_embeddings", TABLE),
               "embeddings.segment": ("embeddings.token_type_embeddings", TABLE),
               "embeddings.norm": ("embeddings.LayerNorm", NORM)}
_LAYER = {BERT: {"out": ("attention.output.dense", DENSE), "attn_norm": ("attention.output.LayerNorm", NORM),
                 "ffn_in": ("intermediate.dense", DENSE), "ffn_out": ("output.dense", DENSE),
                 "ffn_norm": ("output.LayerNorm", NORM)},
          PRELN: {"out": ("attention.output.dense", DENSE), "attn_norm": ("attention.LayerNorm", NORM),
                  "ffn_in": ("intermediate.dense", DENSE), "ffn_out": ("output.dense", DENSE),
                  "ffn_norm": ("intermediate.LayerNorm", NORM)}}
_QKV = ("query", "key", "value")
# jaxbert head module -> HF module (no encoder prefix), per layout
_MLM = {BERT: {"mlm.transform": ("cls.predictions.transform.dense", DENSE),
               "mlm.norm": ("cls.predictions.transform.LayerNorm", NORM),
               "mlm.bias": ("cls.predictions.bias", VECTOR)},
        PRELN: {"mlm.transform": ("lm_head.dense", DENSE), "mlm.norm": ("lm_head.layer_norm", NORM),
                "mlm.bias": ("lm_head.bias", VECTOR)}}
_CLASSIFIER = {BERT: {"classifier": ("classifier", DENSE)}, PRELN: {"classifier": ("classifier.out_proj", DENSE)}}
_POOLER = {(BERT, False): "bert.pooler.dense", (BERT, True): "bert.pooler.dense",
           (PRELN, False): "roberta_prelayernorm.pooler.dense", (PRELN, True): "classifier.dense"}
_IGNORED = ("embeddings.position_ids", "embeddings.token_type_ids", "cls.predictions.decoder.bias",
            "lm_head.decoder.bias")


# --- configs -----------------------------------------------------------------------------------------------------


def layout_of(hf_config: Mapping[str, Any], source: str = "config.json") -> str:
    model_type = hf_config.get("model_type")
    if model_type not in (BERT, PRELN):
        raise ValueError(f"{source}: model_type {model_type!r} is not BERT (expected 'bert' or '{PRELN}')")
    return str(model_type)


def model_config_from_hf(hf_config: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """The jaxbert ModelConfig described by an HF ``config.json`` (bert or roberta-prelayernorm)."""
    layout = layout_of(hf_config, source)
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if not isinstance(hf_config.get(key), int):
            raise ValueError(f"{source}: missing or non-integer '{key}'")
    act = hf_config.get("hidden_act", "gelu")
    if act not in ACTIVATIONS_FROM_HF:
        raise ValueError(f"{source}: hidden_act {act!r} is not supported "
                         f"(expected one of {', '.join(ACTIVATIONS_FROM_HF)})")
    if hf_config.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{source}: position_embedding_type {hf_config['position_embedding_type']!r} is not "
                         "supported (expected 'absolute')")
    if hf_config.get("is_decoder") or hf_config.get("add_cross_attention"):
        raise ValueError(f"{source}: decoder / cross-attention BERT models are not supported")
    positions = int(hf_config.get("max_position_embeddings", 512))
    if layout == PRELN:
        positions -= position_offset(hf_config)
    return ModelConfig(
        vocab_size=hf_config["vocab_size"], hidden=hf_config["hidden_size"], layers=hf_config["num_hidden_layers"],
        heads=hf_config["num_attention_heads"], ffn=hf_config["intermediate_size"], max_positions=positions,
        type_vocab_size=int(hf_config.get("type_vocab_size", 2)), post_ln=(layout == BERT),
        dropout=float(hf_config.get("hidden_dropout_prob", 0.1)),
        attention_dropout=float(hf_config.get("attention_probs_dropout_prob", 0.1)),
        layer_norm_eps=float(hf_config.get("layer_norm_eps", 1e-12)),
        init_std=float(hf_config.get("initializer_range", 0.02)), activation=ACTIVATIONS_FROM_HF[act],
        bias=True)  # HF BERT's linear layers have biases, whatever jaxbert's default


def position_offset(hf_config: Mapping[str, Any]) -> int:
    """Rows in front of position 0 in a roberta-prelayernorm position table (``pad_token_id + 1``)."""
    pad = hf_config.get("pad_token_id")
    if not isinstance(pad, int) or pad < 0:
        raise ValueError(f"config.json: {PRELN} needs a non-negative integer pad_token_id, got {pad!r}")
    return pad + 1


def hf_config_from_model(cfg: ModelConfig, *, pad_id: int, cls_id: Optional[int] = None,
                         sep_id: Optional[int] = None, num_labels: Optional[int] = None) -> dict[str, Any]:
    """The HF ``config.json`` for a jaxbert model (BERT when post-LN, RobertaPreLayerNorm when pre-LN)."""
    check_exportable(cfg, num_labels is not None)
    layout = BERT if cfg.post_ln else PRELN
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURES[(layout, num_labels is not None)]], "model_type": layout,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden, "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads, "intermediate_size": cfg.ffn, "hidden_act": ACTIVATIONS_TO_HF[cfg.activation],
        "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.attention_dropout,
        "max_position_embeddings": cfg.max_positions + (pad_id + 1 if layout == PRELN else 0),
        "type_vocab_size": cfg.type_vocab_size, "initializer_range": cfg.init_std,
        "layer_norm_eps": cfg.layer_norm_eps, "pad_token_id": pad_id, "position_embedding_type": "absolute",
        "tie_word_embeddings": True, "torch_dtype": "float32",
    }
    if layout == PRELN:
        out.update(bos_token_id=cls_id, eos_token_id=sep_id)
    if num_labels is not None:
        out["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
        out["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
        if num_labels == 1:
            out["problem_type"] = "regression"
    return out


def skeleton(cfg: ModelConfig, num_labels: Optional[int] = None) -> BertForMLM | BertForClassification:
    """The model's structure with shapes only (no initialisation cost)."""
    key = jax.random.PRNGKey(0)
    if num_labels is None:
        return eqx.filter_eval_shape(BertForMLM, cfg, key=key)
    return eqx.filter_eval_shape(BertForClassification, cfg, num_labels, key=key)


# --- jaxbert -> HF ----------------------------------------------------------------------------------------------


def check_exportable(cfg: ModelConfig, classify: bool = False) -> None:
    """Raise ValueError when ``cfg`` has no HF BERT layout (a gated feed-forward; a classifier that pools the mean
    of the tokens)."""
    if cfg.ffn_type != "mlp":
        raise ValueError(f"model.ffn_type={cfg.ffn_type}: a gated feed-forward is not a BERT layout; "
                         "HF export needs model.ffn_type=mlp")
    if classify and cfg.pooling != "cls":
        raise ValueError(f"model.pooling={cfg.pooling}: HF sequence classification pools the [CLS] position; a "
                         "classifier finetuned with finetune.pooling=mean has no HF equivalent")


def _bias_of(ours: Mapping[str, Any], dense: str, xp: Any, index: Optional[int] = None) -> Any:
    """The bias of Dense ``dense``; zeros for a bias-free one (``model.bias=false``), which compute the same."""
    if dense + ".bias" in ours:
        value = ours[dense + ".bias"]
    else:
        weight = ours[dense + ".weight"]
        value = xp.zeros(weight.shape[:-2] + weight.shape[-1:], weight.dtype)
    return value if index is None else value[index]


def _module_to_hf(ours: Mapping[str, Any], name: str, hf: str, kind: str, out: dict[str, Any],
                  index: Optional[int] = None, xp: Any = np) -> None:
    for our_leaf, hf_leaf, transpose in _LEAVES[kind]:
        if kind == DENSE and our_leaf == "bias":
            value = _bias_of(ours, name, xp, index)
        else:
            value = ours[".".join(p for p in (name, our_leaf) if p)]
            value = value if index is None else value[index]
        out[".".join(p for p in (hf, hf_leaf) if p)] = value.T if transpose else value


def _to_hf(ours: Mapping[str, Any], cfg: ModelConfig, classify: bool, pad_id: int, xp: Any) -> dict[str, Any]:
    """The conversion, written once for numpy (``xp=np``) and for shape inference (``xp=jnp``)."""
    check_exportable(cfg, classify)
    layout = BERT if cfg.post_ln else PRELN
    prefix = PREFIXES[layout]
    out: dict[str, Any] = {}
    for name, (hf, kind) in _EMBEDDINGS.items():
        _module_to_hf(ours, "bert." + name, prefix + hf, kind, out)
    if layout == PRELN:
        table = out[prefix + "embeddings.position_embeddings.weight"]
        pad_rows = xp.zeros((pad_id + 1, cfg.hidden), table.dtype)
        out[prefix + "embeddings.position_embeddings.weight"] = xp.concatenate([pad_rows, table])
        _module_to_hf(ours, "bert.final_norm", prefix + "LayerNorm", NORM, out)
    for i in range(cfg.layers):
        base = f"{prefix}encoder.layer.{i}."
        for name, (hf, kind) in _LAYER[layout].items():
            _module_to_hf(ours, "bert.layers." + name, base + hf, kind, out, index=i, xp=xp)
        weights = xp.split(ours["bert.layers.qkv.weight"][i], 3, axis=1)
        biases = xp.split(_bias_of(ours, "bert.layers.qkv", xp, i), 3)
        for part, w, b in zip(_QKV, weights, biases):
            out[f"{base}attention.self.{part}.weight"] = w.T
            out[f"{base}attention.self.{part}.bias"] = b
    _module_to_hf(ours, "bert.pooler", _POOLER[(layout, classify)], DENSE, out)
    heads = _CLASSIFIER[layout] if classify else _MLM[layout]
    for name, (hf, kind) in heads.items():
        _module_to_hf(ours, name, hf, kind, out)
    return out


def model_to_hf_state(model: BertForMLM | BertForClassification, *, pad_id: int = 0) -> dict[str, np.ndarray]:
    """The HF state dict (float32 numpy, PyTorch layout) of a jaxbert MLM or classification model.

    Post-LN models use the BERT layout, pre-LN ones RobertaPreLayerNorm (``pad_id`` sets the position shift).
    The MLM decoder is tied to the word embeddings and therefore not written.
    """
    classify = isinstance(model, BertForClassification)
    out = _to_hf(io.named_arrays(model), model.config, classify, pad_id, np)
    return {name: np.ascontiguousarray(value) for name, value in out.items()}


def hf_shapes(model: BertForMLM | BertForClassification, *, pad_id: int = 0) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor :func:`model_to_hf_state` would write (works on a :func:`skeleton`)."""
    classify = isinstance(model, BertForClassification)
    ours = {k: v for k, v in io.named_leaves(model).items() if hasattr(v, "shape")}
    shapes = jax.eval_shape(lambda p: _to_hf(p, model.config, classify, pad_id, jnp), ours)
    return {name: tuple(value.shape) for name, value in shapes.items()}


# --- HF -> jaxbert ----------------------------------------------------------------------------------------------


class _Source:
    """An HF state dict with normalised names; ``take`` marks tensors used and converts them to float32 numpy."""

    def __init__(self, state: Mapping[str, Any], layout: str):
        prefix = PREFIXES[layout]
        encoder_roots = ("embeddings.", "encoder.", "pooler.", "LayerNorm.")
        self.tensors: dict[str, Any] = {}
        for key, value in state.items():
            key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
            if key.startswith(encoder_roots):
                key = prefix + key
            self.tensors[key] = value
        self.used: set[str] = set()
        self.expected: dict[str, tuple[int, ...]] = {}  # HF name -> shape the jaxbert config implies

    def has(self, key: str) -> bool:
        return key in self.tensors

    def take(self, key: str) -> np.ndarray:
        if key not in self.tensors:
            raise ValueError(f"weights: missing tensor '{key}'")
        self.used.add(key)
        raw = self.tensors[key]
        if hasattr(raw, "detach"):  # a torch tensor (possibly bf16, which numpy lacks)
            raw = raw.detach().float().numpy()
        value = np.asarray(raw, dtype=np.float32)
        want = self.expected.get(key)
        if want is not None and tuple(value.shape) != want:
            raise ValueError(f"weights: tensor '{key}' has shape {tuple(value.shape)}, expected {want} "
                             "from config.json")
        return value

    def unused(self) -> list[str]:
        return sorted(k for k in self.tensors if k not in self.used and not k.endswith(_IGNORED))


def _module_from_hf(src: _Source, name: str, hf_name: str, kind: str, out: dict[str, np.ndarray]) -> None:
    for our_leaf, hf_leaf, transpose in _LEAVES[kind]:
        value = src.take(".".join(p for p in (hf_name, hf_leaf) if p))
        out[".".join(p for p in (name, our_leaf) if p)] = value.T if transpose else value


def _encoder_from_hf(src: _Source, cfg: ModelConfig, layout: str, offset: int) -> dict[str, np.ndarray]:
    prefix = PREFIXES[layout]
    out: dict[str, np.ndarray] = {}
    for name, (hf, kind) in _EMBEDDINGS.items():
        _module_from_hf(src, "bert." + name, prefix + hf, kind, out)
    if layout == PRELN:
        out["bert.embeddings.position"] = out["bert.embeddings.position"][offset:]
        _module_from_hf(src, "bert.final_norm", prefix + "LayerNorm", NORM, out)
    per_layer: list[dict[str, np.ndarray]] = []
    for i in range(cfg.layers):
        base = f"{prefix}encoder.layer.{i}."
        layer: dict[str, np.ndarray] = {}
        for name, (hf, kind) in _LAYER[layout].items():
            _module_from_hf(src, "bert.layers." + name, base + hf, kind, layer)
        layer["bert.layers.qkv.weight"] = np.concatenate(
            [src.take(f"{base}attention.self.{p}.weight").T for p in _QKV], axis=1)
        layer["bert.layers.qkv.bias"] = np.concatenate([src.take(f"{base}attention.self.{p}.bias") for p in _QKV])
        per_layer.append(layer)
    for name in per_layer[0]:
        shapes = {layer[name].shape for layer in per_layer}
        if len(shapes) != 1:
            raise ValueError(f"weights: tensors of {name} differ in shape across layers: {sorted(shapes)}")
        out[name] = np.stack([layer[name] for layer in per_layer])
    return out


def _num_labels(src: _Source, layout: str, hf_config: Mapping[str, Any]) -> Optional[int]:
    """Labels of a sequence-classification head; None when there is none. Heads of other architectures
    (token classification, multiple choice, QA) are not jaxbert's, and are left unused."""
    key = f"{_CLASSIFIER[layout]['classifier'][0]}.weight"
    architectures = hf_config.get("architectures") or []
    sequence = not architectures or any(a.endswith("ForSequenceClassification") for a in architectures)
    return int(src.tensors[key].shape[0]) if sequence and src.has(key) else None


def _fresh(module: eqx.Module, prefix: str) -> dict[str, np.ndarray]:
    return {f"{prefix}.{name}" if name else prefix: value for name, value in io.named_arrays(module).items()}


def hf_state_to_model(state: Mapping[str, Any], hf_config: Mapping[str, Any], *,
                      key: Optional[PRNGKeyArray] = None) -> tuple[ModelConfig, BertForMLM | BertForClassification]:
    """A jaxbert model from an HF state dict (numpy or torch tensors) and its ``config.json`` dict.

    Returns a :class:`BertForClassification` when the state holds a classifier, else a :class:`BertForMLM`.
    Parts the checkpoint lacks (MLM head, pooler) get a fresh initialisation from ``key`` (default
    ``PRNGKey(0)``), with a warning. Raises ValueError naming the tensor on a missing tensor or a shape mismatch.
    """
    cfg = model_config_from_hf(hf_config)
    layout = BERT if cfg.post_ln else PRELN
    offset = position_offset(hf_config) if layout == PRELN else 0
    src = _Source(state, layout)
    num_labels = _num_labels(src, layout, hf_config)
    k_pool, k_mlm = jax.random.split(jax.random.PRNGKey(0) if key is None else key)
    shell = skeleton(cfg, num_labels)
    src.expected = hf_shapes(shell, pad_id=max(offset - 1, 0))
    params = _encoder_from_hf(src, cfg, layout, offset)
    pooler = _POOLER[(layout, num_labels is not None)]
    if src.has(pooler + ".weight"):
        _module_from_hf(src, "bert.pooler", pooler, DENSE, params)
    else:
        warnings.warn(f"weights: no '{pooler}' tensors; the pooler is freshly initialised", stacklevel=2)
        params.update(_fresh(Dense(cfg.hidden, cfg.hidden, cfg.init_std, key=k_pool), "bert.pooler"))
    heads = _CLASSIFIER[layout] if num_labels is not None else _MLM[layout]
    if num_labels is not None or src.has(heads["mlm.bias"][0]):
        for name, (hf, kind) in heads.items():
            _module_from_hf(src, name, hf, kind, params)
    else:
        warnings.warn("weights: no MLM head in the checkpoint; the MLM head is freshly initialised", stacklevel=2)
        params.update(_fresh(MLMHead(cfg, key=k_mlm), "mlm"))
    _check_tied_decoder(src, params, layout)
    unused = src.unused()
    if unused:
        warnings.warn(f"weights: {len(unused)} tensors not used: {', '.join(unused[:8])}"
                      + (" ..." if len(unused) > 8 else ""), stacklevel=2)
    return cfg, io.from_named(shell, params, "HF weights", allow_extra=True)


def _check_tied_decoder(src: _Source, params: dict[str, np.ndarray], layout: str) -> None:
    decoder = "cls.predictions.decoder.weight" if layout == BERT else "lm_head.decoder.weight"
    if src.has(decoder):
        if not np.array_equal(src.take(decoder), params["bert.embeddings.token"]):
            warnings.warn(f"weights: '{decoder}' differs from the word embeddings; jaxbert ties the MLM decoder "
                          "to the embeddings, so it is not used", stacklevel=3)
