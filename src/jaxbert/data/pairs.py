"""Sentence-pair encoding and length-bucketed batches for finetuning.

An example is ``[CLS] a [SEP] b [SEP]`` (``[CLS] a [SEP]`` for single-sentence tasks) with segment ids 0 up to
and including the first ``[SEP]`` and 1 after it. Pairs longer than ``max_len`` lose tokens from the end of the
longer side first (BERT's rule: on a tie, from the second text), so a truncated example is exactly
``max_len`` long.

Encoded splits are ragged: one flat id array plus offsets. A :class:`Batch` pads them on the right to a length
that is a multiple of ``pad_multiple`` (so only a few shapes are ever compiled), with an explicit boolean
attention mask. Training batches have similar lengths (sorted within chunks of shuffled examples) and always
``batch_size`` rows: rows that fill the last batch repeat a real row with weight 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, NamedTuple, Optional, Protocol, Sequence

import numpy as np

from .glue import SplitData

_ENCODE_CHUNK = 8192  # texts handed to the tokenizer at a time
_SORT_CHUNK = 100  # training batches whose examples are sorted by length together


class _Special(Protocol):
    pad: int
    cls: int
    sep: int


class PairTokenizer(Protocol):
    """What encoding needs of :class:`jaxbert.tokenizer.Tokenizer`."""

    special: _Special

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...


def truncated_lengths(len_a: np.ndarray, len_b: Optional[np.ndarray], budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Lengths kept when removing tokens one at a time from the longer side (ties: from b) until a+b <= budget."""
    len_a = np.asarray(len_a, np.int64)
    if len_b is None:
        return np.minimum(len_a, budget), np.zeros_like(len_a)
    len_b = np.asarray(len_b, np.int64)
    over = len_a + len_b > budget
    keep_a = np.minimum(len_a, np.maximum(budget - len_b, (budget + 1) // 2))
    keep_a = np.where(over, keep_a, len_a)
    keep_b = np.where(over, budget - keep_a, len_b)
    return keep_a, keep_b


@dataclass(frozen=True)
class Encoded:
    """Token ids of a split, ragged: example i is ``ids[offsets[i]:offsets[i+1]]``, specials included."""

    ids: np.ndarray  # int32, all examples back to back
    offsets: np.ndarray  # int64, (n + 1,)
    first: np.ndarray  # int32, (n,): tokens of segment 0 ([CLS] a [SEP])
    labels: Optional[np.ndarray]  # int32 class ids / float32 scores, or None
    pad_id: int
    max_len: int

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def _encode_texts(tokenizer: PairTokenizer, texts: list[str]) -> list[list[int]]:
    out: list[list[int]] = []
    for start in range(0, len(texts), _ENCODE_CHUNK):
        out.extend(tokenizer.encode_batch(texts[start:start + _ENCODE_CHUNK]))
    return out


def encode_split(data: SplitData, tokenizer: PairTokenizer, max_len: int) -> Encoded:
    """Tokenize a split into ``[CLS] a [SEP] (b [SEP])`` examples of at most ``max_len`` tokens."""
    pair = data.text_b is not None
    budget = max_len - (3 if pair else 2)
    if budget < 2:
        raise ValueError(f"finetune.max_len={max_len} leaves no room for text after the special tokens")
    a = _encode_texts(tokenizer, data.text_a)
    b = _encode_texts(tokenizer, data.text_b) if data.text_b is not None else None
    keep_a, keep_b = truncated_lengths(np.fromiter(map(len, a), np.int64, len(a)),
                                       None if b is None else np.fromiter(map(len, b), np.int64, len(b)), budget)
    first = keep_a + 2
    lengths = first + (keep_b + 1 if pair else 0)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = np.empty(int(offsets[-1]), np.int32)
    cls, sep = tokenizer.special.cls, tokenizer.special.sep
    for i in range(len(a)):
        start, ka = offsets[i], keep_a[i]
        ids[start] = cls
        ids[start + 1:start + 1 + ka] = a[i][:ka]
        ids[start + 1 + ka] = sep
        if b is not None:
            kb = keep_b[i]
            ids[start + 2 + ka:start + 2 + ka + kb] = b[i][:kb]
            ids[start + 2 + ka + kb] = sep
    return Encoded(ids, offsets, first.astype(np.int32), data.labels, int(tokenizer.special.pad), max_len)


class Batch(NamedTuple):
    input_ids: np.ndarray  # int32 (B, L), right-padded
    segment_ids: np.ndarray  # int32 (B, L)
    mask: np.ndarray  # bool (B, L): True on real tokens
    labels: np.ndarray  # int32 / float32 (B,); zeros when the split is unlabelled
    weights: np.ndarray  # float32 (B,): 1 for real rows, 0 for filler rows
    rows: np.ndarray  # int64 (B,): example index of each row, -1 for filler rows


def padded_length(longest: int, pad_multiple: int, max_len: int) -> int:
    """The batch length: ``longest`` rounded up to a multiple of ``pad_multiple``, capped at ``max_len``."""
    return min(-(-longest // pad_multiple) * pad_multiple, max_len)


def make_batch(enc: Encoded, rows: np.ndarray, batch_size: int, pad_multiple: int) -> Batch:
    """Rows ``rows`` of ``enc`` as one right-padded batch of ``batch_size`` rows (filler rows have weight 0)."""
    rows = np.asarray(rows, np.int64)
    if not 0 < len(rows) <= batch_size:
        raise ValueError(f"make_batch: {len(rows)} rows for a batch of {batch_size}")
    lengths = enc.lengths[rows]
    width = padded_length(int(lengths.max()), pad_multiple, enc.max_len)
    ids = np.full((batch_size, width), enc.pad_id, np.int32)
    segments = np.zeros((batch_size, width), np.int32)
    positions = np.arange(width)
    for r, (row, length) in enumerate(zip(rows, lengths)):
        ids[r, :length] = enc.ids[enc.offsets[row]:enc.offsets[row] + length]
        segments[r, enc.first[row]:length] = 1
    mask = positions[None, :] < lengths[:, None]
    filled = len(rows)
    if filled < batch_size:  # repeat the first row, weight 0: keeps every row a valid sequence
        ids[filled:], segments[filled:] = ids[0], segments[0]
        mask = np.concatenate([mask, np.repeat(mask[:1], batch_size - filled, 0)])
    labels = np.zeros(batch_size, np.float32 if enc.labels is not None and enc.labels.dtype.kind == "f" else np.int32)
    if enc.labels is not None:
        labels[:filled] = enc.labels[rows]
    weights = np.zeros(batch_size, np.float32)
    weights[:filled] = 1.0
    all_rows = np.full(batch_size, -1, np.int64)
    all_rows[:filled] = rows
    return Batch(ids, segments, mask, labels, weights, all_rows)


def steps_per_epoch(n: int, batch_size: int) -> int:
    return -(-n // batch_size)


def train_batches(enc: Encoded, batch_size: int, pad_multiple: int, seed: int, epoch: int) -> Iterator[Batch]:
    """One epoch of length-bucketed batches: shuffle, sort by length within chunks, shuffle the batch order.

    A pure function of ``(seed, epoch)``; every example appears exactly once.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(enc))
    chunk = _SORT_CHUNK * batch_size
    groups: list[np.ndarray] = []
    for start in range(0, len(order), chunk):
        part = order[start:start + chunk]
        part = part[np.argsort(enc.lengths[part], kind="stable")]
        groups.extend(part[i:i + batch_size] for i in range(0, len(part), batch_size))
    for g in rng.permutation(len(groups)):
        yield make_batch(enc, groups[g], batch_size, pad_multiple)


def eval_batches(enc: Encoded, batch_size: int, pad_multiple: int) -> Iterator[Batch]:
    """Every example once, sorted by length (few shapes, little padding); ``Batch.rows`` restores the order."""
    order = np.argsort(enc.lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        yield make_batch(enc, order[start:start + batch_size], batch_size, pad_multiple)
