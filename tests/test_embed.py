"""Sentence embeddings against sentence-transformers: exported tiny models load in ``SentenceTransformer`` and give
jaxbert's embeddings; the real all-MiniLM-L6-v2, imported, gives sentence-transformers' own embeddings."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbert
from jaxbert.config import ModelConfig
from jaxbert.inference.embed import embed, sentence_transformers_files
from jaxbert.hf.cli import export_main
from jaxbert.hf.convert import skeleton
from jaxbert.hf.export import export_hf
from jaxbert.hf.importer import import_hf
from jaxbert.tokenizer import load_tokenizer

WORDS = "the film movie is was not very good bad great fun dull story acting plot it this of and to".split()
TEXTS = ["The film is very good.", "A dull story, but the acting was great!", "it is not fun", "good",
         "This movie was the worst of the worst, and the plot is bad, very bad, not fun at all."]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # local directories only; never the hub


def _tokenizer(tmp_path: Path):
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens = specials + letters + ["##" + c for c in letters] + list(".,!?") + WORDS
    (tmp_path / "vocab.txt").write_text("".join(t + "\n" for t in tokens))
    return load_tokenizer(tmp_path / "vocab.txt")


def _model(vocab: int, post_ln: bool):
    cfg = ModelConfig(vocab_size=vocab, hidden=32, layers=2, heads=2, ffn=64, max_positions=40, post_ln=post_ln,
                      bias=True)  # as HF BERT: the encoder's linear biases are random too
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        base = 1.0 if jax.tree_util.keystr(path).endswith(".scale") else 0.0
        return jnp.asarray(base + 0.1 * rng.standard_normal(leaf.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, skeleton(cfg))


def test_sentence_transformers_files_describe_the_pooling():
    files = sentence_transformers_files(384, 256, "cls", normalize=True)
    assert [m["type"].rsplit(".", 1)[1] for m in files["modules.json"]] == ["Transformer", "Pooling", "Normalize"]
    assert files["1_Pooling/config.json"]["pooling_mode_cls_token"]
    assert not files["1_Pooling/config.json"]["pooling_mode_mean_tokens"]
    assert files["sentence_bert_config.json"]["max_seq_length"] == 256
    with pytest.raises(ValueError, match="pooling 'max'"):
        sentence_transformers_files(384, 256, "max")


@pytest.mark.parametrize("post_ln", [True, False])
@pytest.mark.parametrize("pooling,normalize", [("mean", False), ("cls", True)])
def test_exported_tiny_model_loads_in_sentence_transformers(tmp_path, post_ln, pooling, normalize):
    st = pytest.importorskip("sentence_transformers")
    tokenizer = _tokenizer(tmp_path)
    model = _model(tokenizer.vocab_size, post_ln)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pre-LN MLM head activation note
        out = export_hf(model, tokenizer, tmp_path / "export", pooling=pooling, normalize=normalize)
    ours = embed(model.bert, tokenizer, TEXTS, pooling=pooling, normalize=normalize, batch_size=2)
    theirs = st.SentenceTransformer(str(out), device="cpu").encode(TEXTS, batch_size=2, convert_to_numpy=True)
    assert theirs.shape == ours.shape == (len(TEXTS), 32)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


# --- the packaged all-MiniLM-L6-v2 ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_st_dir(minilm_dir: Path) -> Path:
    """The packaged model's folder, as sentence-transformers reads it."""
    if not (minilm_dir / "modules.json").is_file():
        pytest.skip(f"no sentence-transformers model in {minilm_dir}")
    return minilm_dir


def test_minilm_embeddings_equal_sentence_transformers(tmp_path, minilm_st_dir, shared_data):
    minilm_dir = minilm_st_dir
    st = pytest.importorskip("sentence_transformers")
    lines = (shared_data / "glue" / "SST-2" / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:65]
    texts = [line.split("\t")[0] for line in lines]
    reference = st.SentenceTransformer(str(minilm_dir), device="cpu").encode(texts, convert_to_numpy=True)
    with pytest.warns(UserWarning, match="MLM head"):
        import_hf(minilm_dir, tmp_path / "minilm")
    model = jaxbert.load(tmp_path / "minilm")
    ours = model.encode(texts, pooling="mean", normalize=True, batch_size=16)
    assert np.abs(ours - reference).max() <= 1e-4
    # exported again with its pooling: sentence-transformers reads jaxbert's export and agrees
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert export_main([str(tmp_path / "minilm"), str(tmp_path / "export"), "--normalize"]) == 0
    modules = json.loads((tmp_path / "export" / "modules.json").read_text())
    assert [m["path"] for m in modules] == ["", "1_Pooling", "2_Normalize"]
    again = st.SentenceTransformer(str(tmp_path / "export"), device="cpu").encode(texts, convert_to_numpy=True)
    assert np.abs(again - reference).max() <= 1e-4
