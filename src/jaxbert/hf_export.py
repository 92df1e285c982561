"""Export a jaxbert model as a directory HuggingFace transformers loads with ``from_pretrained``.

Post-LN models become BERT (``BertForMaskedLM``, or ``BertForSequenceClassification`` when a classifier is
kept beside the model); pre-LN models become ``RobertaPreLayerNormForMaskedLM`` /
``...ForSequenceClassification``, transformers' pre-LayerNorm BERT-style architecture (see
:mod:`jaxbert.hf_convert` for the position-table shift this needs). A finetuned model (``finetuned.json``)
exports as sequence classification with its label names. The directory holds model.safetensors,
config.json, tokenizer.json, vocab.txt, tokenizer_config.json, special_tokens_map.json, the sentence-transformers
files and a model card (README.md); it is written under
a temporary name and renamed into place, and an existing non-empty target is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Optional

from safetensors.numpy import save_file

from .embed import sentence_transformers_files
from .hf_convert import hf_config_from_model, model_to_hf_state
from .hf_import import check_target, move_into_place
from .model import BertForClassification, BertForMLM
from .tokenizer import Tokenizer, load_tokenizer

_SPECIAL_NAMES = ("pad", "unk", "cls", "sep", "mask")


def finetuned_dir(path: Path) -> Optional[Path]:
    """``path`` itself, or its ``best/``, when it is a finetuned-model directory (holds ``finetuned.json``)."""
    from .classifier import MARK

    for candidate in (path, path / "best"):
        if (candidate / MARK).is_file():
            return candidate
    return None


def load_source(path: str | Path) -> tuple[BertForMLM | BertForClassification, Tokenizer, Optional[dict[str, Any]]]:
    """(model, tokenizer, finetune metadata) from a jaxbert directory.

    A finetuned model (``jaxbert finetune``'s run dir or its ``best/``, or an imported classifier) gives a
    :class:`BertForClassification` and its ``finetuned.json``; a pretraining run, checkpoint or model directory
    gives a :class:`BertForMLM` and None.
    """
    from .checkpoint import load_pretrained
    from .classifier import load_classifier

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
        hf_config["id2label"] = dict(id2label)
        hf_config["label2id"] = {name: int(i) for i, name in id2label.items()}
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
        for name, content in sentence_transformers_files(cfg.hidden, cfg.max_positions, pooling, normalize).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            _write_json(tmp / name, content)
        if card is not None:
            (tmp / "README.md").write_text(card, encoding="utf-8")
        move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
