"""Finetuning: padding invariance, loss weights, optimizer mask, inits and their errors, a real SST-2 smoke run,
the sweep, and the ``jaxbert glue`` submission zip."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxbert import config
from jaxbert.finetune.model_dir import build_classifier, load_classifier, prepare_start, save_classifier
from jaxbert.cli import main as cli_main
from jaxbert.data import glue
from jaxbert.data.pairs import encode_split, make_batch
from jaxbert.data.task_data import TaskData
from jaxbert.finetune.trainer import _device_batch, batch_loss, predict, run
from jaxbert.optim import AdamWSettings, decay_mask
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
    cfg, _, model = rte_model
    mask = decay_mask(model, AdamWSettings.of(cfg.finetune).no_decay)
    assert mask.classifier.weight and not mask.classifier.bias
    assert mask.bert.embeddings.token and not mask.bert.embeddings.norm.scale
    assert mask.bert.layers.qkv.weight and not mask.bert.layers.qkv.bias and not mask.bert.layers.attn_norm.scale
    assert mask.bert.pooler.weight  # finetuning trains the pooler; pretraining leaves it alone (not decayed)
    assert not decay_mask(model, AdamWSettings.of(cfg.train).no_decay).bert.pooler.weight


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
    rng = np.random.default_rng(8)
    enc = encode_split(glue.SplitData("rte", "train", "mem", sentences(rng, 8), sentences(rng, 8),
                                      rng.integers(0, 2, 8).astype(np.int32), [str(i) for i in range(8)]),
                       start.tokenizer, 32)
    for seed in (0, 1):  # as a sweep does: the start's encoder survives the donated training state of a run
        run_cfg = config.replace(start.cfg, finetune={"epochs": 1, "batch_size": 4, "seed": seed})
        run(run_cfg, start, TaskData(glue.TASKS["rte"], enc, {"dev": enc}), progress=False, save=False,
            echo=lambda _: None)
    np.testing.assert_array_equal(start.encoder.embeddings.token, mlm.bert.embeddings.token)
    save_model(tmp_path / "bad", saved_cfg, mlm, load_tokenizer(write_vocab(tmp_path / "big.txt", WORDS + ["x", "y"])))
    with pytest.raises(ValueError, match="embedding of 45 tokens but its tokenizer .* has 47: they do not belong"):
        prepare_start(no_tokenizer, str(tmp_path / "bad"), glue.TASKS["rte"])


# ------------------------------------------------------------------------------------------------ real data


@pytest.mark.parametrize("layer_decay, pooling", [("1.0", "cls"), ("0.8", "cls"), ("1.0", "mean")])
def test_sst2_smoke_run_beats_majority_class(shared_data, tmp_path, layer_decay, pooling):
    """A 1-layer model (whole-word vocabulary of its training rows) on 1500 real SST-2 rows, scored on 400 other
    training rows (same distribution, never trained on), must beat always predicting the majority class; with
    layer-wise lr decay too (the optimizer state gains a stage), and with mean pooling (kept by the saved model)."""
    data = glue.read_split("sst2", "train", shared_data / "glue")
    rows = np.random.default_rng(0).permutation(len(data))
    train, held_out = data.take(rows[:1500]), data.take(rows[1500:1900])
    words = {w for t in train.text_a for w in re.findall(r"\w+|[^\w\s]", t.lower())}
    cfg = tiny(tmp_path, write_vocab(tmp_path / "v.txt", words), "finetune.task=sst2", "finetune.lr=3e-3",
               "finetune.epochs=3", "finetune.dropout=0.0", "finetune.attention_dropout=0.0", "finetune.run_name=smoke",
               f"finetune.layer_decay={layer_decay}", f"finetune.pooling={pooling}")
    start = prepare_start(cfg, None, glue.TASKS["sst2"])
    encode = lambda d: encode_split(d, start.tokenizer, 32)  # noqa: E731
    result = run(start.cfg, start, TaskData(glue.TASKS["sst2"], encode(train), {"dev": encode(held_out)}),
                 progress=False, echo=lambda _: None)
    majority = max(held_out.labels.mean(), 1 - held_out.labels.mean())
    assert result.dev["dev"]["accuracy"] > majority + 0.05
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["split"] == "eval"] == [1, 2, 3]
    assert (result.run_dir / "best" / "finetuned.json").is_file()
    saved_cfg, saved, _, _ = load_classifier(result.run_dir / "best")
    assert saved_cfg.model.pooling == saved.config.pooling == pooling


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
    code = cli_main([*args, "--jobs", "2"])  # two worker processes
    captured = capsys.readouterr()
    assert code == 1, captured.err  # a requested task failed: the others ran, the exit status says so
    out = captured.out
    assert "glue: 3 task(s), 2 at a time" in out
    assert "skipped qqp: no directory" in out and "GLUE average over 2 task(s) (stsb, mnli)" in out
    assert "failed rte: " in out and "unknown label 'maybe'" in out
    assert not (tmp_path / "runs" / "g" / "rte").exists()  # no half-written run folder
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
    assert cli_main([*args, "--resume", "--jobs", "1"]) == 1  # finished tasks are reused, AX predicted again
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


# ------------------------------------------------------------------------------------------- training core


def _reference_step(model, opt_state, batch, lr, optimizer):
    """The finetuning update as it was before the shared core: plain optax AdamW (betas 0.9/0.999, eps 1e-6, no
    decay on biases and LayerNorm scales), global-norm clipping 1.0, no dropout."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    loss, grads = jax.value_and_grad(lambda p: batch_loss(eqx.combine(p, static), batch, None, Policy(), "xla"))(params)
    opt_state[1].hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return eqx.combine(optax.apply_updates(params, updates), static), opt_state, loss


def test_shared_fused_step_equals_the_old_finetuning_update(rte_model):
    """Six steps of the training core (fused_step with the finetuning objective) give the losses and parameters
    of the old finetuning step on the same batches."""
    from jaxbert.finetune.trainer import ClassificationLoss
    from jaxbert.precision import LossScale
    from jaxbert.train import fused_step, new_state

    cfg, start, model = rte_model
    rng = np.random.default_rng(5)
    data = glue.SplitData("rte", "train", "mem", sentences(rng, 40), sentences(rng, 40),
                          rng.integers(0, 2, 40).astype(np.int32), [str(i) for i in range(40)])
    enc = encode_split(data, start.tokenizer, 32)
    batches = [_device_batch(make_batch(enc, np.arange(i % 2 * 8, i % 2 * 8 + 8), 8, 32)) for i in (0, 0, 0, 0, 0, 1)]
    lrs = [3e-3, 1e-2, 1e-2, 1e-2, 1e-2, 3e-3]
    settings = AdamWSettings.of(cfg.finetune)
    assert (settings.b1, settings.b2, settings.eps, settings.clip_norm) == (0.9, 0.999, 1e-6, 1.0)
    def mask(params):
        return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].name not in ("bias", "scale"), params)

    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.inject_hyperparams(optax.adamw, static_args="mask")(
        learning_rate=0.0, b1=0.9, b2=0.999, eps=1e-6, weight_decay=cfg.finetune.weight_decay, mask=mask))
    ref_model, ref_opt, ref_losses = model, optimizer.init(eqx.filter(model, eqx.is_inexact_array)), []
    for batch, lr in zip(batches, lrs):
        ref_model, ref_opt, loss = _reference_step(ref_model, ref_opt, batch, lr, optimizer)
        ref_losses.append(float(loss))
    state = new_state(_copy_model(model), settings, LossScale.create(dynamic=False), jax.random.PRNGKey(1))
    losses = []
    for batch, lr in zip(batches, lrs):
        state, metrics = fused_step(state, batch, np.float32(lr), ClassificationLoss(Policy(), "xla"), settings)
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert losses[4] < losses[0] - 0.01  # the same batch, five times: the loss falls
    for new, old in zip(jax.tree.leaves(state.model), jax.tree.leaves(ref_model)):
        np.testing.assert_allclose(new, old, rtol=1e-4, atol=1e-6)
    assert int(state.step) == 6 and int(state.skipped) == 0


def _copy_model(model):
    return jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, model)


def test_non_finite_steps_are_skipped_and_a_run_of_them_stops_finetuning(rte_model, tmp_path):
    """A NaN label makes the loss non-finite: the step is skipped (parameters kept bitwise); a run of such steps
    stops finetuning with a clear error."""
    from jaxbert.finetune.trainer import ClassificationLoss
    from jaxbert.precision import LossScale
    from jaxbert.train import TrainingDiverged, fused_step, new_state

    cfg, start, model = rte_model
    regression = build_classifier(start, glue.TASKS["stsb"], jax.random.PRNGKey(2))
    rng = np.random.default_rng(6)
    data = glue.SplitData("stsb", "train", "mem", sentences(rng, 8), sentences(rng, 8),
                          np.array([1.0, np.nan] + [2.0] * 6, np.float32), [str(i) for i in range(8)])
    enc = encode_split(data, start.tokenizer, 32)
    settings = AdamWSettings.of(cfg.finetune)
    state = new_state(_copy_model(regression), settings, LossScale.create(dynamic=False), jax.random.PRNGKey(1))
    before = [np.asarray(x) for x in jax.tree.leaves(state.model)]
    state, metrics = fused_step(state, _device_batch(make_batch(enc, np.arange(8), 8, 32)), np.float32(1e-3),
                                ClassificationLoss(Policy(), "xla"), settings)
    assert int(metrics["skipped"]) == 1 and int(state.consecutive_skipped) == 1
    for new, old in zip(jax.tree.leaves(state.model), before):
        np.testing.assert_array_equal(new, old)
    task_data = TaskData(glue.TASKS["stsb"], enc, {"dev": enc})
    bad = config.replace(cfg, train={"max_skipped_steps": 1}, finetune={"task": "stsb", "batch_size": 8})
    with pytest.raises(TrainingDiverged, match="stsb: 1 consecutive steps had a non-finite loss"):
        run(bad, start, task_data, progress=False, save=False, echo=lambda _: None)


def test_finetuning_compiles_in_the_first_epoch_only(rte_model, tmp_path):
    """Epochs 2 and 3 compile nothing: one training step per padded length class, one evaluation step."""
    from jax._src import dispatch  # the event name only; the listener API is public (jax.monitoring)

    cfg, start, _ = rte_model
    rng = np.random.default_rng(7)
    data = glue.SplitData("rte", "train", "mem", sentences(rng, 96, 1, 30), sentences(rng, 96, 1, 30),
                          rng.integers(0, 2, 96).astype(np.int32), [str(i) for i in range(96)])
    enc = encode_split(data, start.tokenizer, 64)
    assert enc.lengths.min() <= 32 < enc.lengths.max()  # two length classes with impl.pad_multiple=32
    compiles: list[float] = []

    def listen(event: str, duration: float, **_: object) -> None:
        if event == dispatch.BACKEND_COMPILE_EVENT:
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listen)
    epochs: list[int] = []
    try:
        run_cfg = config.replace(cfg, finetune={"epochs": 3, "batch_size": 8, "max_len": 64, "run_name": "compiles"},
                                 model={"max_positions": 64})

        def echo(line: str) -> None:
            epochs.append(len(compiles))

        from jaxbert.finetune import trainer as ft

        original = ft.dev_metrics

        def counting_evaluate(*args, **kwargs):
            out = original(*args, **kwargs)
            epochs.append(len(compiles))
            return out

        ft.dev_metrics = counting_evaluate
        try:
            ft.run(run_cfg, start, TaskData(glue.TASKS["rte"], enc, {"dev": enc}), progress=False, echo=echo)
        finally:
            ft.dev_metrics = original
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    after_epoch = epochs[1:4]  # compile counts after each epoch's evaluation (epochs[0]: the start message)
    assert after_epoch[0] > 0 and after_epoch[0] == after_epoch[1] == after_epoch[2], epochs


def test_fresh_run_dir_clears_an_interrupted_run_and_refuses_anything_else(tmp_path):
    from jaxbert.finetune.trainer import fresh_run_dir

    said: list[str] = []
    interrupted = tmp_path / "interrupted"
    (interrupted / "best").mkdir(parents=True)
    (interrupted / "metrics.jsonl").write_text('{"step": 1}\n')
    fresh_run_dir(interrupted, said.append)
    assert list(interrupted.iterdir()) == [] and "clearing what an interrupted run left" in said[0]
    (tmp_path / "finished").mkdir()
    (tmp_path / "finished" / "results.json").write_text("{}")
    with pytest.raises(ValueError, match="holds a finished finetune run"):
        fresh_run_dir(tmp_path / "finished", said.append)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.tsv").write_text("x")
    with pytest.raises(ValueError, match=r"holds files a finetune run does not write \(train.tsv\)"):
        fresh_run_dir(tmp_path / "data", said.append)
    assert (tmp_path / "data" / "train.tsv").read_text() == "x" and (tmp_path / "finished" / "results.json").exists()
