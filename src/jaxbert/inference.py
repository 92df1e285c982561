"""Using a finetuned model: ``jaxbert predict`` (a label and its probabilities, or a score, for every row of a
file) and ``jaxbert evaluate`` (dev metrics, no training).

Both read any finetuned model (a finetune run dir, its ``best/``, or an imported HF classifier) and reuse the
finetuning code's batching and prediction (:func:`jaxbert.finetune.predict`), so a model predicts exactly what
it predicted at the end of its run. Rows come back in input order.

Examples::

    jaxbert predict runs/finetune/rte-x --input data.tsv --out preds.tsv
    jaxbert predict runs/finetune/custom-x --input reviews.jsonl --text-a review --out preds.tsv --precision bf16
    jaxbert evaluate runs/finetune/rte-x --task rte --glue-dir glue
    jaxbert evaluate runs/finetune/custom-x finetune.dev_file=held_out.csv
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from . import config as config_lib
from .config import Config
from .data.glue import (CUSTOM_TEXT_A, INDEX_COLUMNS, Columns, SplitData, Task, custom_task, get_task,
                        has_split, missing_reason, read_split, read_table, to_split)
from .data.pairs import Encoded, encode_split
from .data.task_data import columns_of
from .metrics import task_score
from .precision import Policy

CHUNK_BATCHES = 64  # batches encoded and predicted together (bounds memory; one progress-bar update each)


# ----------------------------------------------------------------------------------------------- the task


def model_labels(meta: dict[str, Any], num_labels: int) -> tuple[str, ...]:
    """Class names in class-id order from ``finetuned.json`` (``labels``, else ``id2label``, else
    ``LABEL_i``); ``()`` for a one-output (regression) head."""
    if num_labels == 1:
        return ()
    labels = meta.get("labels")
    if isinstance(labels, list) and len(labels) == num_labels:
        return tuple(str(x) for x in labels)
    id2label = meta.get("id2label")
    if isinstance(id2label, dict) and len(id2label) == num_labels:
        return tuple(str(id2label.get(str(i), f"LABEL_{i}")) for i in range(num_labels))
    return tuple(f"LABEL_{i}" for i in range(num_labels))


def model_task(cfg: Config, meta: dict[str, Any], num_labels: int) -> Task:
    """The task a finetuned model was trained for: its GLUE entry, or a custom task with the model's label names
    and the text columns its config records (``finetune.text_a/text_b``)."""
    try:
        task = get_task(str(meta.get("task") or ""))
        if task.num_labels == num_labels:
            return task
    except ValueError:
        pass
    f = cfg.finetune
    text_a = (f.text_a,) if f.text_a else CUSTOM_TEXT_A
    return custom_task(model_labels(meta, num_labels), text_a, (f.text_b,) if f.text_b else ())


# ------------------------------------------------------------------------------------------- predictions


@dataclass(frozen=True)
class Predictions:
    """Head outputs of ``n`` examples in input order, with the class names to read them."""

    outputs: np.ndarray  # float32 (n, num_labels): logits, or (n, 1) regression scores
    labels: tuple[str, ...]  # class names in class-id order; () for a regression

    def __len__(self) -> int:
        return len(self.outputs)

    @property
    def regression(self) -> bool:
        return not self.labels

    @property
    def probabilities(self) -> Optional[np.ndarray]:
        """Softmax of the logits, float32 (n, classes); None for a regression."""
        if self.regression:
            return None
        shifted = self.outputs - self.outputs.max(-1, keepdims=True)
        e = np.exp(shifted)
        return (e / e.sum(-1, keepdims=True)).astype(np.float32)

    @property
    def predictions(self) -> list:
        """The predicted class name of every example, or its score (a float) for a regression."""
        if self.regression:
            return [float(v) for v in self.outputs[:, 0]]
        return [self.labels[i] for i in self.outputs.argmax(-1)]


def predict_split(model: Any, data: SplitData, tokenizer: Any, *, max_len: int, batch_size: int,
                  pad_multiple: int, policy: Policy, attention: str, progress: bool = False) -> np.ndarray:
    """float32 head outputs of every row of ``data``, in row order, encoded and predicted a chunk of
    ``CHUNK_BATCHES`` batches at a time (by :func:`jaxbert.finetune.predict`)."""
    from .finetune import predict

    chunk = CHUNK_BATCHES * batch_size
    outputs = [np.zeros((0, model.num_labels), np.float32)]
    with tqdm(total=len(data), unit="row", desc="predict", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(data), chunk):
            part = data.take(np.arange(start, min(start + chunk, len(data))))
            outputs.append(predict(model, encode_split(part, tokenizer, max_len), batch_size, pad_multiple,
                                   policy, attention))
            bar.update(len(part))
    return np.concatenate(outputs)


def input_split(path: str | Path, task: Task, columns: Columns = Columns()) -> SplitData:
    """The rows of a tsv/csv/jsonl/json/parquet file (or a .txt file, one text per line) as unlabelled
    examples of ``task``; texts from ``columns`` or the task's usual column names."""
    path = Path(path)
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise FileNotFoundError(f"input file '{path}' does not exist")
        lines = path.read_text(encoding="utf-8").splitlines()
        table: dict[str, list] = {"text": [line for line in lines if line.strip()]}
        columns = dataclasses.replace(columns, text_a=columns.text_a or "text")
    else:
        table = read_table(path)
    unlabelled = dataclasses.replace(task, label=())  # labels in the input are not needed, nor checked
    return to_split(unlabelled, "predict", table, str(path), columns, need_labels=False)


def _atomic_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def write_predictions(path: str | Path, index: Sequence[str], preds: Predictions) -> Path:
    """``index, prediction`` and one ``prob_<label>`` column per class: a .tsv (header row) or a .jsonl file
    (one object per row), written atomically."""
    path = Path(path)
    values = [f"{v:.6f}" for v in preds.outputs[:, 0]] if preds.regression else preds.predictions
    probs = preds.probabilities
    names = ["index", "prediction"] + [f"prob_{label}" for label in preds.labels]
    rows = []
    for r, (i, value) in enumerate(zip(index, values)):
        rows.append([i, value] + ([] if probs is None else [f"{p:.6f}" for p in probs[r]]))
    if path.suffix.lower() == ".jsonl":
        text = "".join(json.dumps(dict(zip(names, row))) + "\n" for row in rows)
    elif path.suffix.lower() == ".tsv":
        text = "\t".join(names) + "\n" + "".join("\t".join(row) + "\n" for row in rows)
    else:
        raise ValueError(f"--out {path}: unknown format '{path.suffix}' (expected .tsv or .jsonl)")
    return _atomic_text(path, text)


# -------------------------------------------------------------------------------------------- evaluation


def dev_splits(cfg: Config, task: Task, tokenizer: Any, echo: Any = print) -> dict[str, Encoded]:
    """The task's dev splits as a finetune run reads them (``finetune.dev_file`` replaces the first one;
    ``finetune.max_eval_examples`` keeps the first N rows), encoded; no dev split is an error."""
    f = cfg.finetune
    dev: dict[str, Encoded] = {}
    for position, split in enumerate(task.dev_splits):
        file = f.dev_file if position == 0 else None
        if file is None and not has_split(task, split, f.glue_dir):
            echo(f"{task.name}: {missing_reason(task, split, f.glue_dir)}; not evaluated")
            continue
        data = read_split(task, split, f.glue_dir, file=file, columns=columns_of(cfg))
        data = data.take(np.arange(min(len(data), f.max_eval_examples or len(data))))
        dev[split] = encode_split(data, tokenizer, f.max_len)
        echo(f"{task.name} {split}: {len(data)} examples from {data.source}")
    if not dev:
        raise FileNotFoundError(f"task {task.name}: no dev split found in {f.glue_dir} (pass --glue-dir DIR or "
                                "finetune.dev_file=FILE)")
    return dev


def evaluate_model(model: Any, tokenizer: Any, cfg: Config, task: Task,
                   echo: Any = print) -> dict[str, dict[str, float]]:
    """``{dev split: {metric: value}}`` of a finetuned model on ``task`` (by :func:`jaxbert.finetune.evaluate`)."""
    from .finetune import evaluate

    if task.num_labels != model.num_labels:
        raise ValueError(f"the model has {model.num_labels} output(s), task {task.name} needs {task.num_labels}")
    dev = dev_splits(cfg, task, tokenizer, echo)
    return evaluate(model, task, dev, cfg, Policy.from_name(cfg.finetune.precision))


# --------------------------------------------------------------------------------------------------- CLI


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a finetuned model: a finetune run dir, its best/, or an imported classifier")
    parser.add_argument("--precision", default=None, choices=("fp32", "bf16", "fp16"),
                        help="compute precision (default: the model's finetune.precision)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="rows per batch (default: the model's finetune.eval_batch_size)")


def predict_main(argv: Optional[Sequence[str]] = None) -> int:
    from .api import load

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
    from .api import load

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
    cfg = config_lib.load(str(model.directory / "config.yaml"), extra + list(args.overrides))
    task = get_task(args.task) if args.task else model.task
    results = evaluate_model(model.model, model.tokenizer, cfg, task)
    score = task_score(results)
    for split, metrics in results.items():
        print(f"{task.name} {split}: " + "  ".join(f"{m} {100 * v:.2f}" for m, v in metrics.items()))
    print(f"{task.name} score {100 * score:.2f}")
    if args.out:
        _atomic_text(Path(args.out), json.dumps({"task": task.name, "model": str(model.directory), "dev": results,
                                                 "score": score}, indent=1) + "\n")
    return 0
