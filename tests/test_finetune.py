"""Finetuning: padding invariance, loss weights, optimizer mask, inits and their errors, a real SST-2 smoke run,
the sweep, and the ``jaxbert glue`` submission zip."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import pytest

from jaxbert import config
from jaxbert.classifier import build_classifier, load_classifier, prepare_start, save_classifier
from jaxbert.cli import main as cli_main
from jaxbert.data import glue
from jaxbert.data.pairs import encode_split, make_batch
from jaxbert.data.task_data import TaskData
from jaxbert.finetune import _decay_mask, _device_batch, batch_loss, predict, run
from jaxbert.precision import Policy
from jaxbert.tokenizer import load_tokenizer

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [f"w{i}" for i in range(40)]


def write_vocab(path: Path, words) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(SPECIALS + sorted(set(words))) + "\n")
    return path


def tiny(tmp_path: Path, vocab: Path, *extra: str):
    return config.load("tiny", ["model.hidden=32", "model.heads=2", "model.ffn=64", "model.layers=1",
                                "model.max_positions=64", "data.seq_len=64", "finetune.max_len=32",
                                f"tokenizer.path={vocab}", f"finetune.out_dir={tmp_path / 'runs'}",
                                "impl.pad_multiple=32", *extra])


def sentences(rng, n, low=1, high=12):
    return [" ".join(rng.choice(WORDS, rng.integers(low, high))) for _ in range(n)]


# ----------------------------------------------------------------------------------------------- numerics


@pytest.fixture(scope="module")
def rte_model(tmp_path_factory):
    """(config, start, model): a random 1-layer RTE classifier without dropout, built once for this module."""
    tmp_path = tmp_path_factory.mktemp("rte")
    cfg = tiny(tmp_path, write_vocab(tmp_path / "v.txt", WORDS), "finetune.task=rte", "finetune.dropout=0.0",
               "finetune.attention_dropout=0.0")
    start = prepare_start(cfg, "random", glue.TASKS["rte"])
    return start.cfg, start, build_classifier(start, glue.TASKS["rte"], jax.random.PRNGKey(0))


def test_padding_does_not_change_predictions(rte_model):
    _, start, model = rte_model
    data = glue.SplitData("rte", "dev", "mem", ["w1 w2 w3", "w4"], ["w5 w6 w7 w8 w9 w10 w11 w12", "w13"],
                          np.zeros(2, np.int32), ["0", "1"])
    enc = encode_split(data, start.tokenizer, 32)
    assert enc.lengths.tolist() == [14, 5]
    alone = predict(model, enc, batch_size=1, pad_multiple=1, policy=Policy(), attention="xla")  # no padding
    batched = predict(model, enc, batch_size=4, pad_multiple=32, policy=Policy(), attention="xla")  # padded to 32
    np.testing.assert_allclose(alone, batched, atol=1e-5)


def test_filler_rows_do_not_change_the_loss(rte_model):
    _, start, model = rte_model
    rng = np.random.default_rng(1)
    data = glue.SplitData("rte", "train", "mem", sentences(rng, 3), sentences(rng, 3), np.array([0, 1, 1], np.int32),
                          ["0", "1", "2"])
    enc = encode_split(data, start.tokenizer, 32)
    loss = eqx.filter_jit(lambda m, b: batch_loss(m, b, None, Policy(), "xla"))
    exact, padded = make_batch(enc, np.arange(3), 3, 32), make_batch(enc, np.arange(3), 8, 32)
    expected = float(loss(model, _device_batch(exact)))
    assert float(loss(model, _device_batch(padded))) == pytest.approx(expected, rel=1e-6)


def test_weight_decay_mask_skips_biases_and_layernorm(rte_model):
    mask = _decay_mask(rte_model[2])
    assert mask.classifier.weight and not mask.classifier.bias
    assert mask.bert.embeddings.token and not mask.bert.embeddings.norm.scale
    assert mask.bert.layers.qkv.weight and not mask.bert.layers.qkv.bias and not mask.bert.layers.attn_norm.scale


# ----------------------------------------------------------------------------------------- inits and errors


def test_saved_classifier_round_trip_and_bad_inits(rte_model, tmp_path):
    cfg, start, model = rte_model
    saved = save_classifier(tmp_path / "rte_model", cfg, model, start.tokenizer, {"task": "rte"})
    _, loaded, tokenizer, meta = load_classifier(saved)
    assert meta["num_labels"] == 2 and tokenizer.vocab_hash() == start.tokenizer.vocab_hash()
    enc = encode_split(glue.SplitData("rte", "dev", "m", ["w1 w2"], ["w3"], None, ["0"]), tokenizer, 32)
    np.testing.assert_array_equal(predict(model, enc, 4, 32, Policy(), "xla"),
                                  predict(loaded, enc, 4, 32, Policy(), "xla"))
    assert prepare_start(cfg, str(saved), glue.TASKS["rte"]).classifier is not None
    with pytest.raises(ValueError, match=r"head of 2 outputs \(finetuned on rte\), task mnli needs 3"):
        prepare_start(cfg, str(saved), glue.TASKS["mnli"])
    other = write_vocab(tmp_path / "other.txt", WORDS + ["extra"])
    with pytest.raises(ValueError, match="different vocabulary"):
        prepare_start(config.replace(cfg, tokenizer={"path": str(other)}), str(saved), glue.TASKS["rte"])
    with pytest.raises(ValueError, match="needs a tokenizer"):
        prepare_start(config.replace(cfg, tokenizer={"path": None}), "random", glue.TASKS["rte"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_start(cfg, str(tmp_path / "nowhere"), glue.TASKS["rte"])


def test_pretrained_checkpoint_init_and_vocab_mismatch(tmp_path):
    from jaxbert.checkpoint import save_model
    from jaxbert.model import BertForMLM

    vocab = write_vocab(tmp_path / "v.txt", WORDS)
    tokenizer = load_tokenizer(vocab)
    cfg = tiny(tmp_path, vocab)
    saved_cfg = config.replace(cfg, model={"vocab_size": tokenizer.vocab_size})
    mlm = eqx.filter_jit(lambda k: BertForMLM(saved_cfg.model, key=k))(jax.random.PRNGKey(0))
    save_model(tmp_path / "good", saved_cfg, mlm, tokenizer)
    no_tokenizer = config.replace(cfg, tokenizer={"path": None})  # the checkpoint's own tokenizer is used
    start = prepare_start(no_tokenizer, str(tmp_path / "good"), glue.TASKS["rte"])
    assert start.encoder is not None and start.cfg.model.dropout == cfg.finetune.dropout
    np.testing.assert_array_equal(start.encoder.embeddings.token, mlm.bert.embeddings.token)
    save_model(tmp_path / "bad", saved_cfg, mlm, load_tokenizer(write_vocab(tmp_path / "big.txt", WORDS + ["x", "y"])))
    with pytest.raises(ValueError, match="embedding of 45 tokens but its tokenizer .* has 47: they do not belong"):
        prepare_start(no_tokenizer, str(tmp_path / "bad"), glue.TASKS["rte"])


# ------------------------------------------------------------------------------------------------ real data


def test_sst2_smoke_run_beats_majority_class(shared_data, tmp_path):
    """A 1-layer model (whole-word vocabulary of its training rows) on 1500 real SST-2 rows, scored on 400 other
    training rows (same distribution, never trained on), must beat always predicting the majority class."""
    data = glue.read_split("sst2", "train", shared_data / "glue")
    rows = np.random.default_rng(0).permutation(len(data))
    train, held_out = data.take(rows[:1500]), data.take(rows[1500:1900])
    words = {w for t in train.text_a for w in re.findall(r"\w+|[^\w\s]", t.lower())}
    cfg = tiny(tmp_path, write_vocab(tmp_path / "v.txt", words), "finetune.task=sst2", "finetune.lr=3e-3",
               "finetune.epochs=3", "finetune.dropout=0.0", "finetune.attention_dropout=0.0", "finetune.run_name=smoke")
    start = prepare_start(cfg, None, glue.TASKS["sst2"])
    encode = lambda d: encode_split(d, start.tokenizer, 32)  # noqa: E731
    result = run(start.cfg, start, TaskData(glue.TASKS["sst2"], encode(train), {"dev": encode(held_out)}),
                 progress=False, echo=lambda _: None)
    majority = max(held_out.labels.mean(), 1 - held_out.labels.mean())
    assert result.dev["dev"]["accuracy"] > majority + 0.05
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["split"] == "eval"] == [1, 2, 3]
    assert (result.run_dir / "best" / "finetuned.json").is_file()


# ------------------------------------------------------------------------------------------------ CLI


def write_fixture_glue(root: Path, rng) -> None:
    """A small GLUE directory: RTE, STS-B, MNLI (official layout, test_matched/mismatched) and AX."""
    def tsv(path, header, rows):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\t".join(header) + "\n" + "".join("\t".join(map(str, r)) + "\n" for r in rows))

    def pairs(n, labels=None):
        return [(i, *sentences(rng, 2), *([rng.choice(labels)] if labels else [])) for i in range(n)]

    for split, n in (("train", 24), ("dev", 8)):
        tsv(root / "RTE" / f"{split}.tsv", ["index", "sentence1", "sentence2", "label"],
            pairs(n, ["entailment", "not_entailment"]))
        tsv(root / "STS-B" / f"{split}.tsv", ["index", "sentence1", "sentence2", "score"],
            [(i, a, b, f"{rng.uniform(0, 5):.3f}") for i, a, b in pairs(n)])
        mnli = "train" if split == "train" else "dev_matched"
        tsv(root / "MNLI" / f"{mnli}.tsv", ["index", "sentence1", "sentence2", "gold_label"],
            pairs(n, ["entailment", "neutral", "contradiction"]))
    tsv(root / "MNLI" / "dev_mismatched.tsv", ["index", "sentence1", "sentence2", "gold_label"],
        pairs(6, ["entailment", "neutral", "contradiction"]))
    tsv(root / "RTE" / "test.tsv", ["index", "sentence1", "sentence2"], pairs(5))
    tsv(root / "STS-B" / "test.tsv", ["index", "sentence1", "sentence2"], pairs(4))
    tsv(root / "MNLI" / "test_matched.tsv", ["index", "sentence1", "sentence2"], pairs(3))
    tsv(root / "MNLI" / "test_mismatched.tsv", ["index", "sentence1", "sentence2"], pairs(3))
    tsv(root / "diagnostic" / "diagnostic.tsv", ["index", "sentence1", "sentence2"], pairs(7))


def test_glue_cli_writes_submission_zip(tmp_path, capsys):
    write_fixture_glue(tmp_path / "glue", np.random.default_rng(3))
    with open(tmp_path / "glue" / "RTE" / "train.tsv", "a") as handle:
        handle.write("99\tw1\tw2\tmaybe\n")  # bad data in one task must not stop the others
    vocab = write_vocab(tmp_path / "v.txt", WORDS)
    args = ["glue", "--tasks", "stsb,qqp,mnli,rte", "--glue-dir", str(tmp_path / "glue"), "--config", "tiny",
            "--no-progress", "model.hidden=32", "model.heads=2", "model.ffn=64", "model.layers=1",
            "model.max_positions=64", "data.seq_len=64", "finetune.max_len=32", f"tokenizer.path={vocab}",
            "finetune.epochs=1", "finetune.batch_size=8", "finetune.dropout=0.0", "finetune.attention_dropout=0.0",
            f"finetune.out_dir={tmp_path / 'runs'}", "finetune.run_name=g", "mnli:finetune.epochs=2"]
    code = cli_main(args)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    out = captured.out
    assert "skipped qqp: no directory" in out and "GLUE average over 2 task(s) (stsb, mnli)" in out
    assert "skipped rte: failed: " in out and "unknown label 'maybe'" in out
    assert "no predictions for CoLA, SST-2, MRPC, QQP, QNLI, RTE, WNLI" in out
    with zipfile.ZipFile(tmp_path / "runs" / "g" / "submission.zip") as archive:
        assert sorted(archive.namelist()) == ["AX.tsv", "MNLI-m.tsv", "MNLI-mm.tsv", "STS-B.tsv"]
        files = {n: archive.read(n).decode().splitlines() for n in archive.namelist()}
    assert all(lines[0] == "index\tprediction" for lines in files.values())
    assert [len(files[n]) - 1 for n in ("AX.tsv", "MNLI-m.tsv", "MNLI-mm.tsv", "STS-B.tsv")] == [7, 3, 3, 4]
    for name in ("AX.tsv", "MNLI-m.tsv"):
        assert {line.split("\t")[1] for line in files[name][1:]} <= {"entailment", "neutral", "contradiction"}
    assert all(0.0 <= float(line.split("\t")[1]) <= 5.0 for line in files["STS-B.tsv"][1:])
    assert [line.split("\t")[0] for line in files["AX.tsv"][1:]] == [str(i) for i in range(7)]
    mnli = json.loads((tmp_path / "runs" / "g" / "mnli" / "results.json").read_text())
    assert len(mnli["history"]) == 2 and set(mnli["dev"]) == {"dev_matched", "dev_mismatched"}  # per-task override
    assert cli_main([*args, "--resume"]) == 0  # finished tasks are reused, AX predicted again from the saved model
    again = capsys.readouterr().out
    assert "mnli: reusing the finished run" in again and "stsb: reusing the finished run" in again
    average = [line for line in out.splitlines() if line.startswith("GLUE average")]
    assert average and average == [line for line in again.splitlines() if line.startswith("GLUE average")]
    with zipfile.ZipFile(tmp_path / "runs" / "g" / "submission.zip") as archive:
        assert archive.read("AX.tsv").decode().splitlines() == files["AX.tsv"]


def test_finetune_sweep_and_errors(tmp_path, capsys):
    write_fixture_glue(tmp_path / "glue", np.random.default_rng(4))
    vocab = write_vocab(tmp_path / "v.txt", WORDS)
    base = ["--glue-dir", str(tmp_path / "glue"), "--config", "tiny", "--no-progress", "model.hidden=32",
            "model.heads=2", "model.ffn=64", "model.layers=1", "model.max_positions=64", "data.seq_len=64",
            "finetune.max_len=32", f"tokenizer.path={vocab}", f"finetune.out_dir={tmp_path / 'runs'}"]
    code = cli_main(["finetune", "--task", "rte", "--sweep", "--batch-sizes", "8", "--lrs", "1e-3,1e-4", "--seeds",
                     "2", *base, "finetune.epochs=1", "finetune.run_name=sw"])
    assert code == 0
    summary = json.loads((tmp_path / "runs" / "sw" / "summary.json").read_text())
    assert sorted((r["batch_size"], r["lr"], len(r["scores"])) for r in summary["grid"]) == [(8, 1e-4, 2), (8, 1e-3, 2)]
    for row in summary["grid"]:
        assert row["median"] == pytest.approx(float(np.median(row["scores"]))) and row["best"] == max(row["scores"])
    assert (tmp_path / "runs" / "sw" / "best" / "finetuned.json").is_file()
    capsys.readouterr()
    assert cli_main(["finetune", "--task", "qnli", *base]) == 1
    assert "task qnli: no directory" in capsys.readouterr().err
    assert cli_main(["finetune", "--task", "ax", *base]) == 1
    assert "predicted by the mnli model" in capsys.readouterr().err
    assert cli_main(["finetune", "--task", "rte", "--sweep", "--lrs", "fast", *base]) == 1
    assert "--lrs 'fast': expected comma-separated numbers" in capsys.readouterr().err
