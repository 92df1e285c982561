"""HuggingFace interop: conversion round trips, import/export through files, parity with transformers (torch,
CPU, fp32), the packaged all-MiniLM-L6-v2 checkpoint, and one clear error per kind of bad input."""

from __future__ import annotations

import dataclasses

import json
import warnings
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbert.checkpoint import load_pretrained, save_model
from jaxbert.config import ModelConfig
from jaxbert.hf.cli import export_main, import_main
from jaxbert.hf.convert import (hf_config_from_model, hf_state_to_model, model_config_from_hf,
                                model_to_hf_state, skeleton)
from jaxbert.hf.export import export_hf, load_source
from jaxbert.io import named_arrays
from jaxbert.hf.importer import import_hf, run_config
from jaxbert.model import BertForClassification, BertForMLM
from jaxbert.tokenizer import load_tokenizer

WORDS = ("the film movie is was not very good bad great fun dull story acting plot it this of and to "
         "in with but for as an one its love hate best worst").split()
SENTENCES = ["The film is very good.", "A dull story, but the acting was great!", "it is not fun",
             "This movie was the worst of the worst, and the plot is bad.", "love it", "one great film",
             "The acting in this movie is fun and the story is good, but the plot was dull."]


def _write_vocab(directory: Path, pad_id: int = 0) -> Path:
    """A small BERT vocab.txt; [PAD] at ``pad_id`` (real vocabularies differ in where it sits)."""
    specials = ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    specials.insert(pad_id, "[PAD]")
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = specials + letters + ["##" + c for c in letters] + list(".,!?'") + WORDS
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("".join(t + "\n" for t in tokens))
    return directory / "vocab.txt"


def _tokenizer(tmp_path: Path, pad_id: int = 0):
    return load_tokenizer(_write_vocab(tmp_path / f"vocab{pad_id}", pad_id))


def _model(vocab: int, post_ln: bool, num_labels=None, activation: str = "gelu", seed: int = 0, **options):
    """A tiny model with every parameter random (LayerNorm scales and biases too), so no mapping error can hide.
    Filled from numpy on a shape-only skeleton: no initialisation to compile. ``options``: more ModelConfig
    fields (``bias``, ``ffn_type``); ``bias`` defaults to True, as in HF BERT (import always gives it)."""
    options = {"bias": True, **options}
    cfg = ModelConfig(vocab_size=vocab, hidden=32, layers=2, heads=2, ffn=64, max_positions=40, post_ln=post_ln,
                      activation=activation, type_vocab_size=2, **options)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        base = 1.0 if jax.tree_util.keystr(path).endswith(".scale") else 0.0
        return jnp.asarray(base + 0.1 * rng.standard_normal(leaf.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, skeleton(cfg, num_labels))


@eqx.filter_jit
def _forward(model, ids, seg, mask):
    return model(ids, seg, mask)


def _same_params(a, b) -> bool:
    fa, fb = named_arrays(a), named_arrays(b)
    return fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)


def _batch(tokenizer, sentences, segments: bool = False):
    """Right-padded ids / segment ids / mask; pairs of sentences when ``segments``."""
    if segments:
        rows = [tokenizer.encode_pair(a, b) for a, b in zip(sentences, sentences[1:] + sentences[:1])]
    else:
        rows = [tokenizer.encode_pair(s) for s in sentences]
    width = max(len(r.input_ids) for r in rows)
    ids = np.full((len(rows), width), tokenizer.special.pad, np.int64)
    seg = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r.input_ids)] = r.input_ids
        seg[i, : len(r.segment_ids)] = r.segment_ids
    mask = ids != tokenizer.special.pad
    assert mask.sum(1).min() < width, "the batch must contain padding"
    return ids, seg, mask


def _torch_outputs(hf_model, ids, seg, mask):
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        out = hf_model(input_ids=torch.tensor(ids), token_type_ids=torch.tensor(seg),
                       attention_mask=torch.tensor(mask.astype(np.int64)))
    return out


def _save_jaxbert(directory: Path, model: BertForMLM, tokenizer) -> Path:
    return save_model(directory, run_config(model.config, tokenizer), model, tokenizer)


# --- pure conversion ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("post_ln", [True, False], ids=["post_ln", "pre_ln"])
@pytest.mark.parametrize("num_labels", [None, 3], ids=["mlm", "classifier"])
def test_state_round_trip_is_bitwise(post_ln, num_labels):
    model = _model(96, post_ln, num_labels)
    state = model_to_hf_state(model, pad_id=2)
    hf_config = hf_config_from_model(model.config, pad_id=2, num_labels=num_labels)
    cfg, back = hf_state_to_model(state, hf_config)
    assert cfg == model.config
    assert type(back) is type(model)
    assert _same_params(model, back)


def test_pre_ln_position_table_is_shifted_by_pad_plus_one():
    model = _model(96, post_ln=False)
    state = model_to_hf_state(model, pad_id=3)
    table = state["roberta_prelayernorm.embeddings.position_embeddings.weight"]
    assert table.shape == (40 + 4, 32)
    assert not table[:4].any()
    np.testing.assert_array_equal(table[4:], np.asarray(model.bert.embeddings.position))


def test_activation_mapping_and_unknown_activation():
    base = hf_config_from_model(_model(96, True).config, pad_id=0)
    for hf_act, ours in (("gelu", "gelu"), ("gelu_new", "gelu_tanh"), ("gelu_pytorch_tanh", "gelu_tanh")):
        assert model_config_from_hf({**base, "hidden_act": hf_act}).activation == ours
    with pytest.raises(ValueError, match="hidden_act 'relu'"):
        model_config_from_hf({**base, "hidden_act": "relu"})


def test_hf_config_always_gives_biases_whatever_the_default():
    assert not ModelConfig().bias  # the default is bias-free ...
    for post_ln in (True, False):  # ... but HF BERT has biases: the config says so explicitly
        hf_config = hf_config_from_model(_model(96, post_ln, bias=False).config, pad_id=0)
        assert "bias" not in json.dumps(hf_config)
        assert model_config_from_hf(hf_config).bias is True


@pytest.mark.parametrize("num_labels", [None, 2], ids=["mlm", "classifier"])
def test_import_hf_directory_stores_bias_true(tmp_path, num_labels):
    tokenizer = _tokenizer(tmp_path)
    export_hf(_model(tokenizer.vocab_size, True, num_labels, bias=False), tokenizer, tmp_path / "hf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a classifier import re-initialises the MLM head
        import_hf(tmp_path / "hf", tmp_path / "ours")
    assert "  bias: true\n" in (tmp_path / "ours" / "config.yaml").read_text()  # written out, not left to a default
    back, _, _ = load_source(tmp_path / "ours")
    assert back.config.bias and back.bert.layers.qkv.bias is not None
    assert not np.asarray(back.bert.layers.qkv.bias).any()  # the exported zeros
    tanh = dataclasses.replace(_model(96, True).config, activation="gelu_tanh")
    assert hf_config_from_model(tanh, pad_id=0)["hidden_act"] == "gelu_pytorch_tanh"  # torch's fused tanh GELU


# --- import from HF directories written by transformers ---------------------------------------------------------


def _hf_bert(tmp_path: Path, arch: str, pad_id: int = 0, safe: bool = True, num_labels: int = 2) -> Path:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    vocab = _write_vocab(tmp_path / "hf", pad_id)
    size = len(vocab.read_text().splitlines())
    config = transformers.BertConfig(vocab_size=size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=48, max_position_embeddings=40, pad_token_id=pad_id,
                                     hidden_act="gelu_new", num_labels=num_labels, layer_norm_eps=1e-7)
    torch.manual_seed(0)
    model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(tmp_path / "hf")
    if not safe:  # the legacy format, as older checkpoints ship it
        torch.save(model.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
        (tmp_path / "hf" / "model.safetensors").unlink()
    return tmp_path / "hf"


def test_import_masked_lm_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf_dir = _hf_bert(tmp_path, "BertForMaskedLM")
    with pytest.warns(UserWarning, match="pooler"):  # BertForMaskedLM has no pooler
        import_hf(hf_dir, tmp_path / "ours")
    cfg, model, tok_path = load_pretrained(tmp_path / "ours")
    assert cfg.model.post_ln and cfg.model.activation == "gelu_tanh" and cfg.model.layer_norm_eps == 1e-7
    tokenizer = load_tokenizer(tok_path)
    ids, seg, mask = _batch(tokenizer, SENTENCES, segments=True)
    ref = _torch_outputs(transformers.BertForMaskedLM.from_pretrained(hf_dir).eval(), ids, seg, mask)
    ours = np.asarray(_forward(model, ids, seg, mask))
    assert np.abs(ours - ref.logits.numpy())[mask].max() <= 1e-4


def test_import_classifier_keeps_head_and_labels(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    hf_dir = _hf_bert(tmp_path, "BertForSequenceClassification", num_labels=3)
    assert import_main([str(hf_dir), "--out", str(tmp_path / "ours")]) == 0
    assert "classifier with 3 labels" in capsys.readouterr().out
    model, tokenizer, meta = load_source(tmp_path / "ours")
    assert isinstance(model, BertForClassification) and model.num_labels == 3
    assert meta["num_labels"] == 3 and meta["labels"] == ["LABEL_0", "LABEL_1", "LABEL_2"]
    ids, seg, mask = _batch(tokenizer, SENTENCES)
    ref = _torch_outputs(transformers.BertForSequenceClassification.from_pretrained(hf_dir).eval(), ids, seg, mask)
    assert np.abs(np.asarray(_forward(model, ids, seg, mask)) - ref.logits.numpy()).max() <= 1e-4
    # finetuning picks the head up when the task has as many labels (MNLI: 3), and refuses a mismatch
    from jaxbert import config
    from jaxbert.finetune.model_dir import prepare_start
    from jaxbert.data.glue import get_task

    run = config.load("base", ["data.seq_len=32", "data.max_predictions=5", "finetune.max_len=32"])
    start = prepare_start(run, str(tmp_path / "ours"), get_task("mnli"))
    assert _same_params(start.classifier, model)
    with pytest.raises(ValueError, match="head of 3 outputs"):
        prepare_start(run, str(tmp_path / "ours"), get_task("sst2"))
    # and exports back as sequence classification with its label names
    assert export_main([str(tmp_path / "ours"), str(tmp_path / "again")]) == 0
    exported = json.loads((tmp_path / "again" / "config.json").read_text())
    assert exported["architectures"] == ["BertForSequenceClassification"]
    assert exported["id2label"] == {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}


def test_import_pytorch_bin_equals_safetensors(tmp_path):
    pytest.importorskip("torch")
    safe = _hf_bert(tmp_path / "a", "BertModel")
    binary = _hf_bert(tmp_path / "b", "BertModel", safe=False)
    assert (binary / "pytorch_model.bin").is_file() and not (binary / "model.safetensors").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import_hf(safe, tmp_path / "from_safe")
        import_hf(binary, tmp_path / "from_bin")
    assert _same_params(load_pretrained(tmp_path / "from_safe")[1], load_pretrained(tmp_path / "from_bin")[1])


def test_import_bfloat16_safetensors(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.numpy import load_file
    from safetensors.torch import save_file

    source = _exported(tmp_path)
    state = load_file(source / "model.safetensors")
    save_file({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in state.items()}, source / "model.safetensors",
              metadata={"format": "pt"})
    import_hf(source, tmp_path / "out")
    model = load_pretrained(tmp_path / "out")[1]
    rounded = {k: torch.from_numpy(v).to(torch.bfloat16).float().numpy() for k, v in state.items()}
    np.testing.assert_array_equal(np.asarray(model.bert.embeddings.token),
                                  rounded["bert.embeddings.word_embeddings.weight"])


def test_import_sharded_safetensors(tmp_path):
    from safetensors.numpy import load_file, save_file

    source = _exported(tmp_path)
    state = load_file(source / "model.safetensors")
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, source / shard, metadata={"format": "pt"})
    index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (source / "model.safetensors.index.json").write_text(json.dumps(index))
    (source / "model.safetensors").unlink()
    import_hf(source, tmp_path / "out")
    back = load_pretrained(tmp_path / "out")[1]
    np.testing.assert_array_equal(np.asarray(back.bert.layers.qkv.weight[1, :, :32]),
                                  state["bert.encoder.layer.1.attention.self.query.weight"].T)


@pytest.mark.filterwarnings("ignore:weights. no")  # no pooler, no MLM head: both initialised
def test_token_classification_head_is_not_taken_for_a_sequence_classifier(tmp_path):
    hf_dir = _hf_bert(tmp_path, "BertForTokenClassification", num_labels=5)
    with pytest.warns(UserWarning, match="not used: classifier.bias, classifier.weight"):
        import_hf(hf_dir, tmp_path / "ours")
    assert isinstance(load_source(tmp_path / "ours")[0], BertForMLM)


# --- export, loaded back by transformers ------------------------------------------------------------------------


@pytest.mark.parametrize("post_ln,pad_id,activation", [(True, 0, "gelu"), (False, 0, "gelu"), (False, 3, "gelu"),
                                                        (True, 0, "gelu_tanh"), (False, 0, "gelu_tanh")],
                         ids=["post_ln", "pre_ln", "pre_ln_pad3", "post_ln_tanh", "pre_ln_tanh"])
def test_export_mlm_loads_in_transformers(tmp_path, post_ln, pad_id, activation):
    """MLM logits equal transformers' too with the default tanh GELU: a pre-LN model's MLM head uses exact GELU,
    as RobertaPreLayerNorm's does, and a post-LN model's follows hidden_act, as BERT's does."""
    transformers = pytest.importorskip("transformers")
    tokenizer = _tokenizer(tmp_path, pad_id)
    model = _model(tokenizer.vocab_size, post_ln, activation=activation)
    _save_jaxbert(tmp_path / "ours", model, tokenizer)
    assert export_main([str(tmp_path / "ours"), str(tmp_path / "hf")]) == 0
    expected = {"model.safetensors", "config.json", "tokenizer.json", "vocab.txt", "tokenizer_config.json",
                "special_tokens_map.json"}
    assert expected <= {p.name for p in (tmp_path / "hf").iterdir()}
    hf_model = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf_model).__name__ == ("BertForMaskedLM" if post_ln else "RobertaPreLayerNormForMaskedLM")
    ids, seg, mask = _batch(tokenizer, SENTENCES, segments=True)
    ref = _torch_outputs(hf_model, ids, seg, mask)
    assert np.abs(np.asarray(_forward(model, ids, seg, mask)) - ref.logits.numpy())[mask].max() <= 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    encoded = hf_tok(SENTENCES, SENTENCES[1:] + SENTENCES[:1], padding=True, return_tensors="np")
    np.testing.assert_array_equal(encoded["input_ids"], ids)
    np.testing.assert_array_equal(encoded["token_type_ids"], seg)


@pytest.mark.parametrize("post_ln", [True, False], ids=["post_ln", "pre_ln"])
def test_bias_free_model_exports_zero_biases_with_the_same_outputs(tmp_path, post_ln):
    transformers = pytest.importorskip("transformers")
    tokenizer = _tokenizer(tmp_path, pad_id=2)
    model = _model(tokenizer.vocab_size, post_ln, bias=False)
    assert model.bert.layers.qkv.bias is None and model.bert.layers.ffn_out.bias is None
    export_hf(model, tokenizer, tmp_path / "hf")
    hf_model = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    state = hf_model.state_dict()
    layer = f"{'bert' if post_ln else 'roberta_prelayernorm'}.encoder.layer.1."
    for name in ("attention.self.key.bias", "attention.output.dense.bias", "intermediate.dense.bias",
                 "output.dense.bias"):
        assert not state[layer + name].any()
    ids, seg, mask = _batch(tokenizer, SENTENCES, segments=True)
    ref = _torch_outputs(hf_model, ids, seg, mask)
    assert np.abs(np.asarray(_forward(model, ids, seg, mask)) - ref.logits.numpy())[mask].max() <= 1e-4
    hidden = np.asarray(eqx.filter_jit(lambda m: m.bert(ids, seg, mask))(model))
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        encoder = getattr(hf_model, "bert" if post_ln else "roberta_prelayernorm")
        ref_hidden = encoder(input_ids=torch.tensor(ids), token_type_ids=torch.tensor(seg),
                             attention_mask=torch.tensor(mask.astype(np.int64))).last_hidden_state.numpy()
    assert np.abs(hidden - ref_hidden)[mask].max() <= 1e-4
    # imported back, it is a model with (zero) biases: model.bias stays true and the outputs are the same
    cfg, back = hf_state_to_model(model_to_hf_state(model, pad_id=2), hf_config_from_model(model.config, pad_id=2))
    assert cfg.bias and not np.asarray(back.bert.layers.qkv.bias).any()
    np.testing.assert_allclose(np.asarray(_forward(back, ids, seg, mask)), np.asarray(_forward(model, ids, seg, mask)),
                               rtol=1e-5, atol=1e-5)


def test_glu_model_export_is_refused_in_one_line(tmp_path):
    tokenizer = _tokenizer(tmp_path)
    model = _model(tokenizer.vocab_size, False, ffn_type="glu")
    for export in (lambda: export_hf(model, tokenizer, tmp_path / "hf"), lambda: model_to_hf_state(model)):
        with pytest.raises(ValueError, match="model.ffn_type=glu") as info:
            export()
        assert "\n" not in str(info.value)
    assert not (tmp_path / "hf").exists()


def test_mean_pooled_classifier_export_is_refused_and_its_encoder_is_not(tmp_path):
    tokenizer = _tokenizer(tmp_path)
    classifier = _model(tokenizer.vocab_size, False, num_labels=3, pooling="mean")
    for export in (lambda: export_hf(classifier, tokenizer, tmp_path / "hf"), lambda: model_to_hf_state(classifier)):
        with pytest.raises(ValueError, match="model.pooling=mean: HF sequence classification pools") as info:
            export()
        assert "\n" not in str(info.value)
    assert not (tmp_path / "hf").exists()
    mlm = _model(tokenizer.vocab_size, False, pooling="mean")  # an MLM model's pooler is not part of a classifier
    assert export_hf(mlm, tokenizer, tmp_path / "mlm").joinpath("model.safetensors").is_file()


@pytest.mark.parametrize("post_ln", [True, False], ids=["post_ln", "pre_ln"])
def test_export_classifier_loads_in_transformers(tmp_path, post_ln):
    transformers = pytest.importorskip("transformers")
    tokenizer = _tokenizer(tmp_path)
    model = _model(tokenizer.vocab_size, post_ln, num_labels=3)
    export_hf(model, tokenizer, tmp_path / "hf")
    hf_model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert hf_model.config.num_labels == 3
    ids, seg, mask = _batch(tokenizer, SENTENCES)
    ref = _torch_outputs(hf_model, ids, seg, mask)
    assert np.abs(np.asarray(_forward(model, ids, seg, mask)) - ref.logits.numpy()).max() <= 1e-4


@pytest.mark.parametrize("post_ln", [True, False], ids=["post_ln", "pre_ln"])
@pytest.mark.parametrize("num_labels", [None, 2], ids=["mlm", "classifier"])
def test_jaxbert_hf_jaxbert_round_trip_is_bitwise(tmp_path, post_ln, num_labels):
    tokenizer = _tokenizer(tmp_path, pad_id=2)
    model = _model(tokenizer.vocab_size, post_ln, num_labels)
    export_hf(model, tokenizer, tmp_path / "hf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a classifier import re-initialises the MLM head
        import_hf(tmp_path / "hf", tmp_path / "back")
    back, back_tok, _ = load_source(tmp_path / "back")
    assert back.config == model.config
    assert _same_params(model, back)
    assert back_tok.vocab() == tokenizer.vocab()


# --- the packaged all-MiniLM-L6-v2 (a real BertModel checkpoint) --------------------------------------------------


def _sst2(shared_data: Path, n: int) -> list[str]:
    lines = (shared_data / "glue" / "SST-2" / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:]
    return [line.split("\t")[0] for line in lines[:n]]


def test_minilm_hidden_states_match_transformers(tmp_path, minilm_dir, shared_data):
    transformers = pytest.importorskip("transformers")
    with pytest.warns(UserWarning, match="MLM head"):
        import_hf(minilm_dir, tmp_path / "minilm")
    cfg, model, tok_path = load_pretrained(tmp_path / "minilm")
    assert (cfg.model.layers, cfg.model.hidden, cfg.model.heads) == (6, 384, 12)
    tokenizer = load_tokenizer(tok_path)
    ids, seg, mask = _batch(tokenizer, _sst2(shared_data, 16))
    ref = _torch_outputs(transformers.BertModel.from_pretrained(minilm_dir).eval(), ids, seg, mask)
    ours = np.asarray(model.bert(ids, seg, mask))
    assert np.abs(ours - ref.last_hidden_state.numpy())[mask].max() <= 1e-4
    np.testing.assert_allclose(np.asarray(model.bert.pool(model.bert(ids, seg, mask))),
                               ref.pooler_output.numpy(), atol=1e-4)


def test_minilm_vocab_txt_tokenizer_matches_transformers(minilm_dir, shared_data):
    transformers = pytest.importorskip("transformers")
    ours = load_tokenizer(minilm_dir / "vocab.txt")
    theirs = transformers.BertTokenizerFast.from_pretrained(minilm_dir)
    sentences = _sst2(shared_data, 300)
    expected = theirs(sentences)["input_ids"]
    agree = sum(ours.encode_pair(s).input_ids == e for s, e in zip(sentences, expected))
    assert agree == len(sentences)


# --- bad input: one clear error each, nothing half-written --------------------------------------------------------


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp" in p.name]


def _exported(tmp_path: Path) -> Path:
    tokenizer = _tokenizer(tmp_path)
    return export_hf(_model(tokenizer.vocab_size, True), tokenizer, tmp_path / "src")


@pytest.mark.parametrize("remove,message", [("config.json", "no config.json"),
                                            ("model.safetensors", "no weights"),
                                            ("vocab.txt+tokenizer.json", "no tokenizer")])
def test_import_missing_file(tmp_path, remove, message):
    source = _exported(tmp_path)
    for name in remove.split("+"):
        (source / name).unlink()
    with pytest.raises(FileNotFoundError, match=message):
        import_hf(source, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path)


def test_import_rejects_other_model_types(tmp_path):
    source = _exported(tmp_path)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="config.json: model_type 'gpt2' is not BERT"):
        import_hf(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_import_shape_mismatch_names_tensor(tmp_path):
    from safetensors.numpy import load_file, save_file

    source = _exported(tmp_path)
    state = load_file(source / "model.safetensors")
    name = "bert.encoder.layer.1.intermediate.dense.weight"
    state[name] = state[name][:-1]
    save_file(state, source / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"tensor '{name}' has shape \\(63, 32\\), expected \\(64, 32\\)"):
        import_hf(source, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path)


def test_import_missing_tensor_names_it(tmp_path):
    from safetensors.numpy import load_file, save_file

    source = _exported(tmp_path)
    state = load_file(source / "model.safetensors")
    del state["bert.encoder.layer.0.attention.self.key.bias"]
    save_file(state, source / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing tensor 'bert.encoder.layer.0.attention.self.key.bias'"):
        import_hf(source, tmp_path / "out")


def test_import_vocab_size_mismatch(tmp_path):
    source = _exported(tmp_path)
    (source / "tokenizer.json").unlink()
    with open(source / "vocab.txt", "a") as handle:
        handle.write("extra\n")
    with pytest.raises(ValueError, match="vocab.txt: .* tokens, but the word embedding matrix has"):
        import_hf(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_targets_that_exist_and_are_not_empty_are_refused(tmp_path):
    source = _exported(tmp_path)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists and is not empty"):
        import_hf(source, busy)
    tokenizer = _tokenizer(tmp_path)
    with pytest.raises(ValueError, match="already exists and is not empty"):
        export_hf(_model(tokenizer.vocab_size, True), tokenizer, busy)
    with pytest.raises(ValueError, match="tokens, but the model's word embedding has"):
        export_hf(_model(tokenizer.vocab_size + 1, True), tokenizer, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
    assert [p.name for p in busy.iterdir()] == ["keep.txt"] and not _leftovers(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    export_hf(_model(tokenizer.vocab_size, True), tokenizer, empty)  # an empty directory is fine
    assert (empty / "config.json").is_file()


def test_export_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    from jaxbert import cli

    assert cli.main(["export", str(tmp_path / "missing"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not exist" in err
