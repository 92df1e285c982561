"""Export a jaxbert model as a directory HuggingFace transformers loads with ``from_pretrained``.

Post-LN models become BERT (``BertForMaskedLM``, or ``BertForSequenceClassification`` when a classifier is
kept beside the model); pre-LN models become ``RobertaPreLayerNormForMaskedLM`` /
``...ForSequenceClassification``, transformers' pre-LayerNorm BERT-style architecture (see
:mod:`jaxbert.hf_convert` for the position-table shift this needs). The directory holds model.safetensors,
config.json, tokenizer.json, vocab.txt, tokenizer_config.json and special_tokens_map.json; it is written under
a temporary name and renamed into place, and an existing non-empty target is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
from safetensors.numpy import save_file

from .hf_convert import from_flat, flat_params, hf_config_from_model, model_to_hf_state, skeleton
from .hf_import import check_target, load_classifier, move_into_place
from .model import BertForClassification, BertForMLM
from .tokenizer import Tokenizer, load_tokenizer

_SPECIAL_NAMES = ("pad", "unk", "cls", "sep", "mask")


def load_source(path: str | Path, head: str = "auto") -> tuple[BertForMLM | BertForClassification, Tokenizer,
                                                                Optional[dict[str, Any]]]:
    """(model, tokenizer, classifier metadata) from a jaxbert run, checkpoint or model directory.

    ``head``: ``auto`` (the classifier when one is kept beside the model, else the MLM head), ``mlm`` or
    ``classifier`` (an error when there is none).
    """
    from .checkpoint import load_pretrained

    if head not in ("auto", "mlm", "classifier"):
        raise ValueError(f"head {head!r}: expected auto, mlm or classifier")
    _, mlm, tokenizer_path = load_pretrained(path)
    tokenizer = load_tokenizer(tokenizer_path)
    found = None if head == "mlm" else load_classifier(Path(tokenizer_path).parent)
    if found is None:
        if head == "classifier":
            raise FileNotFoundError(f"'{path}': no classifier is kept beside this model (classifier.json)")
        return mlm, tokenizer, None
    classifier, meta = found
    params = {k: v for k, v in flat_params(mlm).items() if k.startswith("bert.")}
    params.update({"classifier.weight": np.asarray(classifier.weight), "classifier.bias": np.asarray(classifier.bias)})
    model = from_flat(skeleton(mlm.config, int(classifier.bias.shape[0])), params)
    return model, tokenizer, meta


def tokenizer_files(tokenizer: Tokenizer, max_length: int) -> dict[str, dict[str, Any]]:
    """tokenizer_config.json and special_tokens_map.json for a BERT WordPiece tokenizer."""
    specials = {f"{name}_token": tokenizer.id_to_token(getattr(tokenizer.special, name)) for name in _SPECIAL_NAMES}
    lowercase = bool(getattr(tokenizer.inner.normalizer, "lowercase", True))
    settings = {"tokenizer_class": "BertTokenizer", "do_lower_case": lowercase, "model_max_length": max_length,
                "tokenize_chinese_chars": True, "strip_accents": None, "clean_up_tokenization_spaces": False,
                **specials}
    return {"tokenizer_config.json": settings, "special_tokens_map.json": specials}


def export_hf(model: BertForMLM | BertForClassification, tokenizer: Tokenizer, out: str | Path, *,
              id2label: Optional[dict[str, str]] = None) -> Path:
    """Write ``model`` and ``tokenizer`` as an HF directory ``out`` (atomically; ``out`` must not hold files)."""
    out = Path(out)
    check_target(out)
    cfg = model.config
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ValueError(f"tokenizer {tokenizer.source}: {tokenizer.vocab_size} tokens, but the model's word "
                         f"embedding has {cfg.vocab_size} rows")
    num_labels = model.num_labels if isinstance(model, BertForClassification) else None
    special = tokenizer.special
    hf_config = hf_config_from_model(cfg, pad_id=special.pad, cls_id=special.cls, sep_id=special.sep,
                                     num_labels=num_labels)
    if id2label and num_labels is not None and len(id2label) == num_labels:
        hf_config["id2label"] = {str(k): v for k, v in id2label.items()}
        hf_config["label2id"] = {v: int(k) for k, v in id2label.items()}
    if not cfg.post_ln and cfg.activation != "gelu" and num_labels is None:
        warnings.warn("RobertaPreLayerNorm's MLM head always uses exact GELU; this model's head uses "
                      f"{cfg.activation}, so HF MLM logits will differ slightly (hidden states are exact)",
                      stacklevel=2)
    state = model_to_hf_state(model, pad_id=special.pad)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_json(tmp / "config.json", hf_config)
        tokenizer.save(tmp)
        for name, content in tokenizer_files(tokenizer, cfg.max_positions).items():
            _write_json(tmp / name, content)
        move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
