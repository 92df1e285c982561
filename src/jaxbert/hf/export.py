"""Export a jaxbert model as a directory HuggingFace transformers loads with ``from_pretrained``.

Post-LN models become BERT (``BertForMaskedLM``, or ``BertForSequenceClassification`` when a classifier is
kept beside the model); pre-LN models become ``RobertaPreLayerNormForMaskedLM`` /
``...ForSequenceClassification``, transformers' pre-LayerNorm BERT-style architecture (see
:mod:`jaxbert.hf.convert` for the position-table shift this needs). A finetuned model (``finetuned.json``)
exports as sequence classification with its label names. The directory holds model.safetensors,
config.json, tokenizer.json, vocab.txt, tokenizer_config.json, special_tokens_map.json, the sentence-transformers
files, a model card (README.md) and jaxbert's manifest.json (checksums); it is written under a temporary name and
renamed into place (:func:`jaxbert.io.atomic_dir`), and an existing non-empty target is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from safetensors.numpy import save_file

from .. import config as config_lib
from .. import io, modelcard
from ..checkpoint import CHECKPOINTS, MANIFEST, latest_checkpoint, load_pretrained, pretraining_facts
from ..finetune.model_dir import finetuned_dir, load_classifier
from ..inference.embed import sentence_transformers_files
from .convert import hf_config_from_model, model_to_hf_state
from ..model import BertForClassification, BertForMLM
from ..tokenizer import Tokenizer, load_tokenizer

_SPECIAL_NAMES = ("pad", "unk", "cls", "sep", "mask")


def load_source(path: str | Path) -> tuple[BertForMLM | BertForClassification, Tokenizer, Optional[dict[str, Any]]]:
    """(model, tokenizer, finetune metadata) from a jaxbert directory.

    A finetuned model (``jaxbert finetune``'s run dir or its ``best/``, or an imported classifier) gives a
    :class:`BertForClassification` and its ``finetuned.json``; a pretraining run, checkpoint or model directory
    gives a :class:`BertForMLM` and None.
    """
    path = Path(path)
    finetuned = finetuned_dir(path)
    if finetuned is not None:
        _, model, tokenizer, meta = load_classifier(finetuned)
        return model, tokenizer, meta
    saved, mlm, tokenizer_path = load_pretrained(path)
    if saved.train.objective != "mlm":
        raise ValueError(f"'{path}' was pretrained with train.objective={saved.train.objective}: HF export of "
                         "its discriminator is not supported yet; finetune it with jaxbert finetune --init")
    return mlm, load_tokenizer(tokenizer_path), None


def card_for(path: str | Path, command: Optional[str] = None) -> str:
    """The card to export a jaxbert directory with (its own card when it has one, else one rendered from it)."""
    path = Path(path)
    finetuned = finetuned_dir(path)
    if finetuned is not None:
        meta = json.loads((finetuned / "finetuned.json").read_text())
        cfg = config_lib.load_saved(finetuned)
        facts = pretraining_facts(str(meta.get("init") or "random"))
        fallback = modelcard.finetuned_card(cfg, meta, int(meta.get("num_labels", 1)), "unknown", facts)
        own = finetuned / modelcard.CARD
    else:
        if not (path / MANIFEST).is_file() and (path / CHECKPOINTS).is_dir():
            path = latest_checkpoint(path) or path
        fallback = modelcard.pretraining_card(config_lib.load_saved(path), pretraining_facts(path), "unknown")
        own = path / modelcard.CARD
    return modelcard.exported_card(own.read_text(encoding="utf-8") if own.is_file() else None, fallback, command)


def label_names(meta: Optional[dict[str, Any]], num_labels: int) -> Optional[dict[str, str]]:
    """HF ``id2label`` from finetune metadata (``id2label``, or the task's ``labels`` list), when it fits."""
    if not meta:
        return None
    if isinstance(meta.get("id2label"), dict) and len(meta["id2label"]) == num_labels:
        return {str(k): str(v) for k, v in meta["id2label"].items()}
    labels = meta.get("labels")
    if isinstance(labels, list) and len(labels) == num_labels:
        return {str(i): str(name) for i, name in enumerate(labels)}
    return None


def tokenizer_files(tokenizer: Tokenizer, max_length: int) -> dict[str, dict[str, Any]]:
    """tokenizer_config.json and special_tokens_map.json for a BERT WordPiece tokenizer."""
    specials = {f"{name}_token": tokenizer.id_to_token(getattr(tokenizer.special, name)) for name in _SPECIAL_NAMES}
    lowercase = bool(getattr(tokenizer.inner.normalizer, "lowercase", True))
    settings = {"tokenizer_class": "BertTokenizer", "do_lower_case": lowercase, "model_max_length": max_length,
                "tokenize_chinese_chars": True, "strip_accents": None, "clean_up_tokenization_spaces": False,
                **specials}
    return {"tokenizer_config.json": settings, "special_tokens_map.json": specials}


def export_hf(model: BertForMLM | BertForClassification, tokenizer: Tokenizer, out: str | Path, *,
              id2label: Optional[dict[str, str]] = None, pooling: str = "mean", normalize: bool = False,
              card: Optional[str] = None) -> Path:
    """Write ``model`` and ``tokenizer`` as an HF directory ``out`` (atomically; ``out`` must not hold files).

    The sentence-transformers files (``modules.json``, ``1_Pooling/config.json``, ...) for ``pooling`` and
    ``normalize`` go with it, so ``SentenceTransformer(out)`` loads it; ``card`` becomes its ``README.md``.
    """
    out = Path(out)
    io.check_empty(out)
    cfg = model.config
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ValueError(f"tokenizer {tokenizer.source}: {tokenizer.vocab_size} tokens, but the model's word "
                         f"embedding has {cfg.vocab_size} rows")
    num_labels = model.num_labels if isinstance(model, BertForClassification) else None
    special = tokenizer.special
    hf_config = hf_config_from_model(cfg, pad_id=special.pad, cls_id=special.cls, sep_id=special.sep,
                                     num_labels=num_labels)
    if id2label and num_labels is not None and len(id2label) == num_labels:
        hf_config["id2label"] = dict(id2label)
        hf_config["label2id"] = {name: int(i) for i, name in id2label.items()}
    state = model_to_hf_state(model, pad_id=special.pad)

    def write(tmp: Path) -> dict[str, Any]:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_json(tmp / "config.json", hf_config)
        tokenizer.save(tmp)
        for name, content in tokenizer_files(tokenizer, cfg.max_positions).items():
            _write_json(tmp / name, content)
        for name, content in sentence_transformers_files(cfg.hidden, cfg.max_positions, pooling, normalize).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            _write_json(tmp / name, content)
        if card is not None:
            modelcard.write_card(tmp, card)
        return {"kind": "hf-export"}

    return io.atomic_dir(out, write, exists="refuse")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    io.write_json(path, data, indent=2)


def export_directory(source: str | Path, out: str | Path, *, pooling: str = "mean", normalize: bool = False
                     ) -> tuple[Path, BertForMLM | BertForClassification, Optional[dict[str, Any]]]:
    """Export a jaxbert directory (pretraining run, checkpoint, model dir, or finetuned model) as the HF directory
    ``out``, with its model card and label names; returns (``out``, the model, its finetune metadata or None)."""
    model, tokenizer, meta = load_source(source)
    labels = None if meta is None else label_names(meta, model.num_labels)
    path = export_hf(model, tokenizer, out, id2label=labels, pooling=pooling, normalize=normalize,
                     card=card_for(source))
    return path, model, meta
