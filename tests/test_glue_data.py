"""GLUE registry, readers (every layout), pair encoding and length-bucketed batching."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from jaxbert.data import glue
from jaxbert.data.glue import Columns, read_split
from jaxbert.data.pairs import (encode_split, eval_batches, make_batch, padded_length, train_batches,
                                truncated_lengths)
from jaxbert.tokenizer import load_tokenizer


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def word_tokenizer(tmp_path: Path, texts):
    """A whole-word WordPiece vocabulary built from ``texts`` (unknown words -> [UNK])."""
    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower())})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    return load_tokenizer(write(tmp_path / "vocab" / "vocab.txt", "\n".join(vocab) + "\n"))


# ------------------------------------------------------------------------------------------------ registry


def test_registry_labels_in_glue_order_and_submission_names():
    t = glue.TASKS
    assert t["mnli"].labels == ("entailment", "neutral", "contradiction")
    assert t["rte"].labels == t["qnli"].labels == ("entailment", "not_entailment")
    for name in ("cola", "sst2", "mrpc", "qqp", "wnli"):
        assert t[name].labels == ("0", "1")
    assert t["stsb"].regression and t["stsb"].num_labels == 1
    assert t["mnli"].num_labels == 3 and t["ax"].labels == t["mnli"].labels and t["ax"].predicted_by == "mnli"
    names = {task.submission_name(s) for task in t.values() for s in task.test_splits}
    assert names == {"CoLA", "SST-2", "MRPC", "STS-B", "QQP", "MNLI-m", "MNLI-mm", "QNLI", "RTE", "WNLI", "AX"}
    assert t["cola"].metrics == ("mcc",) and t["mrpc"].metrics == ("f1", "accuracy")
    assert t["stsb"].metrics == ("pearson", "spearman") and t["mnli"].dev_splits == ("dev_matched", "dev_mismatched")
    assert glue.get_task("SST-2") is t["sst2"] and glue.get_task("STS-B") is t["stsb"]
    with pytest.raises(ValueError, match="unknown GLUE task 'squad'"):
        glue.get_task("squad")


# ------------------------------------------------------------------------------------------------- readers


def test_cola_train_without_header_test_with_header(tmp_path):
    write(tmp_path / "CoLA" / "train.tsv",
          "gj04\t1\t\tThe sailors rode the breeze.\ngj04\t0\t*\tThe more he ate, the more.\n")
    write(tmp_path / "CoLA" / "test.tsv", "index\tsentence\n0\tBill whistled.\n1\tThe car honked.\n")
    train = read_split("cola", "train", tmp_path)
    assert train.text_a == ["The sailors rode the breeze.", "The more he ate, the more."]
    assert train.text_b is None and train.labels.tolist() == [1, 0] and train.index == ["0", "1"]
    test = read_split("cola", "test", tmp_path)
    assert test.labels is None and test.text_a == ["Bill whistled.", "The car honked."]


OFFICIAL_MNLI_HEADER = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
                        "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label\n")


def official_mnli_row(i: int, a: str, b: str, label: str) -> str:
    return f"{i}\t{i}\t{i}e\tfiction\t( x )\t( y )\t(ROOT x)\t(ROOT y)\t{a}\t{b}\tneutral\t{label}\n"


def test_mnli_official_layout_matched_and_mismatched(tmp_path):
    folder = tmp_path / "MNLI"
    write(folder / "dev_matched.tsv", OFFICIAL_MNLI_HEADER + official_mnli_row(0, "A man.", "A person.", "entailment"))
    write(folder / "dev_mismatched.tsv", OFFICIAL_MNLI_HEADER + official_mnli_row(7, "It rains.", "Dry.",
                                                                                   "contradiction"))
    write(folder / "test_matched.tsv", "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\n3\t1\t1\tx\tA.\tB.\n")
    matched = read_split("mnli", "dev_matched", tmp_path)
    mismatched = read_split("mnli", "dev_mismatched", tmp_path)
    assert (matched.text_a, matched.text_b, matched.labels.tolist()) == (["A man."], ["A person."], [0])
    assert mismatched.labels.tolist() == [2] and mismatched.index == ["7"]  # gold_label, not label1
    test = read_split("mnli", "test_matched", tmp_path)
    assert test.labels is None and test.index == ["3"]


def test_mnli_local_layout_subset_jsonl_partial(tmp_path):
    folder = tmp_path / "MNLI"
    write(folder / "train_subset.tsv", "premise\thypothesis\tlabel\nP1\tH1\tneutral\nP2\tH2\tcontradiction\n")
    write(folder / "dev_matched.jsonl", json.dumps({"premise": "P", "hypothesis": "H", "label": "entailment"}) + "\n")
    write(folder / "dev_mismatched_partial.tsv", "premise\thypothesis\tlabel\nQ\tR\tneutral\n")
    assert read_split("mnli", "train", tmp_path).labels.tolist() == [1, 2]
    assert read_split("mnli", "dev_matched", tmp_path).source.endswith("dev_matched.jsonl")
    partial = read_split("mnli", "dev_mismatched", tmp_path)
    assert partial.text_a == ["Q"] and partial.labels.tolist() == [1]


def test_local_files_with_column_mapping(tmp_path):
    rows = [{"q": "Who?", "s": "Him.", "y": "entailment", "id": 10},
            {"q": "Where?", "s": "Here.", "y": "not_entailment", "id": 11}]
    jsonl = write(tmp_path / "x.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    csv_file = write(tmp_path / "x.csv", 'q,s,y,id\n"Who, then?",Him.,entailment,10\nWhere?,Here.,not_entailment,11\n')
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "x.parquet")
    mapping = Columns(text_a="q", text_b="s", label="y", index="id")
    for path in (jsonl, csv_file, tmp_path / "x.parquet"):
        data = read_split("qnli", "train", tmp_path, file=path, columns=mapping)
        assert data.text_b == ["Him.", "Here."] and data.labels.tolist() == [0, 1] and data.index == ["10", "11"]
    assert read_split("qnli", "train", tmp_path, file=csv_file, columns=mapping).text_a[0] == "Who, then?"


def test_tsv_stray_quotes_are_text(tmp_path):
    write(tmp_path / "SST-2" / "train.tsv", 'sentence\tlabel\na " quoted start\t1\nplain\t0\n"unbalanced\t1\n')
    data = read_split("sst2", "train", tmp_path)
    assert data.text_a == ['a " quoted start', "plain", '"unbalanced'] and data.labels.tolist() == [1, 0, 1]


def test_mrpc_header_with_bom_and_regression_labels(tmp_path):
    write(tmp_path / "MRPC" / "dev.tsv", "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tA .\tB .\n")
    write(tmp_path / "STS-B" / "dev.tsv", "index\tgenre\tsentence1\tsentence2\tscore\n0\tx\tA\tB\t3.800\n")
    assert read_split("mrpc", "dev", tmp_path).labels.tolist() == [1]
    stsb = read_split("stsb", "dev", tmp_path)
    assert stsb.labels.dtype == np.float32 and stsb.labels.tolist() == pytest.approx([3.8])


def test_hub_reader_maps_class_ids_and_reports_unreachable_hub(monkeypatch):
    import datasets

    def fake(name, config, split):
        assert (name, config) == ("nyu-mll/glue", "rte")
        label = [-1, -1] if split == "test" else [1, 0]
        return datasets.Dataset.from_dict({"sentence1": ["a", "b"], "sentence2": ["c", "d"], "label": label,
                                           "idx": [0, 1]})

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert read_split("rte", "dev", "hf").labels.tolist() == [1, 0]  # ids follow GLUE's label order
    assert read_split("rte", "test", "hf").labels is None

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(ValueError, match=r"could not load nyu-mll/glue/rte .*--glue-dir"):
        read_split("rte", "train", "hf")


def test_bad_input_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no GLUE directory .*missing \(pass --glue-dir DIR"):
        read_split("rte", "train", tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"task rte: no directory .*RTE"):
        read_split("rte", "train", tmp_path)
    write(tmp_path / "RTE" / "dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    with pytest.raises(FileNotFoundError, match=r"no train split in .*RTE \(looked for train.tsv\)"):
        read_split("rte", "train", tmp_path)
    write(tmp_path / "RTE" / "train.tsv", "index\tpremise_text\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    with pytest.raises(ValueError, match=r"no text_a column \(looked for sentence1\); columns are"):
        read_split("rte", "train", tmp_path)
    write(tmp_path / "RTE" / "train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(ValueError, match=r"row 1: unknown label 'maybe' for task rte"):
        read_split("rte", "train", tmp_path)
    with pytest.raises(ValueError, match=r"column 'question' \(text_a\) not found"):
        read_split("rte", "dev", tmp_path, columns=Columns(text_a="question"))
    write(tmp_path / "RTE" / "train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\n1\tc\n")
    with pytest.raises(ValueError, match="2 of 2 rows do not have 4 tab-separated fields"):
        read_split("rte", "train", tmp_path)
    for bad in ("nan", "inf"):  # issue 19, defect 2: a non-finite score would turn every loss it enters into NaN
        write(tmp_path / "STS-B" / "train.tsv", f"index\tsentence1\tsentence2\tscore\n0\ta\tb\t2.5\n1\tc\td\t{bad}\n")
        with pytest.raises(ValueError, match=rf"train.tsv row 2: label '{bad}' of stsb is not a finite number"):
            read_split("stsb", "train", tmp_path)


def test_real_glue_files(shared_data):
    root = shared_data / "glue"
    # the complete dev-mismatched set (dev_mismatched.jsonl) is preferred over the 2,643 pairs of the partial one
    mismatched = 9832 if (root / "MNLI" / "dev_mismatched.jsonl").is_file() else 2643
    expected = {("cola", "train"): 8551, ("cola", "dev"): 1043, ("cola", "test"): 1063, ("rte", "train"): 2490,
                ("rte", "test"): 3000, ("stsb", "dev"): 1500, ("mrpc", "train"): 3668, ("qnli", "dev"): 5463,
                ("mnli", "dev_matched"): 9815, ("mnli", "dev_mismatched"): mismatched, ("ax", "test"): 1104,
                ("wnli", "dev"): 71}
    for (task, split), n in expected.items():
        data = read_split(task, split, root)
        assert len(data) == n and len(data.index) == n, (task, split)
        assert (data.labels is None) == split.startswith("test")
    mnli = read_split("mnli", "dev_mismatched", root)
    assert set(np.unique(mnli.labels)) == {0, 1, 2}
    assert not glue.has_split(glue.TASKS["qnli"], "train", root)


# ------------------------------------------------------------------------------------------------ encoding


def reference_truncation(a: int, b: int, budget: int) -> tuple[int, int]:
    while a + b > budget:  # BERT's _truncate_seq_pair: drop from the longer, ties from b
        if a > b:
            a -= 1
        else:
            b -= 1
    return a, b


def test_truncation_longest_first_matches_reference():
    a, b = np.meshgrid(np.arange(0, 40), np.arange(0, 40))
    for budget in (5, 16, 25):
        keep_a, keep_b = truncated_lengths(a.ravel(), b.ravel(), budget)
        expected = np.array([reference_truncation(x, y, budget) for x, y in zip(a.ravel(), b.ravel())])
        assert (keep_a == expected[:, 0]).all() and (keep_b == expected[:, 1]).all()


def test_encode_split_layout_and_truncation(tmp_path):
    a = ["one two three four five six seven eight nine ten", "short", "one two"]
    b = ["eleven twelve", "one two three four five six seven eight nine ten eleven twelve", "three"]
    tokenizer = word_tokenizer(tmp_path, a + b)
    data = glue.SplitData("rte", "train", "mem", a, b, np.array([0, 1, 0], np.int32), ["0", "1", "2"])
    enc = encode_split(data, tokenizer, max_len=10)
    assert enc.lengths.tolist() == [10, 10, 6]  # over-long pairs fill max_len exactly
    for i in range(3):
        reference = tokenizer.encode_pair(a[i], b[i], max_len=10)  # the tokenizer's own [CLS] a [SEP] b [SEP]
        assert enc.ids[enc.offsets[i]:enc.offsets[i + 1]].tolist() == reference.input_ids
        assert reference.segment_ids.count(0) == enc.first[i]
    ids = enc.ids[enc.offsets[0]:enc.offsets[1]].tolist()
    assert tokenizer.decode(ids) == "one two three four five eleven twelve"  # 10 - 3 specials: a loses its end


def test_batches_pad_right_with_mask_and_segments(tmp_path):
    texts = ["a b c d e f g h i j k l m n o p q r s t u v w x y z".split()[:k] for k in range(1, 27)]
    a = [" ".join(t) for t in texts]
    tokenizer = word_tokenizer(tmp_path, a)
    data = glue.SplitData("rte", "train", "mem", a, ["x y"] * len(a), np.zeros(len(a), np.int32),
                          [str(i) for i in range(len(a))])
    enc = encode_split(data, tokenizer, max_len=24)
    batch = make_batch(enc, np.array([0, 5]), batch_size=4, pad_multiple=8)
    assert batch.input_ids.shape == (4, 16)  # longest row: 6 + 2 + 3 = 11 -> 16
    assert batch.mask[0].tolist() == [True] * 6 + [False] * 10
    assert batch.segment_ids[0].tolist() == [0] * 3 + [1] * 3 + [0] * 10
    assert (batch.input_ids[0, 6:] == tokenizer.special.pad).all()
    assert batch.weights.tolist() == [1, 1, 0, 0] and batch.rows.tolist() == [0, 5, -1, -1]
    assert batch.mask[2:].any(axis=1).all()  # filler rows are valid sequences (no all-padding row)
    assert padded_length(17, 16, 24) == 24 and padded_length(3, 16, 24) == 16


def test_train_batches_cover_each_example_once_and_bucket_lengths(tmp_path):
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(50)]
    a = [" ".join(rng.choice(words, rng.integers(1, 60))) for _ in range(300)]
    tokenizer = word_tokenizer(tmp_path, words)
    data = glue.SplitData("sst2", "train", "mem", a, None, rng.integers(0, 2, 300).astype(np.int32),
                          [str(i) for i in range(300)])
    enc = encode_split(data, tokenizer, max_len=64)
    epoch0 = list(train_batches(enc, 16, 16, seed=1, epoch=0))
    rows = np.concatenate([b.rows[b.rows >= 0] for b in epoch0])
    assert sorted(rows.tolist()) == list(range(300))
    assert all(b.input_ids.shape[0] == 16 for b in epoch0)
    assert {b.input_ids.shape[1] for b in epoch0} <= {16, 32, 48, 64}
    again = list(train_batches(enc, 16, 16, seed=1, epoch=0))
    assert all((x.rows == y.rows).all() for x, y in zip(epoch0, again))  # a pure function of (seed, epoch)
    other = list(train_batches(enc, 16, 16, seed=1, epoch=1))
    assert any((x.rows != y.rows).any() for x, y in zip(epoch0, other))
    spread = np.mean([np.ptp(enc.lengths[b.rows[b.rows >= 0]]) for b in epoch0])
    assert spread < 0.5 * np.ptp(enc.lengths)  # sorted within chunks: similar lengths per batch
    evaluated = np.concatenate([b.rows[b.rows >= 0] for b in eval_batches(enc, 32, 16)])
    assert sorted(evaluated.tolist()) == list(range(300))


def test_tsv_that_is_not_utf8_names_the_file_and_byte(tmp_path):  # issue 19, defect 11
    from jaxbert.data.glue import read_table

    head = "sentence\tlabel\n" + "a fine sentence\t1\n" * 1000
    path = tmp_path / "train.tsv"
    path.write_bytes(head.encode() + b"caf\xe9\t0\n")
    with pytest.raises(ValueError) as info:
        read_table(path)
    message = str(info.value)
    assert f"{path}: not UTF-8 text at byte {len(head) + 3} (line 1002)" in message and "\n" not in message
