"""Using a finetuned model: ``jaxbert predict`` (a label and its probabilities, or a score, for every row of a
file) and ``jaxbert evaluate`` (dev metrics, no training).

Both read any finetuned model (a finetune run dir, its ``best/``, or an imported HF classifier) and reuse the
finetuning code's batching and prediction (:func:`jaxbert.finetune.trainer.predict`), so a model predicts exactly what
it predicted at the end of its run. Rows come back in input order.

Examples::

    jaxbert predict runs/finetune/rte-x --input data.tsv --out preds.tsv
    jaxbert predict runs/finetune/custom-x --input reviews.jsonl --text-a review --out preds.tsv --precision bf16
    jaxbert evaluate runs/finetune/rte-x --task rte --glue-dir glue
    jaxbert evaluate runs/finetune/custom-x finetune.dev_file=held_out.csv
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from ..config import Config
from ..data.glue import CUSTOM_TEXT_A, Columns, SplitData, Task, custom_task, get_task, read_table, to_split
from ..data.pairs import encode_split
from ..data.task_data import dev_splits
from ..io import write_atomic
from ..precision import Policy

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
    ``CHUNK_BATCHES`` batches at a time (by :func:`jaxbert.finetune.trainer.predict`)."""
    from ..finetune.trainer import predict

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
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, text)


# -------------------------------------------------------------------------------------------- evaluation


def evaluate_model(model: Any, tokenizer: Any, cfg: Config, task: Task,
                   echo: Any = print) -> dict[str, dict[str, float]]:
    """``{dev split: {metric: value}}`` of a finetuned model on ``task`` (by
    :func:`jaxbert.finetune.trainer.dev_metrics`)."""
    from ..finetune.trainer import dev_metrics

    if task.num_labels != model.num_labels:
        raise ValueError(f"the model has {model.num_labels} output(s), task {task.name} needs {task.num_labels}")
    dev = dev_splits(cfg, task, tokenizer, echo)
    if not dev:
        raise FileNotFoundError(f"task {task.name}: no dev split found in {cfg.finetune.glue_dir} (pass --glue-dir DIR "
                                "or finetune.dev_file=FILE)")
    return dev_metrics(model, task, dev, cfg, Policy.from_name(cfg.finetune.precision))
