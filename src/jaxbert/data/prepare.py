"""Documents -> token ids -> flat memmap token streams on disk (``jaxbert prepare``).

Layout of a prepared dataset, ``<data.cache_dir>/<hash>/``::

    train.bin        token ids of the training documents, [SEP] after each document (uint16, or uint32
    validation.bin   when the vocabulary exceeds 65536); validation: a held-out fraction of documents
    meta.json        dtype, token/document counts, vocabulary hash and size, special ids, source, config
    tokenizer.json   the tokenizer that produced the ids (and vocab.txt): the directory is self-contained
    vocab.txt

``<hash>`` covers the resolved data and tokenizer settings that change the token stream plus the vocabulary
hash, so a rerun with the same settings reuses the directory. It is written under a temporary name and
renamed when complete: an interrupted run leaves nothing that looks complete (and its leftovers are removed by
the next run). Memory stays bounded: documents are read in a background thread (overlapping decompression and
parsing with encoding), encoded in batches of ``impl.encode_batch`` by the multi-threaded Rust tokenizer and
appended to the files; the corpus is never held whole.

Validation documents are chosen by a hash of the document's index in the stream (splitmix64): a fixed,
deterministic fraction ``data.val_fraction``, independent of batch sizes and worker counts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np

from .. import config as config_lib
from ..config import Config
from .. import io
from ..io import write_failed
from ..tokenizer import Tokenizer, load_tokenizer, text_pieces, train_tokenizer
from .corpus import iter_documents
from .loader import Prefetcher, TokenStream

FORMAT_VERSION = 1
SPLITS = ("train", "validation")
# DataConfig fields that change the token stream (seq_len, masking and cache_dir do not)
_STREAM_FIELDS = ("source", "format", "text_format", "text_column", "hf_config", "hf_split", "min_doc_chars",
                  "max_documents", "val_fraction")


class DatasetMismatchError(ValueError):
    """A prepared dataset and a tokenizer disagree on the vocabulary."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _resolved_source(source: str) -> str:
    if source == "demo" or source.startswith("hf:"):
        return source
    return str(Path(source).expanduser().resolve())


def stream_settings(cfg: Config) -> dict[str, Any]:
    """The settings that determine the token stream (besides the vocabulary itself)."""
    data = {name: getattr(cfg.data, name) for name in _STREAM_FIELDS}
    data["source"] = _resolved_source(cfg.data.source)
    tokenizer = dataclasses.asdict(cfg.tokenizer)
    if tokenizer["path"] is not None:
        tokenizer["path"] = str(Path(tokenizer["path"]).expanduser().resolve())
    return {"version": FORMAT_VERSION, "data": data, "tokenizer": tokenizer}


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def is_validation(indices: np.ndarray, fraction: float) -> np.ndarray:
    """Deterministic per-document split: splitmix64(index) / 2**64 < fraction."""
    with np.errstate(over="ignore"):
        z = np.asarray(indices, np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(2**53) < fraction


# ------------------------------------------------------------------------------------------- tokenizer


def resolve_tokenizer(cfg: Config, progress: bool = True) -> Tokenizer:
    """The configured tokenizer (tokenizer.path), or one trained on the corpus and cached under
    ``<cache_dir>/tokenizers/<hash>/`` (reused by later runs with the same settings)."""
    if cfg.tokenizer.path is not None:
        return load_tokenizer(cfg.tokenizer.path, lowercase=cfg.tokenizer.lowercase)
    settings = stream_settings(cfg)
    settings["data"].pop("val_fraction")
    folder = Path(cfg.data.cache_dir) / "tokenizers" / settings_hash(settings)
    if (folder / "tokenizer.json").is_file():
        print(f"reusing the tokenizer trained for these settings: {folder}")
        return load_tokenizer(folder)
    iter_documents(cfg.data)  # a missing source fails here
    print(f"training a WordPiece tokenizer (vocab {cfg.tokenizer.vocab_size}) on {cfg.data.source}")
    tokenizer = train_tokenizer(lambda: iter_documents(cfg.data, workers=cfg.impl.workers or None), cfg.tokenizer,
                                progress=progress)
    folder.parent.mkdir(parents=True, exist_ok=True)
    io.remove_stale(folder.parent)
    io.atomic_dir(folder, tokenizer.save, manifest=False, exists="keep")
    print(f"saved the tokenizer ({tokenizer.vocab_size} tokens) to {folder}")
    return load_tokenizer(folder)


# ------------------------------------------------------------------------------------------ preparation


def dataset_dir(cfg: Config, tokenizer: Tokenizer) -> Path:
    settings = stream_settings(cfg)
    settings["vocab_hash"] = tokenizer.vocab_hash()
    return Path(cfg.data.cache_dir) / settings_hash(settings)


def prepare(cfg: Config, tokenizer: Optional[Tokenizer] = None, progress: bool = True) -> Path:
    """Tokenize the configured corpus into ``<cache_dir>/<hash>/`` (or reuse it) and return that directory."""
    tokenizer = tokenizer or resolve_tokenizer(cfg, progress)
    final = dataset_dir(cfg, tokenizer)
    if (final / "meta.json").is_file():
        print(f"reusing prepared data: {final}")
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    io.remove_stale(final.parent)
    started, stats, meta = time.time(), {}, {}

    def write(tmp: Path) -> None:
        stats.update(write_streams(cfg, tokenizer, tmp, progress))
        problem = split_problem(cfg, stats)
        if problem is not None:  # still prepared (other seq_len settings may suffice), but pretraining will refuse
            print(f"warning: {problem}", file=sys.stderr)
        tokenizer.save(tmp)
        meta.update(_meta(cfg, tokenizer, stats, time.time() - started))
        io.write_atomic(tmp / "meta.json", json.dumps(meta, indent=2))  # last: marks the directory complete

    io.atomic_dir(final, write, manifest=False, exists="keep")  # a concurrent run finishing first wins
    counts = ", ".join(f"{s} {stats[s]['tokens']:,} tokens / {stats[s]['documents']:,} docs" for s in SPLITS)
    print(f"prepared {final}: {counts} ({meta['seconds']:.1f} s)")
    return final


def split_problem(cfg: Config, stats: dict[str, dict[str, Any]]) -> Optional[str]:
    """Why the splits cannot be pretrained on (None when they can): each must hold at least one sequence of
    ``data.seq_len`` tokens, as pretraining trains on one and evaluates on the other."""
    total = sum(s["documents"] for s in stats.values())
    for split in SPLITS:
        tokens, docs = stats[split]["tokens"], stats[split]["documents"]
        if tokens < cfg.data.seq_len:
            hint = ("raise data.val_fraction or add documents" if split == "validation" else
                    "add documents or lower data.val_fraction")
            if total < 10 and cfg.data.text_format != "line":
                hint += " (one document per line? set data.text_format=line)"
            return (f"corpus {cfg.data.source}: the {split} split has {docs} of {total} document(s), {tokens} "
                    f"tokens (data.val_fraction={cfg.data.val_fraction:g}); expected at least one sequence of "
                    f"data.seq_len={cfg.data.seq_len} tokens: {hint}")
    return None


def batch_documents(documents: Iterable[str], size: int, max_chars: int = 2_000_000) -> Iterator[list[str]]:
    """Batches of ``size`` documents, cut early at ``max_chars`` characters so memory stays bounded whatever
    the document lengths (a batch's encodings take ~100 bytes per token)."""
    batch: list[str] = []
    chars = 0
    for doc in documents:
        batch.append(doc)
        chars += len(doc)
        if len(batch) >= size or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _threads(workers: int) -> contextlib.AbstractContextManager:
    """Limit the tokenizer's threads: 1 disables its parallelism; n > 1 sizes its pool when not yet started."""
    if workers == 1:
        return config_lib.environment({"TOKENIZERS_PARALLELISM": "false"})
    return config_lib.environment(defaults={"RAYON_NUM_THREADS": str(workers)} if workers > 1 else {})


class _Writer:
    """Appends token ids to one split's file; a document ends with the separator."""

    def __init__(self, path: Path, dtype: np.dtype, sep: int):
        self.path = path
        try:
            self.handle = io.open_write(path)
        except OSError as err:
            raise write_failed(path, err) from None
        self.dtype, self.sep = dtype, sep
        self.tokens = self.documents = 0

    def write(self, parts: list[np.ndarray], ends: int) -> None:
        """Write ``parts`` (id arrays, separators already in place) holding the ends of ``ends`` documents."""
        if not parts:
            return
        flat = np.concatenate(parts).astype(self.dtype, copy=False)
        try:
            self.handle.write(flat.tobytes())
        except OSError as err:
            raise write_failed(self.path, err, "the prepared dataset was not created") from None
        self.tokens += len(flat)
        self.documents += ends

    def close(self) -> dict[str, Any]:
        try:
            self.handle.close()
        except OSError as err:
            raise write_failed(self.path, err, "the prepared dataset was not created") from None
        return {"file": self.path.name, "tokens": self.tokens, "documents": self.documents}


def _piece_stream(documents: Iterable[str]) -> Iterator[tuple[str, bool]]:
    """(piece, ends its document) for every piece of every document (:func:`text_pieces`)."""
    for doc in documents:
        pieces = text_pieces(doc)
        previous = next(pieces)
        for piece in pieces:
            yield previous, False
            previous = piece
        yield previous, True


def batch_pieces(pieces: Iterable[tuple[str, bool]], size: int,
                 max_chars: int = 2_000_000) -> Iterator[list[tuple[str, bool]]]:
    """Batches of up to ``size`` document pieces, cut early at ``max_chars`` characters so memory stays bounded
    whatever the document lengths (a batch's encodings take ~100 bytes per token)."""
    batch: list[tuple[str, bool]] = []
    chars = 0
    for item in pieces:
        batch.append(item)
        chars += len(item[0])
        if len(batch) >= size or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _batch_ids(tokenizer: Tokenizer, batch: list[tuple[str, bool]], dtype: np.dtype) -> list[np.ndarray]:
    """Token ids of each piece, the separator appended to the last piece of a document."""
    sep = tokenizer.special.sep
    encodings = tokenizer.encode_batch_raw([text for text, _ in batch])
    return [np.asarray(e.ids + [sep] if end else e.ids, dtype) for e, (_, end) in zip(encodings, batch)]


def _encoded(batches: Iterable[list[tuple[str, bool]]], tokenizer: Tokenizer,
             dtype: np.dtype) -> Iterator[tuple[list[bool], list[np.ndarray]]]:
    """(ends, ids) of each batch of pieces, in order. The next batch is encoded in a helper thread (the Rust
    encoder runs without the GIL) while the caller writes the previous one, so the encoder never waits."""
    with ThreadPoolExecutor(1, thread_name_prefix="jaxbert-encode") as pool:
        pending: Optional[tuple[list[bool], Future]] = None
        for batch in batches:
            job = ([end for _, end in batch], pool.submit(_batch_ids, tokenizer, batch, dtype))
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = job
        if pending is not None:
            yield pending[0], pending[1].result()


def write_streams(cfg: Config, tokenizer: Tokenizer, out: Path, progress: bool = True,
                  documents: Optional[Iterator[str]] = None) -> dict[str, dict[str, Any]]:
    """Encode the corpus (or ``documents``) into ``out/train.bin`` and ``out/validation.bin``; return counts.

    Long documents are encoded in pieces (:func:`text_pieces`, the same ids as whole), so memory stays flat
    whatever the length of a document."""
    from tqdm.auto import tqdm

    dtype = token_dtype(tokenizer.vocab_size)
    writers = {s: _Writer(out / f"{s}.bin", dtype, tokenizer.special.sep) for s in SPLITS}
    docs = documents if documents is not None else iter_documents(cfg.data, workers=cfg.impl.workers or None)
    reader = Prefetcher(batch_pieces(_piece_stream(docs), cfg.impl.encode_batch), depth=4)
    bar = tqdm(total=cfg.data.max_documents, unit="docs", desc="prepare", disable=not progress, smoothing=0.1)
    index = 0  # index of the document the next piece belongs to
    stats: dict[str, dict[str, Any]] = {}
    try:
        with _threads(cfg.impl.workers):
            for ends, ids in _encoded(reader, tokenizer, dtype):
                owners = index + np.cumsum([0, *ends[:-1]])
                val = is_validation(owners, cfg.data.val_fraction)
                for split, chosen in (("train", ~val), ("validation", val)):
                    picked = np.flatnonzero(chosen)
                    writers[split].write([ids[k] for k in picked], sum(ends[k] for k in picked))
                index += sum(ends)
                bar.update(sum(ends))
                bar.set_postfix(tokens=f"{writers['train'].tokens + writers['validation'].tokens:,}", refresh=False)
    finally:
        reader.close()
        bar.close()
        failures = []
        for split, writer in writers.items():  # close every file, even when one fails (a full disk)
            try:
                stats[split] = writer.close()
            except OSError as err:
                failures.append(err)
    if failures:
        raise failures[0]
    return stats


def _meta(cfg: Config, tokenizer: Tokenizer, stats: dict[str, Any], seconds: float) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "splits": stats,
        "tokens": sum(s["tokens"] for s in stats.values()),
        "documents": sum(s["documents"] for s in stats.values()),
        "separator": tokenizer.special.sep,
        "vocab_size": tokenizer.vocab_size,
        "vocab_hash": tokenizer.vocab_hash(),
        "special_ids": dataclasses.asdict(tokenizer.special),
        "source": cfg.data.source,
        "settings": stream_settings(cfg),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(seconds, 3),
    }


# ---------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class PreparedData:
    path: Path
    meta: dict[str, Any]
    train: TokenStream
    validation: TokenStream
    tokenizer: Tokenizer


def check_compatible(meta: dict[str, Any], tokenizer: Tokenizer, where: str = "prepared data") -> None:
    """Raise DatasetMismatchError when the token ids on disk were not produced by this tokenizer's vocabulary."""
    if meta.get("vocab_hash") != tokenizer.vocab_hash() or meta.get("vocab_size") != tokenizer.vocab_size:
        raise DatasetMismatchError(
            f"{where}: made with a different vocabulary (hash {meta.get('vocab_hash')}, size {meta.get('vocab_size')}) "
            f"than the tokenizer {tokenizer.source} (hash {tokenizer.vocab_hash()}, size {tokenizer.vocab_size}); "
            f"re-run `jaxbert prepare` with this tokenizer")


def open_dataset(path: str | Path, tokenizer: Optional[Tokenizer] = None,
                 echo: Optional[Callable[[str], None]] = print) -> PreparedData:
    """Open a prepared directory: meta, read-only memmaps of both splits and its tokenizer (or ``tokenizer``,
    checked for compatibility). Logs one decoded sample."""
    path = Path(path)
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path}: not a prepared dataset (no meta.json); run `jaxbert prepare`")
    meta = json.loads(meta_file.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_file}: format version {meta.get('format_version')}, expected {FORMAT_VERSION}; "
                         f"re-run `jaxbert prepare`")
    tokenizer = tokenizer or load_tokenizer(path)
    check_compatible(meta, tokenizer, where=str(path))
    streams = {s: TokenStream(path / meta["splits"][s]["file"], meta["dtype"]) for s in SPLITS}
    for split, stream in streams.items():
        if len(stream) != meta["splits"][split]["tokens"]:
            raise ValueError(f"{stream.path}: {len(stream)} tokens, meta.json says {meta['splits'][split]['tokens']}")
    data = PreparedData(path, meta, streams["train"], streams["validation"], tokenizer)
    if echo is not None:
        sample = np.asarray(data.train.tokens[:64])
        echo(f"data {path}: train {len(data.train):,} tokens, validation {len(data.validation):,} tokens; "
            f"sample: {tokenizer.decode(sample, skip_special_tokens=False)!r}")
    return data
