"""GLUE tasks as data, and readers for every layout they come in.

:data:`TASKS` describes each task: its text and label columns (candidate names, first match wins), the label
strings in GLUE's order (the strings the GLUE server expects in submissions; empty for the STS-B regression),
its metrics, and for every split the files that may hold it. Three sources are read:

* a directory in the official GLUE layout (``<TASK>/train.tsv``, ``dev.tsv``, ``test.tsv``; CoLA's train/dev
  have no header; MNLI has ``dev_matched``/``dev_mismatched``/``test_*``), plus the variants listed per split
  (e.g. ``MNLI/train_subset.tsv``, ``MNLI/dev_matched.jsonl``);
* the HuggingFace hub (``glue_dir="hf"`` or ``"hf:<dataset>"``, default ``nyu-mll/glue``);
* single local tsv/csv/jsonl/parquet files with a column mapping (:class:`Columns`).

TSV files are read as GLUE writes them: tab-separated, no quote processing (a stray ``"`` is text).
Pair encoding and batching live in :mod:`jaxbert.data.pairs`.
"""

from __future__ import annotations

import csv
import io
import json
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

csv.field_size_limit(sys.maxsize)

HF_DEFAULT = "nyu-mll/glue"
INDEX_COLUMNS = ("index", "idx", "id")
_MALFORMED_LIMIT = 0.01  # fraction of malformed TSV rows tolerated (skipped with a warning)


@dataclass(frozen=True)
class Source:
    """A file that may hold a split; ``names`` gives column names by position for a header-less file."""

    file: str
    names: Optional[tuple[str, ...]] = None


@dataclass(frozen=True)
class Task:
    name: str  # registry key, lower case ("mnli")
    display: str  # GLUE's spelling ("MNLI")
    folder: str  # directory in the GLUE layout
    hf_config: str  # config name of the HF dataset
    text_a: tuple[str, ...]  # candidate columns of the first text
    text_b: tuple[str, ...]  # candidate columns of the second text; () for single-sentence tasks
    label: tuple[str, ...]  # candidate label columns
    labels: tuple[str, ...]  # label strings in GLUE's order (class id = position); () for regression
    metrics: tuple[str, ...]  # metric names of jaxbert.finetune.metrics; the task score is their mean
    splits: dict[str, tuple[Source, ...]] = field(hash=False)  # split -> candidate files, first found wins
    dev_splits: tuple[str, ...] = ("dev",)
    test_splits: dict[str, str] = field(default_factory=lambda: {"test": ""}, hash=False)  # split -> zip name
    predicted_by: Optional[str] = None  # AX: no training data; predicted by the MNLI model

    @property
    def num_labels(self) -> int:
        """Outputs of the head: the number of classes, or 1 for regression."""
        return len(self.labels) or 1

    @property
    def regression(self) -> bool:
        return not self.labels

    @property
    def main_metric(self) -> str:
        """What model selection and the GLUE average use: the mean of the task's metrics over its dev splits."""
        return self.metrics[0] if len(self.metrics) == 1 else "mean(" + ",".join(self.metrics) + ")"

    def submission_name(self, split: str) -> str:
        """File name (without .tsv) of a test split's predictions in a GLUE-server submission."""
        return self.test_splits[split] or self.display


def _standard(header: bool = True) -> dict[str, tuple[Source, ...]]:
    names = None if header else ("source", "label", "original_label", "sentence")
    return {"train": (Source("train.tsv", names),), "dev": (Source("dev.tsv", names),), "test": (Source("test.tsv"),)}


_BINARY = ("0", "1")
_NLI3 = ("entailment", "neutral", "contradiction")
_NLI2 = ("entailment", "not_entailment")
_S12 = dict(text_a=("sentence1",), text_b=("sentence2",), label=("label",))

TASKS: dict[str, Task] = {t.name: t for t in (
    Task("cola", "CoLA", "CoLA", "cola", ("sentence",), (), ("label",), _BINARY, ("mcc",), _standard(header=False)),
    Task("sst2", "SST-2", "SST-2", "sst2", ("sentence",), (), ("label",), _BINARY, ("accuracy",), _standard()),
    Task("mrpc", "MRPC", "MRPC", "mrpc", ("#1 String", "sentence1"), ("#2 String", "sentence2"),
         ("Quality", "label"), _BINARY, ("f1", "accuracy"), _standard()),
    Task("stsb", "STS-B", "STS-B", "stsb", ("sentence1",), ("sentence2",), ("score", "label"), (),
         ("pearson", "spearman"), _standard()),
    Task("qqp", "QQP", "QQP", "qqp", ("question1",), ("question2",), ("is_duplicate", "label"), _BINARY,
         ("f1", "accuracy"), _standard()),
    Task("mnli", "MNLI", "MNLI", "mnli", ("sentence1", "premise"), ("sentence2", "hypothesis"),
         ("gold_label", "label"), _NLI3, ("accuracy",),
         {"train": (Source("train.tsv"), Source("train_subset.tsv"), Source("train.jsonl")),
          "dev_matched": (Source("dev_matched.tsv"), Source("dev_matched.jsonl")),
          "dev_mismatched": (Source("dev_mismatched.tsv"), Source("dev_mismatched.jsonl"),
                             Source("dev_mismatched_partial.tsv")),
          "test_matched": (Source("test_matched.tsv"),), "test_mismatched": (Source("test_mismatched.tsv"),)},
         dev_splits=("dev_matched", "dev_mismatched"),
         test_splits={"test_matched": "MNLI-m", "test_mismatched": "MNLI-mm"}),
    Task("qnli", "QNLI", "QNLI", "qnli", ("question",), ("sentence",), ("label",), _NLI2, ("accuracy",), _standard()),
    Task("rte", "RTE", "RTE", "rte", **_S12, labels=_NLI2, metrics=("accuracy",), splits=_standard()),
    Task("wnli", "WNLI", "WNLI", "wnli", **_S12, labels=_BINARY, metrics=("accuracy",), splits=_standard()),
    Task("ax", "AX", "diagnostic", "ax", ("sentence1", "premise"), ("sentence2", "hypothesis"), ("label",), _NLI3,
         ("accuracy",), {"test": (Source("diagnostic.tsv"),)}, dev_splits=(), predicted_by="mnli"),
)}

_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "diagnostic": "ax", "mnli-m": "mnli", "mnli-mm": "mnli"}
_HF_SPLITS = {"dev": "validation", "dev_matched": "validation_matched", "dev_mismatched": "validation_mismatched"}


def get_task(name: str) -> Task:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in TASKS:
        raise ValueError(f"unknown GLUE task '{name}': expected one of {', '.join(TASKS)}")
    return TASKS[key]


@dataclass(frozen=True)
class Columns:
    """Explicit column names (for local files); None keeps the task's candidates."""

    text_a: Optional[str] = None
    text_b: Optional[str] = None
    label: Optional[str] = None
    index: Optional[str] = None


@dataclass(frozen=True)
class SplitData:
    """One split, column-oriented. ``labels``: int32 class ids or float32 scores; None when unlabelled."""

    task: str
    split: str
    source: str  # file (or hub name) it was read from
    text_a: list[str]
    text_b: Optional[list[str]]
    labels: Optional[np.ndarray]
    index: list[str]

    def __len__(self) -> int:
        return len(self.text_a)

    def take(self, rows: np.ndarray) -> "SplitData":
        """The rows ``rows`` (in that order)."""
        pick = [int(r) for r in rows]
        return SplitData(self.task, self.split, self.source, [self.text_a[r] for r in pick],
                         None if self.text_b is None else [self.text_b[r] for r in pick],
                         None if self.labels is None else self.labels[pick], [self.index[r] for r in pick])


# ------------------------------------------------------------------------------------------------ tables


def read_text(path: Path) -> str:
    """The UTF-8 text of ``path`` (a leading BOM dropped: MRPC's header carries one); bad bytes are one ValueError
    naming the file, the byte offset in the file and the line."""
    data = path.read_bytes()
    bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as err:
        offset = bom + err.start
        line = data.count(b"\n", 0, offset) + 1
        raise ValueError(f"file {path}: not UTF-8 text at byte {offset} (line {line}); expected a UTF-8 "
                         f"{path.suffix.lstrip('.') or 'text'} file") from None


def _read_tsv(path: Path, names: Optional[tuple[str, ...]]) -> dict[str, list]:
    rows = list(csv.reader(io.StringIO(read_text(path), newline=""), delimiter="\t", quoting=csv.QUOTE_NONE))
    start = 0
    if names is None:
        if not rows:
            raise ValueError(f"file {path}: empty (expected a header row)")
        names, start = tuple(c.strip() for c in rows[0]), 1
    table: dict[str, list] = {n: [] for n in names}
    bad = 0
    for row in rows[start:]:
        if len(row) != len(names):
            bad += not (len(row) == 0 or row == [""])
            continue
        for name, value in zip(names, row):
            table[name].append(value)
    total = len(rows) - start
    if bad and bad > _MALFORMED_LIMIT * total:
        raise ValueError(f"file {path}: {bad} of {total} rows do not have {len(names)} tab-separated fields "
                         "(is it a GLUE tsv?)")
    if bad:
        warnings.warn(f"file {path}: skipped {bad} malformed row(s) of {total}", stacklevel=2)
    return table


def _columns_of(records: list[dict]) -> dict[str, list]:
    names: dict[str, None] = {}
    for record in records[:100]:
        names.update(dict.fromkeys(record))
    return {n: [r.get(n) for r in records] for n in names}


def read_table(path: str | Path, names: Optional[tuple[str, ...]] = None) -> dict[str, list]:
    """A tsv/csv/jsonl/json/parquet file as ``{column: values}``; ``names`` for a header-less tsv."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file '{path}' does not exist")
    suffix = path.suffix.lower()
    if suffix == ".tsv":
        return _read_tsv(path, names)
    if suffix == ".csv":
        return _columns_of(list(csv.DictReader(io.StringIO(read_text(path), newline=""))))
    if suffix in (".jsonl", ".json"):
        records = []
        for number, line in enumerate(io.StringIO(read_text(path)), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    message = f"file {path} line {number}: not JSON (expected one object per line)"
                    raise ValueError(message) from None
        return _columns_of(records)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pydict()
    raise ValueError(f"data file '{path}': unknown format '{suffix}' (expected .tsv, .csv, .jsonl, .json or .parquet)")


# --------------------------------------------------------------------------------------------- conversion


def _pick(table: dict[str, list], explicit: Optional[str], candidates: tuple[str, ...], what: str,
          source: str, required: bool) -> Optional[str]:
    if explicit is not None:
        if explicit not in table:
            raise ValueError(f"{source}: column '{explicit}' ({what}) not found; columns are {list(table)}")
        return explicit
    for name in candidates:
        if name in table:
            return name
    if required:
        raise ValueError(f"{source}: no {what} column (looked for {', '.join(candidates)}); columns are "
                         f"{list(table)}; name it with finetune.{'label_column' if what == 'label' else what}=")
    return None


def label_key(value: object) -> str:
    """The class name a label value stands for: ``1``, ``1.0`` (a float column) and ``" 1"`` all give ``"1"``."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value).strip()


def _labels(task: Task, values: list, source: str) -> np.ndarray:
    if task.regression:
        try:
            scores = np.asarray([float(v) for v in values], np.float32)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: label column of {task.name} must hold numbers ({err})") from None
        bad = np.flatnonzero(~np.isfinite(scores))
        if len(bad):  # a NaN/inf target would make every loss it enters non-finite
            raise ValueError(f"{source} row {bad[0] + 1}: label '{values[bad[0]]}' of {task.name} is not a finite "
                             f"number ({len(bad)} such row(s)); expected a score")
        return scores
    lookup = {name: i for i, name in enumerate(task.labels)}
    out = np.empty(len(values), np.int32)
    for row, value in enumerate(values):
        key = label_key(value)
        if key not in lookup:
            raise ValueError(f"{source} row {row + 1}: unknown label '{value}' for task {task.name} "
                             f"(expected one of {', '.join(task.labels)})")
        out[row] = lookup[key]
    return out


def to_split(task: Task, split: str, table: dict[str, list], source: str, columns: Columns = Columns(),
             need_labels: bool = True) -> SplitData:
    """Select and check the columns of a read table. Missing labels are an error when ``need_labels``."""
    a = _pick(table, columns.text_a, task.text_a, "text_a", source, True)
    b = _pick(table, columns.text_b, task.text_b, "text_b", source, bool(task.text_b)) if task.text_b else None
    label = columns.label if need_labels or columns.label in table else None  # test files may lack it
    y = _pick(table, label, task.label, "label", source, need_labels)
    i = _pick(table, columns.index, INDEX_COLUMNS, "index_column", source, False)
    n = len(table[a])
    labels = None
    if y is not None and not all(v in (None, "", -1) for v in table[y]):  # HF test splits hold label -1
        labels = _labels(task, table[y], source)
    elif need_labels:
        raise ValueError(f"{source}: the label column '{y}' is empty (an unlabelled test file used as {split}?)")
    index = [str(v) for v in table[i]] if i is not None else [str(r) for r in range(n)]
    return SplitData(task.name, split, source, _texts(table[a]), _texts(table[b]) if b else None, labels, index)


def _texts(values: list) -> list[str]:
    return ["" if v is None else str(v) for v in values]


# ------------------------------------------------------------------------------------------------ sources


def is_hub(glue_dir: str | Path) -> bool:
    return str(glue_dir) == "hf" or str(glue_dir).startswith("hf:")


def find_split(task: Task, split: str, glue_dir: str | Path) -> Optional[tuple[Path, Source]]:
    """The first existing candidate file of ``split`` in a GLUE-layout directory, or None."""
    for source in task.splits.get(split, ()):
        path = Path(glue_dir) / task.folder / source.file
        if path.is_file():
            return path, source
    return None


def missing_reason(task: Task, split: str, glue_dir: str | Path) -> str:
    folder = Path(glue_dir) / task.folder
    if not Path(glue_dir).is_dir():
        return f"no GLUE directory {glue_dir} (pass --glue-dir DIR, or --glue-dir hf for the HuggingFace hub)"
    if not folder.is_dir():
        return f"no directory {folder}"
    looked = ", ".join(s.file for s in task.splits.get(split, ())) or "nothing (no such split)"
    return f"no {split} split in {folder} (looked for {looked})"


def _read_hub(task: Task, split: str, glue_dir: str) -> tuple[dict[str, list], str]:
    name = glue_dir[3:] if glue_dir.startswith("hf:") and len(glue_dir) > 3 else HF_DEFAULT
    hf_split = _HF_SPLITS.get(split, split)
    try:
        import datasets

        data = datasets.load_dataset(name, task.hf_config, split=hf_split)
    except Exception as err:  # network, unknown config/split: one line, whatever the library raised
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"could not load {name}/{task.hf_config} split '{hf_split}' from the HuggingFace hub "
                         f"({first[:200]}); without network access, download GLUE and pass --glue-dir DIR") from None
    table = data.to_dict()
    if "label" in table and not task.regression:  # the hub stores class ids; map them to GLUE's label strings
        table["label"] = [task.labels[v] if 0 <= v < len(task.labels) else -1 for v in table["label"]]
    return table, f"{name}/{task.hf_config}:{hf_split}"


def read_split(task: Task | str, split: str, glue_dir: str | Path, *, file: Optional[str | Path] = None,
               columns: Columns = Columns(), need_labels: Optional[bool] = None) -> SplitData:
    """Read one split from ``file`` (any format), the hub, or the GLUE-layout directory ``glue_dir``."""
    task = get_task(task) if isinstance(task, str) else task
    need = not split.startswith("test") if need_labels is None else need_labels
    if file is not None:
        return to_split(task, split, read_table(file), str(file), columns, need)
    if is_hub(glue_dir):
        table, source = _read_hub(task, split, str(glue_dir))
        return to_split(task, split, table, source, columns, need)
    found = find_split(task, split, glue_dir)
    if found is None:
        raise FileNotFoundError(f"task {task.name}: {missing_reason(task, split, glue_dir)}")
    path, source = found
    return to_split(task, split, read_table(path, source.names), str(path), columns, need)


def has_split(task: Task, split: str, glue_dir: str | Path) -> bool:
    """Whether ``split`` can be read (always assumed for the hub, which has every split)."""
    return is_hub(glue_dir) or find_split(task, split, glue_dir) is not None


# ------------------------------------------------------------------------------------------- custom tasks

CUSTOM = "custom"
CUSTOM_TEXT_A = ("text_a", "sentence", "text", "sentence1", "premise", "question")
CUSTOM_TEXT_B = ("text_b", "sentence2", "hypothesis")
CUSTOM_LABEL = ("label", "labels", "score", "target")


def custom_task(labels: tuple[str, ...] | list[str], text_a: tuple[str, ...] = CUSTOM_TEXT_A,
                text_b: tuple[str, ...] = (), label: tuple[str, ...] = CUSTOM_LABEL) -> Task:
    """A task described by the user's own files: class names in class-id order, or ``()`` for a regression
    (scored by Pearson/Spearman; classification by accuracy). Its splits come from ``finetune.*_file``."""
    metrics = ("accuracy",) if labels else ("pearson", "spearman")
    return Task(CUSTOM, "custom", "", "", tuple(text_a), tuple(text_b), tuple(label), tuple(labels), metrics, {},
                test_splits={"test": "custom"})


def _number(value: object) -> Optional[float]:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(str(value).strip())
    except ValueError:
        return None


def infer_labels(values: list, source: str) -> tuple[str, ...]:
    """The classes of a label column, or ``()`` when it is a regression target.

    A column of numbers with at least one non-integer value (``3.8``) is a regression; otherwise every distinct
    value is a class: numbers in numeric order (``0, 1, 2``), other strings sorted.
    """
    if not values:
        raise ValueError(f"{source}: no rows (expected a labelled training file)")
    for row, value in enumerate(values):
        if value is None or str(value).strip() == "":
            raise ValueError(f"{source} row {row + 1}: empty label (every training row needs one)")
    numbers = [_number(v) for v in values]
    if all(n is not None for n in numbers):
        if any(not float(n).is_integer() for n in numbers):  # type: ignore[arg-type]
            return ()
        keys = {label_key(v): float(n) for v, n in zip(values, numbers)}  # type: ignore[misc]
        return tuple(sorted(keys, key=lambda k: keys[k]))
    return tuple(sorted({label_key(v) for v in values}))


def custom_task_from(table: dict[str, list], source: str, columns: Columns = Columns()) -> Task:
    """The custom task a training table describes: its text/label columns (named in ``columns`` or found among
    the usual names) and its classes (see :func:`infer_labels`)."""
    a = _pick(table, columns.text_a, CUSTOM_TEXT_A, "text_a", source, True)
    b = _pick(table, columns.text_b, CUSTOM_TEXT_B, "text_b", source, False)
    y = _pick(table, columns.label, CUSTOM_LABEL, "label", source, True)
    assert a is not None and y is not None
    return custom_task(infer_labels(table[y], source), (a,), (b,) if b else (), (y,))
