"""GLUE metrics (numpy, on host) and the GLUE average.

Conventions (those of the GLUE paper and leaderboard):

* a task's score is the unweighted mean of its metrics: MRPC and QQP mean(F1, accuracy), STS-B
  mean(Pearson, Spearman); CoLA is Matthews correlation; the others accuracy;
* MNLI's score is the mean of its matched and mismatched accuracies (each a dev split);
* the GLUE average is the unweighted mean of the task scores, over the tasks that were run (AX, a diagnostic
  set without dev labels, is never part of it). Scores are fractions in [0, 1] here; tables print x100.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np


def _pair(predictions: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, y = np.asarray(predictions), np.asarray(labels)
    if p.shape != y.shape or p.ndim != 1:
        raise ValueError(f"metrics: predictions {p.shape} and labels {y.shape} must be 1-D of equal length")
    if len(p) == 0:
        raise ValueError("metrics: no examples")
    return p, y


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    p, y = _pair(predictions, labels)
    return float(np.mean(p == y))


def f1(predictions: np.ndarray, labels: np.ndarray, positive: int = 1) -> float:
    """Binary F1 of class ``positive``; 0 when there are no true positives (as scikit-learn's zero_division=0)."""
    p, y = _pair(predictions, labels)
    tp = np.sum((p == positive) & (y == positive))
    fp = np.sum((p == positive) & (y != positive))
    fn = np.sum((p != positive) & (y == positive))
    return float(2 * tp / (2 * tp + fp + fn)) if tp > 0 else 0.0


def matthews(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation coefficient (multi-class form); 0 when undefined."""
    p, y = _pair(predictions, labels)
    classes, encoded = np.unique(np.concatenate([y, p]), return_inverse=True)
    k = len(classes)
    confusion = np.zeros((k, k), np.float64)
    np.add.at(confusion, (encoded[: len(y)], encoded[len(y):]), 1.0)
    t, q = confusion.sum(1), confusion.sum(0)  # true / predicted counts per class
    c, s = np.trace(confusion), confusion.sum()
    denominator = np.sqrt((s * s - q @ q) * (s * s - t @ t))
    return float((c * s - t @ q) / denominator) if denominator > 0 else 0.0


def pearson(predictions: np.ndarray, labels: np.ndarray) -> float:
    p, y = _pair(predictions, labels)
    p, y = p.astype(np.float64) - p.mean(), y.astype(np.float64) - y.mean()
    denominator = np.sqrt((p @ p) * (y @ y))
    return float(p @ y / denominator) if denominator > 0 else 0.0


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.zeros(len(counts))
    np.add.at(sums, inverse, ranks)
    return (sums / counts)[inverse]


def spearman(predictions: np.ndarray, labels: np.ndarray) -> float:
    p, y = _pair(predictions, labels)
    return pearson(_ranks(p), _ranks(y))


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy, "f1": f1, "mcc": matthews, "pearson": pearson, "spearman": spearman,
}
DISPLAY = {"accuracy": "acc", "f1": "F1", "mcc": "MCC", "pearson": "Pearson", "spearman": "Spearman"}


def compute(names: Sequence[str], predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The named metrics of predictions (class ids or scores) against labels."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}: expected {', '.join(METRICS)}")
    return {name: METRICS[name](predictions, labels) for name in names}


def task_score(per_split: Mapping[str, Mapping[str, float]]) -> float:
    """A task's score from ``{dev split: {metric: value}}``: the mean over splits of the mean over metrics."""
    if not per_split:
        raise ValueError("task_score: no dev split was evaluated")
    return float(np.mean([np.mean(list(m.values())) for m in per_split.values()]))


def glue_average(scores: Mapping[str, float]) -> float:
    """The GLUE average: the unweighted mean of task scores."""
    if not scores:
        raise ValueError("glue_average: no task scores")
    return float(np.mean(list(scores.values())))
