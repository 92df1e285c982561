"""Loader: chunks of the memmap, determinism and resume by (seed, sample index), process split, prefetcher."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from jaxbert.data import loader
from jaxbert.data.loader import Prefetcher, TokenStream, get_batch, get_micro_batch, get_samples

SEQ = 16


@pytest.fixture
def stream(tmp_path) -> TokenStream:
    tokens = (np.arange(SEQ * 50 + 7) % 60000).astype(np.uint16)  # 50 chunks and a partial tail
    path = tmp_path / "train.bin"
    tokens.tofile(path)
    return TokenStream(path, "uint16")


def test_stream_is_a_read_only_memmap(stream):
    assert isinstance(stream.tokens, np.memmap) and not stream.tokens.flags.writeable
    assert len(stream) == SEQ * 50 + 7 and stream.n_chunks(SEQ) == 50


def test_rows_are_whole_chunks(stream):
    batch = get_batch(stream, seed=0, step=3, batch_size=8, seq_len=SEQ)
    assert batch.shape == (8, SEQ) and batch.dtype == np.int32
    for row in batch:
        assert row[0] % SEQ == 0 and np.array_equal(row, np.arange(row[0], row[0] + SEQ))


def test_batch_is_a_pure_function_of_seed_and_step(stream):
    a = get_batch(stream, seed=1, step=5, batch_size=8, seq_len=SEQ)
    loader.epoch_permutation.cache_clear()
    b = get_batch(stream, seed=1, step=5, batch_size=8, seq_len=SEQ)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, get_batch(stream, seed=2, step=5, batch_size=8, seq_len=SEQ))
    assert not np.array_equal(a, get_batch(stream, seed=1, step=6, batch_size=8, seq_len=SEQ))


def test_each_epoch_visits_every_chunk_once(stream):
    first = loader.sample_indices(seed=0, start=0, count=50, n_chunks=50)
    second = loader.sample_indices(seed=0, start=50, count=50, n_chunks=50)
    assert sorted(first) == list(range(50)) and sorted(second) == list(range(50))
    assert not np.array_equal(first, second)
    across = loader.sample_indices(seed=0, start=45, count=10, n_chunks=50)  # spans the epoch boundary
    np.testing.assert_array_equal(across, np.concatenate([first[45:], second[:5]]))


def test_resume_with_micro_batches_and_a_changing_batch_size(stream):
    step_batch = get_batch(stream, seed=0, step=7, batch_size=12, seq_len=SEQ)
    micro = [get_micro_batch(stream, 0, 7, m, 4, 12, SEQ) for m in range(3)]
    np.testing.assert_array_equal(np.concatenate(micro), step_batch)
    sizes = lambda step: 4 if step < 3 else 8  # a batch-size ramp
    run = list(itertools.islice(loader.batches(stream, 0, SEQ, sizes), 6))
    resumed = list(loader.batches(stream, 0, SEQ, sizes, start_step=4, start_sample=run[4][1], steps=2))
    for (s1, g1, b1), (s2, g2, b2) in zip(run[4:], resumed):
        assert (s1, g1) == (s2, g2)
        np.testing.assert_array_equal(b1, b2)
    np.testing.assert_array_equal(np.concatenate([b for _, _, b in run]),
                                  get_samples(stream, 0, 0, 4 * 3 + 8 * 3, SEQ))


def test_process_split_partitions_the_global_batch(stream):
    whole = get_batch(stream, seed=3, step=2, batch_size=12, seq_len=SEQ)
    parts = [get_batch(stream, 3, 2, 12, SEQ, process_index=p, process_count=3) for p in range(3)]
    assert all(p.shape == (4, SEQ) for p in parts)
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    with pytest.raises(ValueError, match="split evenly"):
        get_batch(stream, 3, 2, 10, SEQ, process_index=0, process_count=3)


def test_shifted_windows_cut_each_later_epoch_at_its_own_offset(stream):
    n = stream.n_chunks(SEQ, shift=True)
    assert n == (SEQ * 50 + 7 - (SEQ - 1)) // SEQ == 49  # every window fits at every offset
    rows = get_samples(stream, seed=0, start=0, count=5 * n, seq_len=SEQ, shift=True)
    offsets = []
    for epoch in range(5):
        part = rows[epoch * n:(epoch + 1) * n]
        starts = part[:, 0].astype(np.int64)  # the stream's values are their own positions
        assert all(np.array_equal(row, np.arange(row[0], row[0] + SEQ)) for row in part)  # contiguous windows
        offset = int(starts[0]) % SEQ
        assert sorted(starts.tolist()) == [offset + i * SEQ for i in range(n)]  # each window of its grid once
        assert offset == loader.epoch_offset(0, epoch, SEQ)
        offsets.append(offset)
    assert offsets[0] == 0 and any(offsets[1:]) and all(0 <= o < SEQ for o in offsets)
    plain = get_samples(stream, seed=0, start=0, count=5 * 50, seq_len=SEQ)
    assert all(int(v) % SEQ == 0 for v in plain[:, 0])  # off: the one grid of every epoch, as before


def test_shifted_windows_keep_resume_and_the_process_split_exact(stream):
    whole = get_samples(stream, 3, 40, 24, SEQ, shift=True)  # spans the boundary of epochs 0 and 1 (49 windows)
    parts = [get_samples(stream, 3, 40 + 8 * i, 8, SEQ, shift=True) for i in range(3)]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    shares = [get_samples(stream, 3, 40, 24, SEQ, process_index=p, process_count=3, shift=True) for p in range(3)]
    np.testing.assert_array_equal(np.concatenate(shares), whole)
    loader.epoch_permutation.cache_clear()
    np.testing.assert_array_equal(get_samples(stream, 3, 40, 24, SEQ, shift=True), whole)
    assert not np.array_equal(get_samples(stream, 4, 40, 24, SEQ, shift=True), whole)


def test_stream_shorter_than_one_sequence(tmp_path):
    path = tmp_path / "short.bin"
    np.arange(10, dtype=np.uint16).tofile(path)
    with pytest.raises(ValueError, match="short.bin.*shorter than one sequence"):
        get_batch(TokenStream(path, "uint16"), 0, 0, 2, seq_len=16)
    np.arange(20, dtype=np.uint16).tofile(path)  # one window on the grid, none at every offset
    assert TokenStream(path, "uint16").n_chunks(16) == 1
    with pytest.raises(ValueError, match=r"short.bin: 20 tokens .* at every window offset \(data.shift_windows\)"):
        get_samples(TokenStream(path, "uint16"), 0, 0, 1, 16, shift=True)
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        TokenStream(tmp_path / "missing.bin", "uint16")


def test_uint32_streams(tmp_path):
    path = tmp_path / "big.bin"
    (np.arange(64, dtype=np.uint32) + 70000).tofile(path)
    batch = get_batch(TokenStream(path, "uint32"), 0, 0, 4, 16)
    assert batch.min() >= 70000 and sorted(batch[:, 0] - 70000) == [0, 16, 32, 48]


def test_prefetcher_order_errors_and_close():
    with Prefetcher(iter(range(20)), depth=3) as items:
        assert list(items) == list(range(20))

    def failing():
        yield 1
        raise RuntimeError("reader failed")

    items = Prefetcher(failing(), depth=2)
    assert next(items) == 1
    with pytest.raises(RuntimeError, match="reader failed"):
        next(items)

    endless = Prefetcher(itertools.count(), depth=2)
    assert next(endless) == 0
    endless.close()
    deadline = time.time() + 5
    while endless._thread.is_alive() and time.time() < deadline:
        time.sleep(0.01)
    assert not endless._thread.is_alive()
