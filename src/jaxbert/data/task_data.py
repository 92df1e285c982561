"""A task's splits as a finetune run sees them: read (per ``finetune.*`` settings), subsampled, encoded."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from .. import config as config_lib
from ..config import Config
from .glue import (CUSTOM, Columns, SplitData, Task, custom_task_from, get_task, has_split, missing_reason,
                   read_split, read_table)
from .pairs import Encoded, PairTokenizer, encode_split


@dataclass(frozen=True)
class TaskData:
    task: Task
    train: Optional[Encoded]
    dev: dict[str, Encoded] = field(default_factory=dict)  # dev split -> labelled examples
    test: dict[str, tuple[list[str], Encoded]] = field(default_factory=dict)  # test split -> (index, examples)


def columns_of(cfg: Config) -> Columns:
    f = cfg.finetune
    return Columns(f.text_a, f.text_b, f.label_column, f.index_column)


def resolve_task(cfg: Config) -> tuple[Config, Task]:
    """The task a finetune run trains on, and the config to run it with.

    A GLUE name gives its registry entry. ``finetune.task=custom`` describes the task by the files: it needs
    ``finetune.train_file`` and ``finetune.dev_file``; the text and label columns are the ones named by
    ``finetune.text_a/text_b/label_column`` or found among the usual names, and the classes are inferred from
    the training labels (a column holding non-integer numbers is a regression). The returned config names the
    columns found, so a saved model records them.
    """
    f = cfg.finetune
    if f.task.strip().lower() != CUSTOM:
        return cfg, get_task(f.task)
    if f.train_file is None or f.dev_file is None:
        raise ValueError("finetune.task=custom needs finetune.train_file=FILE and finetune.dev_file=FILE")
    task = custom_task_from(read_table(f.train_file), str(f.train_file), columns_of(cfg))
    resolved = {"task": CUSTOM, "text_a": task.text_a[0], "text_b": task.text_b[0] if task.text_b else None,
                "label_column": task.label[0]}
    return config_lib.replace(cfg, finetune=resolved), task


def _read(cfg: Config, task: Task, split: str, file: Optional[str]) -> SplitData:
    return read_split(task, split, cfg.finetune.glue_dir, file=file, columns=columns_of(cfg))


def _subsample(data: SplitData, limit: Optional[int], seed: int) -> SplitData:
    if limit is None or limit >= len(data):
        return data
    rows = np.sort(np.random.default_rng(seed).permutation(len(data))[:limit])
    return data.take(rows)


def _describe(data: SplitData, enc: Encoded, tokenizer: PairTokenizer) -> str:
    lengths = enc.lengths
    text = (f"{data.split}: {len(data)} examples from {data.source}, tokens mean {lengths.mean():.1f} "
            f"max {lengths.max()}")
    truncated = int(np.sum(lengths >= enc.max_len))
    return text + (f", {truncated} truncated to {enc.max_len}" if truncated else "")


def _sample(enc: Encoded, tokenizer: PairTokenizer) -> Optional[str]:
    decode = getattr(tokenizer, "decode", None)
    if decode is None or len(enc) == 0:
        return None
    return decode(enc.ids[enc.offsets[0]:enc.offsets[1]].tolist(), skip_special_tokens=False)


def dev_splits(cfg: Config, task: Task, tokenizer: PairTokenizer,
               echo: Callable[[str], None] = print) -> dict[str, Encoded]:
    """The task's dev splits, encoded: ``finetune.dev_file`` replaces the first one, ``finetune.max_eval_examples``
    keeps the first N rows; a split that is not found is reported and skipped (the result may be empty)."""
    f = cfg.finetune
    dev: dict[str, Encoded] = {}
    for position, split in enumerate(task.dev_splits):
        file = f.dev_file if position == 0 else None
        if file is None and not has_split(task, split, f.glue_dir):
            echo(f"{task.name}: {missing_reason(task, split, f.glue_dir)}; not evaluated")
            continue
        data = _read(cfg, task, split, file)
        data = data.take(np.arange(min(len(data), f.max_eval_examples or len(data))))
        dev[split] = encode_split(data, tokenizer, f.max_len)
        echo(f"{task.name} {_describe(data, dev[split], tokenizer)}")
    return dev


def load_task_data(cfg: Config, task: Task, tokenizer: PairTokenizer, *, need_train: bool = True,
                   echo: Callable[[str], None] = print) -> TaskData:
    """Read and encode the train, dev and test splits of ``task``.

    Missing train (when ``need_train``) or missing every dev split is an error; missing test splits are
    reported and skipped. ``finetune.{train,dev,test}_file`` replace the task's first split of each kind.
    """
    f = cfg.finetune
    encode = lambda d: encode_split(d, tokenizer, f.max_len)  # noqa: E731
    train = None
    if need_train:
        data = _subsample(_read(cfg, task, "train", f.train_file), f.max_train_examples, f.seed)
        train = encode(data)
        echo(f"{task.name} {_describe(data, train, tokenizer)}")
        sample = _sample(train, tokenizer)
        if sample is not None:
            echo(f"{task.name} first train example: {sample[:300]}")
    dev = dev_splits(cfg, task, tokenizer, echo)
    if need_train and not dev:
        raise FileNotFoundError(f"task {task.name}: no dev split found in {f.glue_dir} (pass finetune.dev_file=)")
    test: dict[str, tuple[list[str], Encoded]] = {}
    for position, split in enumerate(task.test_splits):
        file = f.test_file if position == 0 else None
        if file is None and not has_split(task, split, f.glue_dir):
            reason = missing_reason(task, split, f.glue_dir)
            echo(f"{task.name}: {reason}; no {task.submission_name(split)} predictions")
            continue
        data = _read(cfg, task, split, file)
        test[split] = (data.index, encode(data))
    return TaskData(task, train, dev, test)
