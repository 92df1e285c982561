"""WordPiece tokenizer: train from scratch, load (tokenizer.json or a published BERT vocab.txt), save.

A thin wrapper around a HuggingFace ``tokenizers.Tokenizer`` (the Rust library does the work, on all cores).
Special tokens are looked up by name, never assumed: :class:`SpecialIds` carries their ids. A trained
tokenizer has ``[PAD] [UNK] [CLS] [SEP] [MASK]`` at ids 0..4 and a vocabulary size that is a multiple of 64.

CLI::

    jaxbert tokenizer train [--config tiny] [key=value ...] --out DIR
    jaxbert tokenizer encode DIR "some text"
"""

from __future__ import annotations

import collections
import hashlib
import math
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Optional, Sequence

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from .config import TokenizerConfig
from .io import atomic_dir, write_atomic

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
VOCAB_MULTIPLE = 64  # embedding rows are kept a multiple of this (fast matmuls on accelerators)
_TRAIN_BATCH = 1000  # documents handed to the Rust trainer at a time


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the special tokens. Every consumer takes them from here instead of assuming 0..4."""

    pad: int
    unk: int
    cls: int
    sep: int
    mask: int

    def as_tuple(self) -> tuple[int, ...]:
        return (self.pad, self.unk, self.cls, self.sep, self.mask)


class PairEncoding(NamedTuple):
    """``[CLS] a [SEP] (b [SEP])`` ids with segment ids 0 for the first part and 1 for ``b``."""

    input_ids: list[int]
    segment_ids: list[int]


class Tokenizer:
    """A WordPiece tokenizer with BERT's special tokens. ``.inner`` is the HuggingFace object."""

    def __init__(self, inner: tokenizers.Tokenizer, source: str = "<memory>"):
        inner.no_truncation()  # published tokenizer.json files often carry truncation/padding settings
        inner.no_padding()
        self._inner = inner
        self.source = source
        missing = [t for t in SPECIAL_TOKENS if inner.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer {source}: special token(s) {', '.join(missing)} not in the vocabulary")
        self.special = SpecialIds(*(int(inner.token_to_id(t)) for t in SPECIAL_TOKENS))

    @property
    def inner(self) -> tokenizers.Tokenizer:
        return self._inner

    @property
    def vocab_size(self) -> int:
        return int(self._inner.get_vocab_size(with_added_tokens=True))

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, source={self.source!r})"

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        return self._inner.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many texts at once (multi-threaded in Rust), without special tokens."""
        return [e.ids for e in self.encode_batch_raw(texts)]

    def encode_batch_raw(self, texts: Sequence[str]) -> list[tokenizers.Encoding]:
        """HF ``Encoding`` objects of many texts, without special tokens; skips character offsets when the
        installed tokenizers has ``encode_batch_fast`` (0.21+)."""
        encode = getattr(self._inner, "encode_batch_fast", self._inner.encode_batch)
        return encode(list(texts), add_special_tokens=False)

    def encode_pair(self, a: str, b: Optional[str] = None, max_len: Optional[int] = None) -> PairEncoding:
        """``[CLS] a [SEP] b [SEP]`` (or ``[CLS] a [SEP]``), truncated longest-first to ``max_len`` tokens."""
        return self.encode_pairs([a], None if b is None else [b], max_len)[0]

    def encode_pairs(self, a: Sequence[str], b: Optional[Sequence[str]] = None,
                     max_len: Optional[int] = None) -> list[PairEncoding]:
        """Batched :meth:`encode_pair`; ``b`` is None for single-sentence tasks."""
        first = self.encode_batch(a)
        second = self.encode_batch(b) if b is not None else [None] * len(first)
        if b is not None and len(first) != len(second):
            raise ValueError(f"encode_pairs: {len(first)} first texts but {len(second)} second texts")
        return [self._build_pair(x, y, max_len) for x, y in zip(first, second)]

    def _build_pair(self, a: list[int], b: Optional[list[int]], max_len: Optional[int]) -> PairEncoding:
        cls, sep = self.special.cls, self.special.sep
        if max_len is not None:
            budget = max_len - (3 if b is not None else 2)
            if budget < 0:
                raise ValueError(f"max_len={max_len} leaves no room for the special tokens")
            a, b = _truncate_longest_first(a, b, budget)
        ids = [cls, *a, sep]
        segments = [0] * len(ids)
        if b is not None:
            ids += [*b, sep]
            segments += [1] * (len(b) + 1)
        return PairEncoding(ids, segments)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._inner.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> Optional[str]:
        return self._inner.id_to_token(int(token_id))

    def token_to_id(self, token: str) -> Optional[int]:
        return self._inner.token_to_id(token)

    def vocab(self) -> list[str]:
        """All tokens in id order (ids are dense 0..vocab_size-1)."""
        table = self._inner.get_vocab(with_added_tokens=True)
        tokens = [""] * len(table)
        for token, index in table.items():
            if index >= len(tokens):
                raise ValueError(f"tokenizer {self.source}: ids are not dense (id {index} >= {len(tokens)})")
            tokens[index] = token
        return tokens

    def vocab_hash(self) -> str:
        """A short hash of the id -> token mapping: equal hashes mean the same ids for the same tokens."""
        digest = hashlib.sha256("\n".join(self.vocab()).encode("utf-8")).hexdigest()
        return digest[:16]

    def save(self, directory: str | Path) -> Path:
        """Write ``tokenizer.json`` and ``vocab.txt`` (each atomically) into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_atomic(directory / "tokenizer.json", self._inner.to_str(pretty=True))
        write_atomic(directory / "vocab.txt", "".join(t + "\n" for t in self.vocab()))
        return directory


def _truncate_longest_first(a: list[int], b: Optional[list[int]], budget: int) -> tuple[list[int], Optional[list[int]]]:
    """Fit ``a`` and ``b`` into ``budget`` tokens the way HF's fast tokenizers do ("longest_first"): the shorter
    input is kept whole when the longer one can absorb the cut; otherwise both get half the budget, the longer
    (or ``b`` on a tie) the odd token."""
    if b is None:
        return a[:budget], None
    if len(a) + len(b) <= budget:
        return a, b
    n_short = min(len(a), len(b))
    n_long = n_short if n_short > budget else max(n_short, budget - n_short)
    if n_short + n_long > budget:
        n_short, n_long = budget // 2, budget // 2 + budget % 2
    keep_a, keep_b = (n_long, n_short) if len(a) > len(b) else (n_short, n_long)
    return a[:keep_a], b[:keep_b]


# ---------------------------------------------------------------------------------------------- building


def _bert_pipeline(tok: tokenizers.Tokenizer, lowercase: bool) -> tokenizers.Tokenizer:
    """BERT's normalizer, pre-tokenizer, decoder and ``[CLS] A [SEP] B [SEP]`` template on ``tok``."""
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=None, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def _set_template(tok: tokenizers.Tokenizer) -> None:
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])


def _wordpiece(vocab: dict[str, int]) -> models.WordPiece:
    return models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##", max_input_chars_per_word=100)


def from_vocab_file(path: str | Path, lowercase: bool = True) -> Tokenizer:
    """A BertWordPiece tokenizer from a published ``vocab.txt`` (one token per line, line number = id)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # only newlines: tokens may hold other breaks
    except UnicodeDecodeError:
        raise ValueError(f"vocabulary file {path}: not UTF-8 text (expected one token per line)") from None
    if lines and lines[-1] == "":
        lines.pop()
    vocab: dict[str, int] = {}
    for index, line in enumerate(lines):  # id = line number, as in BERT's own loader
        vocab.setdefault(line.rstrip("\r"), index)
    if len(vocab) != len(lines):
        raise ValueError(f"vocabulary file {path}: {len(lines) - len(vocab)} duplicate line(s)")
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise ValueError(f"vocabulary file {path}: special token(s) {', '.join(missing)} missing")
    tok = _bert_pipeline(tokenizers.Tokenizer(_wordpiece(vocab)), lowercase)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    _set_template(tok)
    return Tokenizer(tok, source=str(path))


def load_tokenizer(path: str | Path, lowercase: bool = True) -> Tokenizer:
    """Load a ``tokenizer.json``, a ``vocab.txt``, or a directory holding either (tokenizer.json preferred).

    ``lowercase`` only applies to a bare vocab.txt (a tokenizer.json carries its own normalizer).
    """
    path = Path(path)
    if path.is_dir():
        for name in ("tokenizer.json", "vocab.txt"):
            if (path / name).is_file():
                return load_tokenizer(path / name, lowercase)
        raise FileNotFoundError(f"tokenizer directory {path}: holds neither tokenizer.json nor vocab.txt")
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {path}: no such file or directory")
    if path.suffix == ".txt":
        return from_vocab_file(path, lowercase)
    try:
        inner = tokenizers.Tokenizer.from_file(str(path))
    except Exception as err:  # the Rust side raises a bare Exception on malformed JSON
        raise ValueError(f"tokenizer file {path}: not a tokenizers JSON file ({str(err).splitlines()[0]})") from None
    return Tokenizer(inner, source=str(path))


def round_vocab_size(size: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return int(math.ceil(size / multiple) * multiple)


MAX_PIECE_CHARS = 1 << 16  # longer documents are encoded (and counted for training) in pieces of this size


def text_pieces(text: str, max_chars: int = MAX_PIECE_CHARS) -> Iterator[str]:
    """``text`` in consecutive pieces of at most ``max_chars`` characters, each cut just after a space, tab or
    newline: BERT's pre-tokenizer never joins words across whitespace, so the pieces encode to exactly the ids of
    the whole text while the tokenizer's memory stays bounded. A stretch of ``max_chars`` characters without
    whitespace is cut where it is (such a "word" is far over the 100-character limit and [UNK] either way)."""
    start, n = 0, len(text)
    while n - start > max_chars:
        end = start + max_chars
        cut = max(text.rfind(" ", start + 1, end), text.rfind("\n", start + 1, end), text.rfind("\t", start + 1, end))
        cut = end if cut < 0 else cut + 1
        yield text[start:cut]
        start = cut
    if start < n or n == 0:
        yield text[start:]


def _pieces(documents: Iterable[str]) -> Iterator[str]:
    for doc in documents:
        yield from text_pieces(doc)


def _batched(texts: Iterable[str], size: int, max_chars: int = 4 * MAX_PIECE_CHARS) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if len(batch) == size or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _pad_vocab(vocab: dict[str, int], target: int) -> dict[str, int]:
    """``vocab`` with ``[unusedN]`` tokens appended until it has ``target`` entries (they never match text:
    BertPreTokenizer splits ``[`` off as punctuation)."""
    vocab = dict(vocab)
    n = 0
    while len(vocab) < target:
        name = f"[unused{n}]"
        if name not in vocab:
            vocab[name] = len(vocab)
        n += 1
    return vocab


def _is_punctuation(char: str) -> bool:
    """BERT's punctuation (the pre-tokenizer makes each one a word of its own)."""
    code = ord(char)
    return 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126 or \
        unicodedata.category(char).startswith("P")


_CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
        (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def _is_cjk(char: str) -> bool:
    """CJK ideographs, which BERT's normalizer surrounds with spaces (each one a word of its own)."""
    code = ord(char)
    return any(low <= code <= high for low, high in _CJK)


def count_characters(texts: Iterable[str], normalizer: normalizers.Normalizer) -> collections.Counter:
    """How often each character occurs in the normalized texts, whitespace excluded (what the trainer counts)."""
    counts: collections.Counter = collections.Counter()
    for text in texts:
        counts.update(normalizer.normalize_str(text))
    for char in [c for c in counts if c.isspace()]:
        del counts[char]
    return counts


def choose_alphabet(counts: collections.Counter, limit: int) -> tuple[list[str], list[str]]:
    """(alphabet, continuing symbols): the ``limit`` most frequent characters (ties by code point), and
    ``##c`` for each of them that can continue a word (not punctuation, not CJK), both in a fixed order."""
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:limit]
    alphabet = sorted(char for char, _ in ranked)
    return alphabet, [f"##{c}" for c in alphabet if not _is_punctuation(c) and not _is_cjk(c)]


def _rebuild(vocab: dict[str, int], lowercase: bool) -> tokenizers.Tokenizer:
    tok = _bert_pipeline(tokenizers.Tokenizer(_wordpiece(vocab)), lowercase)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    _set_template(tok)
    return tok


def _document_source(documents: Iterable[str] | Callable[[], Iterable[str]]) -> Callable[[], Iterable[str]]:
    if callable(documents):
        return documents
    if iter(documents) is documents:  # type: ignore[arg-type]
        raise TypeError("train_tokenizer reads the documents twice: pass a list or a function returning a "
                        "fresh iterator, not a one-shot iterator")
    return lambda: documents  # type: ignore[return-value]


def train_tokenizer(documents: Iterable[str] | Callable[[], Iterable[str]], cfg: TokenizerConfig,
                    progress: bool = True, length: Optional[int] = None) -> Tokenizer:
    """Train a BERT WordPiece tokenizer on a stream of documents (never held in memory at once).

    ``documents`` is read twice: a list, or a function returning a fresh iterator of documents. Specials
    ``[PAD] [UNK] [CLS] [SEP] [MASK]`` get ids 0..4; the vocabulary size is ``cfg.vocab_size`` rounded up to a
    multiple of 64 (padded with ``[unusedN]`` when the corpus is too small to fill it). ``length`` is a
    document-count hint for the progress bar (default: ``len(documents)`` or ``cfg.max_documents``).

    The result depends only on the documents and ``cfg``: HF's trainer numbers the continuing symbols
    (``##c``) in the order of its hash map, which differs from run to run and decides ties between equally
    frequent merges; here the alphabet is counted first (:func:`choose_alphabet`) and handed to the trainer
    with every continuing symbol already numbered, so every id, and therefore every tie, is fixed.
    """
    source = _document_source(documents)
    target = round_vocab_size(cfg.vocab_size)
    tok = _bert_pipeline(tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##",
                                                                max_input_chars_per_word=100)), cfg.lowercase)
    if length is None:
        first = documents if not callable(documents) else None
        length = len(first) if hasattr(first, "__len__") else cfg.max_documents  # type: ignore[arg-type]
    if cfg.max_documents is not None:
        length = min(length, cfg.max_documents) if length is not None else cfg.max_documents

    def read(desc: str) -> Iterator[str]:
        docs: Iterable[str] = source()
        if cfg.max_documents is not None:
            docs = _take(docs, cfg.max_documents)
        if progress:
            from tqdm.auto import tqdm

            docs = tqdm(docs, unit="docs", desc=desc, total=length, mininterval=2.0)
        return _pieces(docs)

    alphabet, continuing = choose_alphabet(count_characters(read("tokenizer: alphabet"), tok.normalizer),
                                           cfg.alphabet)
    trainer = trainers.WordPieceTrainer(vocab_size=target, min_frequency=cfg.min_frequency,
                                        special_tokens=[*SPECIAL_TOKENS, *continuing], initial_alphabet=alphabet,
                                        limit_alphabet=len(alphabet), continuing_subword_prefix="##",
                                        show_progress=False)
    tok.train_from_iterator(_batched(read("tokenizer: merges"), _TRAIN_BATCH), trainer=trainer)
    vocab = tok.get_vocab(with_added_tokens=True)
    if len(vocab) <= len(SPECIAL_TOKENS) + len(continuing):
        raise ValueError("tokenizer training: the corpus produced no tokens (is it empty?)")
    if len(vocab) > target:  # the trainer may overshoot by the alphabet; round up instead of cutting tokens
        target = round_vocab_size(len(vocab))
    return Tokenizer(_rebuild(_pad_vocab(vocab, target), cfg.lowercase), source="trained")


def _take(items: Iterable[str], n: int) -> Iterator[str]:
    for i, item in enumerate(items):
        if i >= n:
            return
        yield item


# ---------------------------------------------------------------------------------------------------- CLI


def check_out_dir(out: Path) -> None:
    """``--out`` must be new or an empty directory: nothing already there is overwritten."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"tokenizer train --out {out}: is a file; expected a new or empty directory")
    if out.is_dir():
        held = sorted(p.name for p in out.iterdir())
        if held:
            shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
            raise ValueError(f"tokenizer train --out {out}: not empty (holds {shown}); expected a new or empty "
                             "directory, so that nothing there is overwritten")


def save_new(tok: Tokenizer, out: Path) -> Path:
    """Save into a temporary sibling of ``out`` and rename it into place (``out`` new or empty): a failure
    leaves neither a partial directory nor temporary files."""
    check_out_dir(out)
    return atomic_dir(out, tok.save, manifest=False, exists="refuse")
