"""MNLI-m against pretraining minutes, one line per recipe, from the rows of ``results.jsonl`` that name a curve.

A row joins a curve through its ``curve`` key (the recipe's label); every seed's score is a point, the line runs
through the median at each budget. Reference lines: the issue's target and the public anchors measured or quoted in
``benchmarks/quality.md``.

usage: python benchmarks/quality/curve.py [--results benchmarks/quality/results.jsonl] [--out benchmarks/quality/curve.png]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from jaxbert.io import atomic_file

HERE = Path(__file__).resolve().parent
ANCHORS = (  # (MNLI-m, label); the figures are those of the issue and quality.md
    (75.0, "target (issue 16)"),
    (68.1, "Cramming, 20 min here"),
)


def seed_scores(row: dict) -> list[float]:
    """Each finetuning seed's MNLI-m of one row (the median alone where the row kept no per-seed scores)."""
    return list(row.get("per_seed", {}).get("m") or [row["mnli_m"]])


def curves(rows: list[dict]) -> dict[str, dict[float, list[float]]]:
    """{curve label: {pretraining minutes: every seed's MNLI-m}} for the rows with a ``curve`` key."""
    out: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row.get("curve") and row.get("mnli_m") is not None:
            out[row["curve"]][float(row["pretrain_minutes"])].extend(seed_scores(row))
    return out


def draw(data: dict[str, dict[float, list[float]]], target: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), tight_layout=True)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for label, by_minutes in sorted(data.items()):
        minutes = sorted(by_minutes)
        line, = axes.plot(minutes, [statistics.median(by_minutes[m]) for m in minutes], marker="o", label=label)
        for m in minutes:
            axes.scatter([m] * len(by_minutes[m]), by_minutes[m], s=10, color=line.get_color(), alpha=0.5)
    for value, label in ANCHORS:
        axes.axhline(value, linestyle="--", linewidth=0.8, color="grey")
        axes.annotate(label, (0.5, value), xycoords=("axes fraction", "data"), ha="center", va="bottom", fontsize=8)
    axes.set(xlabel="pretraining minutes on one H200", ylabel="MNLI-m (dev-matched, %)", xticks=[3, 6, 12, 20],
             xlim=(0, 21), title="MNLI-m against pretraining budget (line: median over seeds and sessions)")
    axes.legend(fontsize=8, loc="center right")
    with atomic_file(target) as tmp:
        figure.savefig(tmp, format="png", dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=HERE / "results.jsonl")
    parser.add_argument("--out", type=Path, default=HERE / "curve.png")
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
    data = curves(rows)
    if not data:
        raise SystemExit(f"{args.results}: no row has a 'curve' key; nothing to draw")
    draw(data, args.out)
    for label, by_minutes in sorted(data.items()):
        print(label, {m: round(statistics.median(v), 2) for m, v in sorted(by_minutes.items())})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
