"""Command-line entry points of the inference stage: ``jaxbert predict``, ``evaluate``, ``fill-mask`` and
``embed``. Each parses its arguments, loads the model through :func:`jaxbert.inference.api.load` and calls the
library functions of :mod:`.predict`, :mod:`.fill_mask` and :mod:`.embed`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

from .. import config as config_lib
from .. import io
from ..data.glue import INDEX_COLUMNS, Columns, get_task
from ..finetune.metrics import task_score
from .api import load
from .embed import POOLINGS, read_texts, save_array
from .predict import evaluate_model, input_split, write_predictions


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a finetuned model: a finetune run dir, its best/, or an imported classifier")
    parser.add_argument("--precision", default=None, choices=("fp32", "bf16", "fp16"),
                        help="compute precision (default: the model's finetune.precision)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="rows per batch (default: the model's finetune.eval_batch_size)")


def predict_main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxbert predict", description="Predict a label (with its probability "
                                     "per class) or a score for every row of a file, in input order.")
    _common(parser)
    parser.add_argument("--input", required=True, help="tsv, csv, jsonl, json or parquet file (or .txt: one text "
                        "per line)")
    parser.add_argument("--text-a", default=None, help="column of the first text (default: the task's usual names)")
    parser.add_argument("--text-b", default=None, help="column of the second text, for sentence-pair models")
    parser.add_argument("--index-column", default=None, help=f"id column copied to the output (default: one of "
                        f"{', '.join(INDEX_COLUMNS)}, else the row number)")
    parser.add_argument("--out", required=True, help="predictions file: .tsv or .jsonl")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(list(argv) if argv is not None else None)
    model = load(args.model)
    data = input_split(args.input, model.task, Columns(args.text_a, args.text_b, None, args.index_column))
    preds = model.predict_split(data, batch_size=args.batch_size, precision=args.precision,
                                progress=not args.no_progress)
    out = write_predictions(args.out, data.index, preds)
    pairs = "pairs" if data.text_b is not None else "texts"
    print(f"wrote {len(preds)} predictions ({pairs}; {model.task.name}) to {out}")
    return 0


def evaluate_main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxbert evaluate", description="Dev-set metrics of a finetuned model "
                                     "(no training).")
    _common(parser)
    parser.add_argument("--task", default=None, help="GLUE task (default: the one the model was finetuned on)")
    parser.add_argument("--glue-dir", default=None, help="GLUE data directory, or 'hf' (default: the model's own)")
    parser.add_argument("--out", default=None, help="also write the metrics as JSON here")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. finetune.dev_file=held_out.tsv finetune.max_eval_examples=500")
    args = parser.parse_args(list(argv) if argv is not None else None)
    model = load(args.model)
    extra = [f"finetune.glue_dir={args.glue_dir}"] if args.glue_dir else []
    extra += [f"finetune.{k}={v}" for k, v in (("precision", args.precision), ("eval_batch_size", args.batch_size))
              if v is not None]
    cfg = config_lib.load(str(model.directory / "config.yaml"), extra + list(args.overrides), stored=True)
    task = get_task(args.task) if args.task else model.task
    results = evaluate_model(model.model, model.tokenizer, cfg, task)
    score = task_score(results)
    for split, metrics in results.items():
        print(f"{task.name} {split}: " + "  ".join(f"{m} {100 * v:.2f}" for m, v in metrics.items()))
    print(f"{task.name} score {100 * score:.2f}")
    if args.out:
        io.write_atomic(Path(args.out), json.dumps({"task": task.name, "model": str(model.directory), "dev": results,
                                                 "score": score}, indent=1) + "\n")
    return 0



def fill_mask_main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxbert fill-mask", description="The most likely tokens for each "
                                     "[MASK] of a text.")
    parser.add_argument("model", help="a pretraining run (its newest checkpoint), a checkpoint or a model dir")
    parser.add_argument("texts", nargs="+", help="text(s) holding [MASK]")
    parser.add_argument("--top-k", type=int, default=5, help="candidates shown per [MASK] (default 5)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    model = load(args.model)
    for text in args.texts:
        print(text)
        for number, candidates in enumerate(model.fill_mask(text, top_k=args.top_k), 1):
            print(f"  [MASK] {number}:")
            for c in candidates:
                print(f"    {c.token:<16} {c.probability:.4f}   {c.text}")
    return 0




def embed_main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxbert embed", description="Sentence embeddings of a jaxbert model "
                                     "(pretrained, imported or finetuned) as a float32 .npy array, input order.")
    parser.add_argument("model", help="a pretraining run, checkpoint, model dir or finetuned model")
    parser.add_argument("--input", required=True, help=".txt (one text per line) or a tsv/csv/jsonl/parquet file")
    parser.add_argument("--column", default=None, help="text column of a table file (default: text)")
    parser.add_argument("--pooling", default="mean", choices=POOLINGS, help="mean of the token states, or [CLS]")
    parser.add_argument("--normalize", action="store_true", help="unit-length embeddings")
    parser.add_argument("--max-len", type=int, default=None, help="tokens per text (default: model.max_positions)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--out", required=True, help="output .npy file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(list(argv) if argv is not None else None)
    model = load(args.model)
    texts = read_texts(args.input, args.column)
    vectors = model.encode(texts, pooling=args.pooling, normalize=args.normalize, max_len=args.max_len,
                           batch_size=args.batch_size, precision=args.precision, progress=not args.no_progress)
    out = save_array(args.out, vectors)
    print(f"wrote {vectors.shape[0]} x {vectors.shape[1]} {args.pooling}-pooled embeddings to {out}")
    return 0

