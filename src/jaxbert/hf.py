"""HuggingFace interop: ``jaxbert import-hf`` and ``jaxbert export``.

The work lives in three modules: :mod:`jaxbert.hf_convert` (pure state-dict <-> model conversion),
:mod:`jaxbert.hf_import` (HF directory -> jaxbert model directory) and :mod:`jaxbert.hf_export` (jaxbert run,
checkpoint or model directory -> HF directory). This module holds the command-line entry points and re-exports
the public functions.

Examples::

    jaxbert import-hf path/to/bert-base-uncased --out models/bert-base
    jaxbert export runs/small-20260101-120000 exported/small
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from typing import Optional, Sequence

from . import config as config_lib
from .hf_convert import hf_config_from_model, hf_state_to_model, model_config_from_hf, model_to_hf_state
from .hf_export import export_hf, label_names, load_source
from .hf_import import import_hf
from .modelcard import card_for

__all__ = ["import_hf", "export_hf", "load_source", "hf_state_to_model", "model_to_hf_state",
           "model_config_from_hf", "hf_config_from_model", "import_main", "export_main"]


def _show_warnings(caught: list[warnings.WarningMessage]) -> None:
    for item in caught:
        print(f"warning: {item.message}")


def import_main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="jaxbert import-hf",
        description="Convert a HuggingFace BERT directory (config.json, model.safetensors or pytorch_model.bin, "
                    "vocab.txt or tokenizer.json) into a jaxbert model directory.")
    parser.add_argument("source", help="HF model directory (BertModel / BertForMaskedLM / "
                                       "BertForSequenceClassification, or an export of jaxbert)")
    parser.add_argument("--out", required=True, help="new jaxbert model directory (must not exist or be empty)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = import_hf(args.source, args.out)
    _show_warnings(caught)
    m = config_lib.load_saved(out).model
    finetuned = out / "finetuned.json"
    extra = ""
    if finetuned.is_file():
        extra = f", classifier with {json.loads(finetuned.read_text())['num_labels']} labels (a finetuned model)"
    print(f"imported {args.source} -> {out} in {time.perf_counter() - start:.1f}s: {m.layers} layers, "
          f"hidden {m.hidden}, {m.heads} heads, vocab {m.vocab_size}, "
          f"{'post-LN' if m.post_ln else 'pre-LN'}, activation {m.activation}{extra}")
    return 0


def export_main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="jaxbert export",
        description="Write a jaxbert model as a HuggingFace directory (model.safetensors, config.json, tokenizer "
                    "files) that transformers loads with from_pretrained. Post-LN models export as BERT, pre-LN "
                    "models as RobertaPreLayerNorm.")
    parser.add_argument("source", help="a jaxbert pretraining run (its latest checkpoint), checkpoint or model "
                                       "directory, or a finetuned model (finetune run dir or its best/)")
    parser.add_argument("out", help="new output directory (must not exist or be empty)")
    parser.add_argument("--pooling", default="mean", choices=("mean", "cls"),
                        help="sentence-transformers pooling written with the export (default mean)")
    parser.add_argument("--normalize", action="store_true", help="sentence-transformers: unit-length embeddings")
    args = parser.parse_args(list(argv) if argv is not None else None)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, tokenizer, meta = load_source(args.source)
        labels = None if meta is None else label_names(meta, model.num_labels)
        out = export_hf(model, tokenizer, args.out, id2label=labels, pooling=args.pooling, normalize=args.normalize,
                        card=card_for(args.source))
    _show_warnings(caught)
    cfg = model.config
    arch = ("BERT" if cfg.post_ln else "RobertaPreLayerNorm") + (" + MLM head" if meta is None else
                                                                   f" + classifier ({model.num_labels} labels)")
    print(f"exported {args.source} -> {out} as {arch} in {time.perf_counter() - start:.1f}s")
    return 0
