"""Stream a raw MediaWiki ``pages-articles`` XML dump (plain or .bz2) and turn each article into plain text.

The XML is parsed incrementally with ``xml.etree.ElementTree.iterparse`` and each finished ``<page>`` is
dropped from the tree, so memory stays flat however large the dump. Tags are matched without their namespace
(dumps change the export schema version). Pages outside namespace 0 and redirects are skipped.

Wikitext -> text uses mwparserfromhell: references, tables, galleries, files/categories/interlanguage links and
the trailing reference-like sections (References, External links, See also, ...) are removed, then
``strip_code`` drops the remaining markup and a few regexes tidy what is left. Parsing is the slow part, so it
runs in a pool of worker processes on batches of pages.
"""

from __future__ import annotations

import bz2
import multiprocessing
import os
import re
import xml.etree.ElementTree as ET
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import IO, Iterator, Optional

from . import CorpusError

_DROP_SECTIONS = {"references", "external links", "see also", "notes", "further reading", "bibliography",
                  "sources", "citations", "footnotes", "notes and references", "works cited"}
_DROP_ELEMENTS = re.compile(
    r"<!--.*?-->|<ref\b[^>]*/>|<(ref|gallery|math|timeline|imagemap|score|syntaxhighlight|source|table)\b[^>]*>"
    r".*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_HEADING2 = re.compile(r"^==([^=].*?)==\s*$", re.MULTILINE)
_NAMESPACE_LINK = re.compile(r"\[\[\s*:?\s*(category|file|image|media|[a-z]{2,3}(-[a-z]+)?)\s*:", re.IGNORECASE)
_BATCH = 16  # pages per task handed to a worker process


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _drop_sections(text: str) -> str:
    """Cut level-2 sections whose heading is reference-like (References, External links, ...)."""
    heads = list(_HEADING2.finditer(text))
    keep, cursor = [], 0
    for i, head in enumerate(heads):
        if head.group(1).strip().strip("'").lower() in _DROP_SECTIONS:
            keep.append(text[cursor:head.start()])
            cursor = heads[i + 1].start() if i + 1 < len(heads) else len(text)
    keep.append(text[cursor:])
    return "".join(keep)


def _matching_end(text: str, start: int, opening: str, closing: str) -> int:
    """Index just past the ``closing`` that balances the ``opening`` at ``start`` (end of text if none)."""
    depth = 0
    for token in re.finditer(f"{re.escape(opening)}|{re.escape(closing)}", text[start:]):
        depth += 1 if token.group() == opening else -1
        if depth == 0:
            return start + token.end()
    return len(text)


def _drop_balanced(text: str, start_pattern: re.Pattern, opening: str, closing: str) -> str:
    pieces, cursor = [], 0
    while True:
        match = start_pattern.search(text, cursor)
        if match is None:
            break
        pieces.append(text[cursor:match.start()])
        cursor = _matching_end(text, match.start(), opening, closing)
    pieces.append(text[cursor:])
    return "".join(pieces)


_TABLE_START = re.compile(r"\{\|")


def clean_wikitext(text: str) -> str:
    """Plain text of an article's wikitext: comments, references, tables, galleries, file/category/interlanguage
    links and reference-like sections removed, then mwparserfromhell's ``strip_code`` and a tidy-up."""
    import mwparserfromhell

    text = _drop_sections(_DROP_ELEMENTS.sub("", text))
    text = _drop_balanced(text, _TABLE_START, "{|", "|}")
    text = _drop_balanced(text, _NAMESPACE_LINK, "[[", "]]")
    plain = mwparserfromhell.parse(text).strip_code(normalize=True, collapse=True, keep_template_params=False)
    return tidy(plain)


_LEFTOVERS = re.compile(r"\{\{|\}\}|\[\[|\]\]|'{2,}|<[^>\n]{0,200}>|__[A-Z]+__")
_EMPTY_BRACKETS = re.compile(r"\(\s*[,;]?\s*\)")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:])")
_SPACES = re.compile(r"[ \t\u00a0]+")


def tidy(text: str) -> str:
    """Remove markup leftovers, empty brackets and doubled spaces; one paragraph per line, no blank lines."""
    text = _LEFTOVERS.sub("", text)
    text = _EMPTY_BRACKETS.sub("", text)
    lines = []
    for line in text.splitlines():
        line = _SPACE_BEFORE_PUNCT.sub(r"\1", _SPACES.sub(" ", line)).strip()
        if line and not line.startswith(("|", "!", "{|", "|}")):
            lines.append(line)
    return "\n".join(lines)


def iter_pages(handle: IO[bytes], where: str) -> Iterator[str]:
    """Raw wikitext of the article pages (namespace 0, not redirects) of an XML stream."""
    context = ET.iterparse(handle, events=("start", "end"))
    root = None
    try:
        for event, elem in context:
            if root is None:
                root = elem
                if _local(elem.tag) != "mediawiki":
                    raise ValueError(f"{where}: root element <{_local(elem.tag)}>, expected a MediaWiki export "
                                     f"<mediawiki>")
            if event != "end" or _local(elem.tag) != "page":
                continue
            text = _article_text(elem)
            root.clear()  # drop finished pages: memory stays flat
            if text is not None:
                yield text
    except ET.ParseError as err:
        raise ValueError(f"{where}: malformed XML ({err})") from None


def _article_text(page: ET.Element) -> Optional[str]:
    ns, text, redirect = "0", None, False
    for child in page:
        name = _local(child.tag)
        if name == "ns":
            ns = (child.text or "").strip()
        elif name == "redirect":
            redirect = True
        elif name == "revision":
            for field in child:
                if _local(field.tag) == "text":
                    text = field.text or ""
    if ns != "0" or redirect or text is None or text.lstrip()[:9].upper() == "#REDIRECT":
        return None
    return text


def _batches(pages: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for page in pages:
        batch.append(page)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _clean_many(pages: list[str]) -> list[str]:
    return [clean_wikitext(page) for page in pages]


def _clean_in_pool(pages: Iterator[str], workers: int) -> Iterator[str]:
    """Clean pages in ``workers`` processes, in order, with a bounded number of batches in flight."""
    in_flight: deque[Future] = deque()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for batch in _batches(pages, _BATCH):
            in_flight.append(pool.submit(_clean_many, batch))
            if len(in_flight) >= 3 * workers:
                yield from in_flight.popleft().result()
        while in_flight:
            yield from in_flight.popleft().result()


def read_dump(path: Path, workers: Optional[int] = None) -> Iterator[str]:
    """Plain-text articles of a dump file, in dump order; ``workers`` processes clean the wikitext (1: inline)."""

    workers = max(1, workers or os.cpu_count() or 1)
    try:
        with (bz2.open(path, "rb") if path.suffix == ".bz2" else open(path, "rb")) as handle:
            pages = iter_pages(handle, str(path))
            if workers == 1:
                yield from map(clean_wikitext, pages)
            else:
                yield from _clean_in_pool(pages, workers)
    except BrokenProcessPool as err:
        raise CorpusError(f"{path}: the wikitext worker processes died ({err}); try impl.workers=1") from None
    except ValueError as err:
        raise CorpusError(str(err)) from None
    except (OSError, EOFError) as err:
        raise CorpusError(f"{path}: corrupt or truncated bz2 file ({err})") from None
