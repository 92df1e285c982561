"""Input-pipeline benchmark: preparation throughput against the raw batch-encode throughput of the same
tokenizer on the same text and machine, and loader throughput.

    python benchmarks/data_pipeline.py --source /path/to/wikipedia --tokenizer DIR [--max-documents N]

(1) raw encode: the documents are first read into memory, then ``encode_batch_fast`` runs over the same
    batches preparation encodes (``--batch`` documents, cut early at 2M characters); tokens per second.
    preparation: ``write_streams`` on the same source (reading, decompression, parsing, encoding, the split
    and the file writes, as in ``jaxbert prepare``); text tokens per second (separators not counted).
(2) loader: ``get_batch`` for consecutive steps of ``--loader-batch`` x ``--seq-len`` from the prepared
    ``train.bin`` memmap, directly and through the ``Prefetcher``; sequences per second.

Throughput only, not a test: the figures depend on the machine and its load. Raw encode and preparation run
alternately ``--repeats`` times and the best of each is compared; CPU-time rates (all threads of this process)
are reported too, as they are steadier than wall-clock rates on a shared machine. Results go to stdout (a
markdown table) and, with ``--json``, to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

from jaxbert import config
from jaxbert.data import prepare as prep
from jaxbert.data.corpus import iter_documents
from jaxbert.data.loader import Prefetcher, TokenStream, get_batch
from jaxbert.tokenizer import load_tokenizer, train_tokenizer


def _tokenizer(args, cfg):
    if args.tokenizer:
        return load_tokenizer(args.tokenizer)
    sample = iter_documents(config.replace(cfg, data={"max_documents": 5000}).data)
    return train_tokenizer(sample, cfg.tokenizer, progress=False)


def raw_encode(tokenizer, documents: list[str], batch: int) -> dict:
    batches = list(prep.batch_documents(documents, batch))  # the batches preparation encodes
    tokenizer.encode_batch_raw(batches[0])  # warm-up
    tokens, started, cpu = 0, time.perf_counter(), time.process_time()
    for texts in batches:
        tokens += sum(len(e.ids) for e in tokenizer.encode_batch_raw(texts))
    return _rates(tokens, time.perf_counter() - started, time.process_time() - cpu)


def _rates(tokens: int, seconds: float, cpu_seconds: float) -> dict:
    """Wall-clock and CPU-time rates: on a machine shared with other jobs the CPU rate (tokens per second of
    this process's CPU time, all threads) is the steadier measure of the work done per token."""
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "cpu_seconds": cpu_seconds,
            "tokens_per_cpu_s": tokens / cpu_seconds}


def preparation(cfg, tokenizer, out: Path) -> dict:
    started, cpu = time.perf_counter(), time.process_time()
    stats = prep.write_streams(cfg, tokenizer, out, progress=False)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
    documents = sum(s["documents"] for s in stats.values())
    tokens = sum(s["tokens"] for s in stats.values()) - documents  # without the [SEP] separators
    return {"documents": documents, **_rates(tokens, seconds, cpu_seconds)}


def loader(stream: TokenStream, batch: int, seq_len: int, steps: int, depth: int) -> dict:
    get_batch(stream, 0, 0, batch, seq_len)  # first permutation and page-in
    started = time.perf_counter()
    for step in range(steps):
        get_batch(stream, 0, step, batch, seq_len)
    direct = steps * batch / (time.perf_counter() - started)
    started = time.perf_counter()
    with Prefetcher((get_batch(stream, 1, s, batch, seq_len) for s in range(steps)), depth=depth) as items:
        for _ in items:
            pass
    prefetched = steps * batch / (time.perf_counter() - started)
    return {"sequences_per_s": direct, "prefetched_sequences_per_s": prefetched, "batch": batch,
            "seq_len": seq_len, "steps": steps, "chunks": stream.n_chunks(seq_len)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="demo", help="data.source (a path, or demo)")
    parser.add_argument("--tokenizer", help="tokenizer dir/json/vocab.txt (default: train one on 5000 documents)")
    parser.add_argument("--max-documents", type=int, default=None)
    parser.add_argument("--batch", type=int, default=1000, help="documents per encode batch (impl.encode_batch)")
    parser.add_argument("--loader-batch", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--loader-steps", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=2, help="alternating raw/preparation runs (best kept)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    overrides = [f"data.source={args.source}", f"impl.encode_batch={args.batch}", "tokenizer.vocab_size=32768"]
    if args.max_documents:
        overrides.append(f"data.max_documents={args.max_documents}")
    cfg = config.load("base", overrides)
    tokenizer = _tokenizer(args, cfg)

    started = time.perf_counter()
    documents = list(iter_documents(cfg.data))
    read_seconds = time.perf_counter() - started
    runs: dict[str, list[dict]] = {"raw_encode": [], "preparation": []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):  # alternated, best of each kept: the machine may be shared
            runs["raw_encode"].append(raw_encode(tokenizer, documents, args.batch))
            (Path(tmp) / str(repeat)).mkdir()
            runs["preparation"].append(preparation(cfg, tokenizer, Path(tmp) / str(repeat)))
        stream = TokenStream(Path(tmp) / "0" / "train.bin", prep.token_dtype(tokenizer.vocab_size))
        load = loader(stream, args.loader_batch, args.seq_len, args.loader_steps, cfg.impl.prefetch)
    raw = max(runs["raw_encode"], key=lambda r: r["tokens_per_s"])
    prepared = max(runs["preparation"], key=lambda r: r["tokens_per_s"])
    best_cpu = {k: max(r["tokens_per_cpu_s"] for r in v) for k, v in runs.items()}
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {_cpus()} cores, "
        f"{platform.python_implementation()} {platform.python_version()}", "command": " ".join(sys.argv),
        "source": args.source, "documents": prepared["documents"], "characters": sum(map(len, documents)),
        "vocab_size": tokenizer.vocab_size, "read_seconds": read_seconds, "raw_encode": raw,
        "preparation": prepared, "ratio": prepared["tokens_per_s"] / raw["tokens_per_s"],
        "cpu_ratio": best_cpu["preparation"] / best_cpu["raw_encode"], "runs": runs, "loader": load,
        "load_average": os.getloadavg(),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    _report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _report(r: dict) -> None:
    raw, prepared, load = r["raw_encode"], r["preparation"], r["loader"]
    print(f"| measure | value |\n|---|---|\n"
          f"| documents / characters | {r['documents']:,} / {r['characters']:,} |\n"
          f"| reading into memory (1 thread) | {r['read_seconds']:.1f} s |\n"
          f"| raw encode_batch_fast | {raw['tokens']:,} tokens in {raw['seconds']:.1f} s = "
          f"{raw['tokens_per_s']:,.0f} tokens/s; {raw['tokens_per_cpu_s']:,.0f} tokens/CPU-s |\n"
          f"| preparation (read+encode+write) | {prepared['tokens']:,} tokens in {prepared['seconds']:.1f} s = "
          f"{prepared['tokens_per_s']:,.0f} tokens/s; {prepared['tokens_per_cpu_s']:,.0f} tokens/CPU-s |\n"
          f"| preparation / raw encode (best of {len(r['runs']['raw_encode'])} each) | {100 * r['ratio']:.1f} % "
          f"wall-clock, {100 * r['cpu_ratio']:.1f} % CPU time |\n"
          f"| load average during the run (1/5/15 min) | {' / '.join(f'{x:.1f}' for x in r['load_average'])} |\n"
          f"| loader {load['batch']}x{load['seq_len']} (direct) | {load['sequences_per_s']:,.0f} sequences/s |\n"
          f"| loader (prefetch thread) | {load['prefetched_sequences_per_s']:,.0f} sequences/s |\n"
          f"| peak RSS (benchmark process, documents held in memory) | {r['peak_rss_mib']:,.0f} MiB |")


if __name__ == "__main__":
    sys.exit(main())
