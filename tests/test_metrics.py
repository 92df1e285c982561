"""GLUE metrics against scikit-learn / scipy on random predictions, and the GLUE aggregation conventions."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from jaxbert.finetune import metrics


@pytest.mark.parametrize("seed", range(5))
def test_classification_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 300))
    labels = rng.integers(0, 2, n)
    predictions = np.where(rng.random(n) < 0.7, labels, rng.integers(0, 2, n))  # correlated with labels
    assert metrics.accuracy(predictions, labels) == pytest.approx(skm.accuracy_score(labels, predictions))
    assert metrics.f1(predictions, labels) == pytest.approx(skm.f1_score(labels, predictions))
    assert metrics.matthews(predictions, labels) == pytest.approx(skm.matthews_corrcoef(labels, predictions))


@pytest.mark.parametrize("seed", range(3))
def test_multiclass_matthews_and_accuracy_match_sklearn(seed):
    rng = np.random.default_rng(100 + seed)
    labels, predictions = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
    assert metrics.matthews(predictions, labels) == pytest.approx(skm.matthews_corrcoef(labels, predictions))
    assert metrics.accuracy(predictions, labels) == pytest.approx(skm.accuracy_score(labels, predictions))


def test_degenerate_cases_match_sklearn():
    labels = np.array([0, 1, 1, 0, 1])
    never_positive = np.zeros(5, int)
    assert metrics.f1(never_positive, labels) == skm.f1_score(labels, never_positive, zero_division=0) == 0.0
    assert metrics.matthews(never_positive, labels) == skm.matthews_corrcoef(labels, never_positive) == 0.0
    assert metrics.matthews(labels, labels) == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(5))
def test_correlations_match_scipy(seed):
    rng = np.random.default_rng(200 + seed)
    gold = rng.uniform(0, 5, 150)
    predicted = gold + rng.normal(0, 1.5, 150)
    assert metrics.pearson(predicted, gold) == pytest.approx(stats.pearsonr(predicted, gold)[0])
    assert metrics.spearman(predicted, gold) == pytest.approx(stats.spearmanr(predicted, gold)[0])
    tied_pred, tied_gold = np.round(predicted), np.round(gold * 2) / 2  # many ties: average ranks
    assert metrics.spearman(tied_pred, tied_gold) == pytest.approx(stats.spearmanr(tied_pred, tied_gold)[0])


def test_compute_names_and_errors():
    labels = np.array([1, 0, 1, 1])
    out = metrics.compute(("f1", "accuracy"), np.array([1, 0, 0, 1]), labels)
    assert list(out) == ["f1", "accuracy"]
    assert out["accuracy"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="unknown metric"):
        metrics.compute(("bleu",), labels, labels)
    with pytest.raises(ValueError, match="equal length"):
        metrics.accuracy(labels, labels[:2])


def test_task_score_and_glue_average_conventions():
    mrpc = {"dev": {"f1": 0.9, "accuracy": 0.8}}
    mnli = {"dev_matched": {"accuracy": 0.84}, "dev_mismatched": {"accuracy": 0.82}}
    assert metrics.task_score(mrpc) == pytest.approx((0.9 + 0.8) / 2)
    assert metrics.task_score(mnli) == pytest.approx((0.84 + 0.82) / 2)
    scores = {"mrpc": metrics.task_score(mrpc), "mnli": metrics.task_score(mnli), "cola": 0.5}
    assert metrics.glue_average(scores) == pytest.approx((0.85 + 0.83 + 0.5) / 3)
    with pytest.raises(ValueError):
        metrics.task_score({})
