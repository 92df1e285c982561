"""How much a repeated corpus is memorised: held-out minus training MLM loss against passes over the corpus.

Reads pretraining ``metrics.jsonl`` files (the ``*-metrics.jsonl`` kept under ``logs-*``). At every evaluation it
sets the held-out loss beside the mean training loss of the records within ``--window`` steps, and counts the
tokens read so far (each logged interval at the batch size logged at its end) as passes over ``--tokens``. A gap
that grows with the passes, where it was flat over the first pass, is the model fitting the text it has seen
more than text it has not.

usage: python benchmarks/quality/gap.py --tokens 95059766 logs-2026-12-02e/full6-metrics.jsonl [...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def gap_rows(records: list[dict], corpus_tokens: int, seq_len: int = 128, window: int = 250) -> list[dict]:
    """One row per evaluation after step 0: step, tokens, passes, held-out loss, training loss, gap."""
    train = sorted((r for r in records if r.get("split") == "train"), key=lambda r: r["step"])
    read, last, tokens_at = 0, 0, [(0, 0)]
    for r in train:
        read += (r["step"] - last) * int(r["batch_size"]) * seq_len
        last = r["step"]
        tokens_at.append((last, read))
    rows = []
    for e in (r for r in records if r.get("split") == "eval" and r["step"] > 0):
        near = [r["loss"] for r in train if abs(r["step"] - e["step"]) <= window]
        if not near:
            continue
        tokens = max(t for s, t in tokens_at if s <= e["step"])
        train_loss = sum(near) / len(near)
        rows.append({"step": e["step"], "tokens": tokens, "passes": tokens / corpus_tokens, "eval_loss": e["loss"],
                     "train_loss": train_loss, "gap": e["loss"] - train_loss})
    return rows


def table(name: str, rows: list[dict], every: int) -> str:
    lines = [f"{name}", "| step | tokens | passes | held-out loss | training loss | gap |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for i, r in enumerate(rows):
        if r["step"] % every == 0 or i == len(rows) - 1:
            lines.append(f"| {r['step']:,} | {r['tokens'] / 1e6:,.0f}M | {r['passes']:.1f} | {r['eval_loss']:.3f} | "
                         f"{r['train_loss']:.3f} | {r['gap']:+.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", nargs="+", type=Path, help="metrics.jsonl files of pretraining runs")
    parser.add_argument("--tokens", type=int, required=True, help="training tokens of the corpus (one pass)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--window", type=int, default=250, help="steps either side of an evaluation to average")
    parser.add_argument("--every", type=int, default=1000, help="print evaluations at multiples of this step")
    args = parser.parse_args()
    tables = []
    for path in args.metrics:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        tables.append(table(str(path), gap_rows(records, args.tokens, args.seq_len, args.window), args.every))
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
