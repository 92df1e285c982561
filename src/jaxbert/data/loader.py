"""Fixed-length training sequences from a memmapped token stream; the order is a pure function of the seed.

The stream (one flat array of token ids, documents separated by ``[SEP]``) is cut into
``n_chunks = tokens // seq_len`` contiguous chunks. Samples are numbered globally 0, 1, 2, ... across the whole
run; sample ``g`` lies in epoch ``e = g // n_chunks`` and is chunk ``perm_e[g % n_chunks]``, where ``perm_e`` is a
permutation of ``[0, n_chunks)`` drawn by numpy from ``(seed, e)``. The permutation is an int array of
``n_chunks`` entries (4 bytes each: 1M chunks = 4 MB), computed once per epoch and cached; nothing else is
materialised, and the tokens themselves are only read from the memmap (page cache), never copied whole.

With ``shift`` (``data.shift_windows``), every epoch after the first cuts its chunks at its own offset in
``[0, seq_len)``, drawn from ``(seed, epoch)``: a repeated pass sees the same text in different windows (each
token with other neighbours and at another position) instead of the same sequences again. ``n_chunks`` is then
``(tokens - seq_len + 1) // seq_len``, so that every offset fits (at most one chunk fewer per epoch).

Because the data depend only on ``(seed, sample index)``, a resumed run that knows how many samples it has
consumed gets exactly the data it would have seen; a batch size that changes during training (a ramp) stays
exact when the caller counts samples (:func:`get_samples`). With several processes, each reads only its own
contiguous slice of the global batch.
"""

from __future__ import annotations

import queue
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Generic, Iterable, Iterator, Optional, TypeVar

import numpy as np

T = TypeVar("T")


class TokenStream:
    """A read-only view of a flat token file (raw ``dtype`` values, no header)."""

    def __init__(self, path: str | Path, dtype: str | np.dtype):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"token stream {self.path}: no such file")
        self.dtype = np.dtype(dtype)
        size = self.path.stat().st_size
        if size % self.dtype.itemsize:
            raise ValueError(f"token stream {self.path}: {size} bytes is not a whole number of {self.dtype} values")
        self.tokens = np.memmap(self.path, dtype=self.dtype, mode="r") if size else np.zeros(0, self.dtype)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def __repr__(self) -> str:
        return f"TokenStream({str(self.path)!r}, {len(self)} tokens, {self.dtype})"

    def n_chunks(self, seq_len: int, shift: bool = False) -> int:
        """Number of whole ``seq_len`` chunks in an epoch (with ``shift``: that fit at every offset below
        ``seq_len``); an error when the stream is shorter than one."""
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        n = (len(self) - (seq_len - 1 if shift else 0)) // seq_len
        if n < 1:
            where = " at every window offset (data.shift_windows)" if shift else ""
            raise ValueError(f"token stream {self.path}: {len(self)} tokens is shorter than one sequence "
                             f"of seq_len={seq_len}{where}")
        return n

    def chunks(self, indices: np.ndarray, seq_len: int, offsets: np.ndarray | int = 0) -> np.ndarray:
        """Rows ``tokens[o + i*seq_len : o + (i+1)*seq_len]`` for each chunk index ``i`` and its offset ``o``,
        as int32 ``(len(indices), seq_len)``."""
        starts = np.asarray(indices, np.int64) * seq_len + np.asarray(offsets, np.int64)
        out = np.empty((len(starts), seq_len), np.int32)
        for row, start in enumerate(starts.tolist()):
            out[row] = self.tokens[start:start + seq_len]
        return out


@lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, n_chunks: int) -> np.ndarray:
    """The order of chunks in one epoch: a permutation of ``[0, n_chunks)`` determined by (seed, epoch)."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), 0x6A78])
    dtype = np.uint32 if n_chunks <= 2**32 else np.uint64
    perm = rng.permutation(n_chunks).astype(dtype)
    perm.setflags(write=False)
    return perm


def epoch_offset(seed: int, epoch: int, seq_len: int) -> int:
    """Where epoch ``epoch`` cuts its chunks when windows shift: 0 for the first epoch, then an offset in
    ``[0, seq_len)`` determined by (seed, epoch)."""
    if epoch == 0:
        return 0
    return int(np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), 0x5F1F7]).integers(seq_len))


def sample_offsets(seed: int, start: int, count: int, n_chunks: int, seq_len: int) -> np.ndarray:
    """The window offset (:func:`epoch_offset`) of each global sample ``start, ..., start + count - 1``."""
    epochs, index = np.unique((start + np.arange(count, dtype=np.int64)) // n_chunks, return_inverse=True)
    return np.array([epoch_offset(seed, int(e), seq_len) for e in epochs], np.int64)[index]


def sample_indices(seed: int, start: int, count: int, n_chunks: int) -> np.ndarray:
    """Chunk indices of the global samples ``start, ..., start + count - 1`` (int64)."""
    if start < 0 or count < 0:
        raise ValueError(f"sample range must be non-negative, got start={start} count={count}")
    out = np.empty(count, np.int64)
    done = 0
    while done < count:
        g = start + done
        epoch, offset = divmod(g, n_chunks)
        take = min(count - done, n_chunks - offset)
        out[done:done + take] = epoch_permutation(seed, epoch, n_chunks)[offset:offset + take]
        done += take
    return out


def process_slice(count: int, process_index: int, process_count: int) -> tuple[int, int]:
    """(offset, length) of this process's contiguous share of ``count`` global rows."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")
    if count % process_count:
        raise ValueError(f"batch of {count} sequences does not split evenly over {process_count} processes")
    share = count // process_count
    return process_index * share, share


def get_samples(stream: TokenStream, seed: int, start: int, count: int, seq_len: int,
                process_index: int = 0, process_count: int = 1, shift: bool = False) -> np.ndarray:
    """Global samples ``[start, start + count)`` as int32 ``(count / process_count, seq_len)``: this process's
    rows only. The result depends only on (stream, seed, start, count, seq_len, process split, shift)."""
    offset, share = process_slice(count, process_index, process_count)
    n_chunks = stream.n_chunks(seq_len, shift)
    indices = sample_indices(seed, start + offset, share, n_chunks)
    offsets = sample_offsets(seed, start + offset, share, n_chunks, seq_len) if shift else 0
    return stream.chunks(indices, seq_len, offsets)


def get_batch(stream: TokenStream, seed: int, step: int, batch_size: int, seq_len: int,
              process_index: int = 0, process_count: int = 1) -> np.ndarray:
    """The batch of optimizer step ``step`` for a constant ``batch_size`` (samples ``step * batch_size ...``)."""
    return get_samples(stream, seed, step * batch_size, batch_size, seq_len, process_index, process_count)


def get_micro_batch(stream: TokenStream, seed: int, step: int, micro: int, micro_batch: int, batch_size: int,
                    seq_len: int, process_index: int = 0, process_count: int = 1) -> np.ndarray:
    """Micro-batch ``micro`` of step ``step`` (constant ``batch_size``, a multiple of ``micro_batch``).

    The micro-batches of a step concatenate to :func:`get_batch` of that step. With a varying batch size, count
    samples and call :func:`get_samples` instead.
    """
    if batch_size % micro_batch or not 0 <= micro < batch_size // micro_batch:
        raise ValueError(f"micro-batch {micro} of size {micro_batch} does not fit a batch of {batch_size}")
    start = step * batch_size + micro * micro_batch
    return get_samples(stream, seed, start, micro_batch, seq_len, process_index, process_count)


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


_DONE = object()


class Prefetcher(Generic[T]):
    """Runs an iterable in a background thread, ``depth`` items ahead (a bounded queue).

    Iterate it like the wrapped iterable; an exception in the producer is re-raised in the consumer.
    ``close()`` (or leaving a ``with`` block) stops the thread promptly.
    """

    def __init__(self, items: Iterable[T], depth: int = 2):
        if depth < 1:
            raise ValueError(f"prefetch depth must be at least 1, got {depth}")
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(iter(items),), daemon=True,
                                        name="jaxbert-prefetch")
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, items: Iterator[T]) -> None:
        try:
            for item in items:
                if not self._put(item):
                    return
            self._put(_DONE)
        except BaseException as err:  # handed to the consumer
            self._put(_Failure(err))

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        while True:
            if self._stop.is_set():
                raise StopIteration
            try:
                item = self._queue.get(timeout=0.1)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise StopIteration from None
        if item is _DONE:
            self._stop.set()
            raise StopIteration
        if isinstance(item, _Failure):
            self._stop.set()
            raise item.error
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)

    def __enter__(self) -> "Prefetcher[T]":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def batches(stream: TokenStream, seed: int, seq_len: int, batch_size: int | Callable[[int], int], start_step: int = 0,
            start_sample: int = 0, process_index: int = 0, process_count: int = 1,
            steps: Optional[int] = None) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield ``(step, first_sample, batch)`` from ``start_step`` on; ``batch_size`` may be a function of the step
    (a ramp). ``start_sample`` is the number of samples consumed before ``start_step`` (from a checkpoint)."""
    step, sample = start_step, start_sample
    while steps is None or step < start_step + steps:
        size = batch_size(step) if callable(batch_size) else batch_size
        yield step, sample, get_samples(stream, seed, sample, size, seq_len, process_index, process_count)
        step, sample = step + 1, sample + size
