"""The HuggingFace interop commands: ``jaxbert import-hf`` (:func:`jaxbert.hf.importer.import_hf`) and
``jaxbert export`` (:func:`jaxbert.hf.export.export_hf`).

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

from .. import config as config_lib
from .export import export_directory
from .importer import import_hf

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
        out, model, meta = export_directory(args.source, args.out, pooling=args.pooling, normalize=args.normalize)
    _show_warnings(caught)
    cfg = model.config
    arch = ("BERT" if cfg.post_ln else "RobertaPreLayerNorm") + (" + MLM head" if meta is None else
                                                                   f" + classifier ({model.num_labels} labels)")
    print(f"exported {args.source} -> {out} as {arch} in {time.perf_counter() - start:.1f}s")
    return 0
