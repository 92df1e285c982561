"""Read documents (one string each) from the configured source: ``iter_documents(cfg.data)``.

Sources (``data.source``) and formats (``data.format``, ``auto`` detects from the path):

- ``demo``: the embedded Wikipedia lead paragraphs (:mod:`jaxbert.data.demo`).
- ``wikiextractor``: a directory (or one file) of WikiExtractor output, ``AA/wiki_00`` or ``AA/wiki_00.bz2``,
  documents in ``<doc id=.. title=..>`` blocks; the title line WikiExtractor repeats at the top is dropped.
- ``wikidump``: a raw MediaWiki ``pages-articles*.xml`` or ``.xml.bz2`` dump, streamed with ``iterparse``;
  redirects and non-article namespaces are skipped and the wikitext is turned into plain text
  (:mod:`jaxbert.data.wikidump`, in worker processes).
- ``text``: ``.txt`` files (optionally ``.txt.bz2``); ``data.text_format`` says how documents are separated:
  ``blank-line`` (one or more blank lines, BERT's original corpus layout; lines within a document are kept),
  ``line`` (one document per line), or ``auto`` (detected from the first file and logged).
- ``jsonl`` / ``json`` / ``csv`` / ``parquet``: local files read by ``datasets`` in streaming mode; the text is
  in ``data.text_column``.
- ``hf:<name>``: a dataset on the HuggingFace hub (``data.hf_config``, ``data.hf_split``), streamed.

A directory source is read recursively in sorted path order, so the document order is deterministic.
Documents shorter than ``data.min_doc_chars`` are dropped; at most ``data.max_documents`` are yielded.
Bad input raises :class:`CorpusError` (a ValueError) or FileNotFoundError, in one line naming the file.
"""

from __future__ import annotations

import bz2
import html
import io
import os
import re
import socket
from pathlib import Path
from typing import IO, Iterable, Iterator, Optional

from ..config import DataConfig
from . import CorpusError

TABLE_FORMATS = ("jsonl", "json", "csv", "parquet")
_WIKIEXTRACTOR_NAME = re.compile(r"^wiki_\d+(\.bz2)?$")
_DOC_START = re.compile(r'^<doc\s[^>]*?title="([^"]*)"[^>]*>\s*$')


# ------------------------------------------------------------------------------------------- file helpers


def open_text(path: Path) -> IO[str]:
    """A text stream of a plain or bz2-compressed file (decompressed lazily, never loaded whole)."""
    raw = bz2.open(path, "rb") if path.suffix == ".bz2" else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8", errors="strict")


def _open_binary(path: Path) -> IO[bytes]:
    return bz2.open(path, "rb") if path.suffix == ".bz2" else open(path, "rb")


_LINE = re.compile(r"[^\n]*\n|[^\n]+")


def _read_lines(path: Path) -> Iterator[str]:
    """Lines of ``path`` (universal newlines, ends kept); decoding and decompression failures become one
    CorpusError naming the file and, for bad UTF-8, the exact byte offset and line."""
    offset = 0
    try:
        with _open_binary(path) as handle:
            for number, raw in enumerate(handle, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    where = "of the decompressed text " if path.suffix == ".bz2" else ""
                    raise CorpusError(f"{path}: not UTF-8 text at byte {offset + err.start} {where}(line {number}); "
                                      "expected a UTF-8 text corpus file") from None
                offset += len(raw)
                if "\r" in line:
                    yield from _LINE.findall(line.replace("\r\n", "\n").replace("\r", "\n"))
                else:
                    yield line
    except (OSError, EOFError) as err:
        kind = "corrupt or truncated bz2 file" if path.suffix == ".bz2" else "cannot be read"
        raise CorpusError(f"{path}: {kind} ({err})") from None


def _files(root: Path, keep) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".") and keep(p))


def _sniff(path: Path) -> str:
    try:
        with open_text(path) as handle:
            head = handle.read(2048).lstrip()
    except (OSError, EOFError, UnicodeDecodeError):
        return ""
    if head.startswith("<doc "):
        return "wikiextractor"
    if head.startswith("<mediawiki") or head.startswith("<?xml"):
        return "wikidump"
    return ""


def _format_of_file(path: Path) -> str:
    name = path.name.lower()
    stem = name[:-4] if name.endswith(".bz2") else name
    if _WIKIEXTRACTOR_NAME.match(name):
        return "wikiextractor"
    if stem.endswith(".xml"):
        return "wikidump"
    if stem.endswith(".txt"):
        return "text"
    for fmt in TABLE_FORMATS:
        if name.endswith("." + fmt):
            return fmt
    return _sniff(path)


def detect_format(path: Path) -> str:
    """The format of a file, or of the files in a directory (the first recognised one, in sorted order)."""
    for candidate in _files(path, lambda p: True)[:2000]:
        fmt = _format_of_file(candidate)
        if fmt:
            return fmt
    raise CorpusError(f"{path}: cannot tell the corpus format; set data.format to one of wikiextractor, "
                      f"wikidump, text, {', '.join(TABLE_FORMATS)}")


# ----------------------------------------------------------------------------------------------- readers


def read_wikiextractor_file(path: Path) -> Iterator[str]:
    """Documents of one WikiExtractor file (text between ``<doc ...>`` and ``</doc>``, title line removed)."""
    title: Optional[str] = None
    body: list[str] = []
    seen = 0
    for number, line in enumerate(_read_lines(path), start=1):
        if title is None:
            match = _DOC_START.match(line)
            if match:
                title, body = match.group(1), []
            elif line.strip():
                raise CorpusError(f"{path}:{number}: text outside <doc> ... </doc>; not WikiExtractor output")
        elif line.startswith("</doc>"):
            seen += 1
            yield _wikiextractor_text(title, body)
            title = None
        else:
            body.append(line.strip())
    if title is not None:
        raise CorpusError(f"{path}: document '{title}' has no closing </doc> (truncated file?)")
    if seen == 0:
        raise CorpusError(f"{path}: no <doc> blocks; not WikiExtractor output")


def _wikiextractor_text(title: str, lines: list[str]) -> str:
    lines = [line for line in lines if line]
    if lines and lines[0] in (title.strip(), html.unescape(title).strip()):
        lines = lines[1:]
    return "\n".join(lines)


def read_text_file(path: Path, text_format: str = "blank-line") -> Iterator[str]:
    """Documents of a text file: blocks separated by blank lines ("blank-line"), or one per line ("line")."""
    if text_format == "line":
        for line in _read_lines(path):
            if line.strip():
                yield line.rstrip("\r\n")
        return
    block: list[str] = []
    for line in _read_lines(path):
        if line.strip():
            block.append(line.rstrip("\r\n"))
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


def detect_text_format(path: Path, max_lines: int = 1000) -> tuple[str, str]:
    """("line" or "blank-line", the reason): "line" when the first ``max_lines`` lines of ``path`` hold at least two
    text lines and no blank line between text lines (a corpus with one document per line)."""
    text_lines, blank_between, pending_blank = 0, False, False
    for number, line in enumerate(_read_lines(path)):
        if number >= max_lines:
            break
        if not line.strip():
            pending_blank = text_lines > 0
            continue
        blank_between = blank_between or pending_blank
        text_lines += 1
    if text_lines >= 2 and not blank_between:
        return "line", f"no blank line between its first {text_lines} text lines"
    if blank_between:
        return "blank-line", "blank lines separate its text"
    return "blank-line", f"{text_lines} text line(s)"


def _wikiextractor(root: Path) -> Iterator[str]:
    files = _files(root, lambda p: bool(_WIKIEXTRACTOR_NAME.match(p.name)) or root.is_file())
    if not files:
        raise CorpusError(f"{root}: no WikiExtractor files (AA/wiki_00, AA/wiki_00.bz2, ...)")
    for path in files:
        yield from read_wikiextractor_file(path)


def _text(root: Path, text_format: str) -> Iterator[str]:
    files = _files(root, lambda p: p.name.lower().endswith((".txt", ".txt.bz2")))
    if not files:
        raise CorpusError(f"{root}: no .txt files")
    if text_format == "auto":
        text_format, reason = detect_text_format(files[0])
        print(f"data.text_format=auto: reading {root} as text_format={text_format} ({files[0].name}: {reason}; "
              "set data.text_format=line or blank-line to choose)")
    for path in files:
        yield from read_text_file(path, text_format)


def _wikidump(root: Path, workers: Optional[int]) -> Iterator[str]:
    from .wikidump import read_dump

    files = _files(root, lambda p: ".xml" in p.name.lower())
    if not files:
        raise CorpusError(f"{root}: no .xml / .xml.bz2 dump files")
    for path in files:
        yield from read_dump(path, workers=workers)


def _table_files(root: Path, fmt: str) -> list[str]:
    suffixes = (".jsonl", ".json") if fmt in ("json", "jsonl") else ("." + fmt,)
    files = _files(root, lambda p: p.name.lower().endswith(suffixes))
    if not files:
        raise CorpusError(f"{root}: no {fmt} files")
    return [str(p) for p in files]


def _rows_text(rows: Iterable[dict], column: str, where: str) -> Iterator[str]:
    for row in rows:
        if column not in row:
            raise CorpusError(f"{where}: no text column '{column}' (set data.text_column); "
                              f"available columns: {', '.join(map(str, row))}")
        value = row[column]
        if value is not None:
            yield str(value)


def _local_table(root: Path, fmt: str, column: str) -> Iterator[str]:
    import datasets

    files = _table_files(root, fmt)
    builder = "json" if fmt in ("json", "jsonl") else fmt
    try:
        rows = datasets.load_dataset(builder, data_files=files, split="train", streaming=True)
        yield from _rows_text(rows, column, str(root))
    except CorpusError:
        raise
    except Exception as err:  # datasets/pyarrow raise many types for malformed files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CorpusError(f"{root}: cannot be read as {fmt} ({first})") from None


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the HuggingFace hub endpoint accepts a TCP connection (fails fast instead of slow retries)."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if any(os.environ.get(k, "0").lower() not in ("0", "", "false") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return True  # offline mode: datasets reads its local cache itself
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


_HUB_HINT = ("without hub access, point data.source at local files (jsonl/csv/parquet/txt, a WikiExtractor "
             "directory or a Wikipedia dump), or set HF_HUB_OFFLINE=1 to use a copy in the local HF cache")


def _hub(name: str, cfg: DataConfig) -> Iterator[str]:
    import datasets

    if not hub_reachable():
        raise CorpusError(f"HF dataset '{name}': the HuggingFace hub cannot be reached; {_HUB_HINT}")
    try:
        rows = datasets.load_dataset(name, cfg.hf_config, split=cfg.hf_split, streaming=True)
        iterator = iter(rows)
        first = next(iterator, None)
    except Exception as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CorpusError(f"HF dataset '{name}' could not be loaded ({detail[:200]}); {_HUB_HINT}") from None
    if first is None:
        return
    yield from _rows_text(_chain(first, iterator), cfg.text_column, f"hf:{name}")


def _chain(first, rest):
    yield first
    yield from rest


def _raw_documents(cfg: DataConfig, workers: Optional[int]) -> Iterator[str]:
    if cfg.source == "demo":
        from .demo import iter_demo

        return iter_demo()
    if cfg.source.startswith("hf:") or cfg.format == "hf":
        return _hub(cfg.source.removeprefix("hf:"), cfg)
    root = Path(cfg.source).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"corpus {root}: no such file or directory (data.source)")
    fmt = cfg.format if cfg.format != "auto" else detect_format(root)
    if fmt == "wikiextractor":
        return _wikiextractor(root)
    if fmt == "wikidump":
        return _wikidump(root, workers)
    if fmt == "text":
        return _text(root, cfg.text_format)
    if fmt in TABLE_FORMATS:
        return _local_table(root, fmt, cfg.text_column)
    raise CorpusError(f"data.format={fmt!r} is not a file format")


def iter_documents(cfg: DataConfig, workers: Optional[int] = None) -> Iterator[str]:
    """Documents of the configured corpus, filtered by length and capped at ``max_documents``.

    ``workers`` bounds the processes that clean a raw Wikipedia dump (None: all cores). Raises CorpusError at
    the end of the stream when no document survived the filters.
    """
    documents = _raw_documents(cfg, workers)  # raises for a missing path before the first document
    return _filtered(documents, cfg)


def _filtered(documents: Iterator[str], cfg: DataConfig) -> Iterator[str]:
    count = 0
    if cfg.max_documents is not None and cfg.max_documents <= 0:
        return
    for doc in documents:
        doc = doc.strip()
        if len(doc) < cfg.min_doc_chars:
            continue
        yield doc
        count += 1
        if cfg.max_documents is not None and count >= cfg.max_documents:
            return
    if count == 0:
        raise CorpusError(f"corpus {cfg.source}: no documents of at least data.min_doc_chars={cfg.min_doc_chars} "
                          f"characters")
