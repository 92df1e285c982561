"""Classification models for finetuning: where they start from, and how a finetuned one is saved and loaded.

A finetune starts from one of:

* ``random`` (or no ``--init``): a freshly initialised encoder for the config's model, with the tokenizer named
  by ``tokenizer.path`` (for tests and baselines);
* a pretrained model (a run dir, checkpoint dir or exported model dir, as read by
  :func:`jaxbert.checkpoint.load_pretrained`; also what ``jaxbert import-hf`` writes): its encoder, a new head;
* a finetuned model written by :func:`save_classifier` (a finetune run dir or its ``best/``, or a
  ``BertForSequenceClassification`` imported by ``jaxbert import-hf``): encoder and head, whose label count must
  match the task.

A finetuned directory holds ``config.yaml``, ``model.safetensors`` (BertForClassification tensors by name),
``tokenizer/``, ``finetuned.json`` (task, labels, epoch, dev metrics) and a model card (``README.md``); it is
written atomically.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import equinox as eqx
import jax
from safetensors.numpy import load_file, save_file

from .. import config as config_lib
from .. import io, modelcard
from ..checkpoint import load_pretrained, pretraining_facts
from ..config import Config
from ..data.glue import Task
from ..model import BertForClassification, BertModel, encoder_of, with_config
from ..tokenizer import Tokenizer, load_tokenizer

MARK = "finetuned.json"
WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class Start:
    """What a finetune starts from; ``encoder`` None means a random encoder drawn from the run's seed."""

    cfg: Config  # the run config with the model section of the init (dropout from finetune.*)
    tokenizer: Tokenizer
    encoder: Optional[BertModel] = None
    classifier: Optional[BertForClassification] = None  # a finetuned model: its head is kept
    source: str = "random"


def finetune_model_config(cfg: Config, model_cfg: Any, vocab_size: int) -> Config:
    """``cfg`` with ``model_cfg`` as its model section, the tokenizer's vocab size, finetuning dropout and pooling."""
    f = cfg.finetune
    model_cfg = dataclasses.replace(model_cfg, vocab_size=vocab_size, dropout=f.dropout,
                                    attention_dropout=f.attention_dropout, pooling=f.pooling)
    return config_lib.replace(cfg, model=model_cfg)


def _tokenizer_for(cfg: Config, init: str, bundled: Optional[Path]) -> Tokenizer:
    """The init's own tokenizer; a ``tokenizer.path`` given as well must have the same vocabulary."""
    bundled = bundled if bundled is not None and bundled.exists() else None
    if cfg.tokenizer.path is None and bundled is None:
        raise ValueError(f"init '{init}' has no tokenizer/ directory; name one with tokenizer.path=")
    tokenizer = load_tokenizer(cfg.tokenizer.path or bundled)  # type: ignore[arg-type]
    if cfg.tokenizer.path is not None and bundled is not None:
        own = load_tokenizer(bundled)
        if own.vocab_hash() != tokenizer.vocab_hash():
            raise ValueError(f"tokenizer.path={cfg.tokenizer.path} has a different vocabulary "
                             f"({tokenizer.vocab_size} tokens) from the one init '{init}' was trained with "
                             f"({own.vocab_size} tokens, {bundled})")
    return tokenizer


def _check_vocab(tokenizer: Tokenizer, vocab_size: int, init: str) -> None:
    if tokenizer.vocab_size != vocab_size:
        raise ValueError(f"init '{init}' has an embedding of {vocab_size} tokens but its tokenizer "
                         f"({tokenizer.source}) has {tokenizer.vocab_size}: they do not belong together")


def prepare_start(cfg: Config, init: Optional[str], task: Task) -> Start:
    """Resolve ``--init`` (None / "random" / pretrained / finetuned) into a :class:`Start`."""
    if init in (None, "", "random"):
        if cfg.tokenizer.path is None:
            raise ValueError("a randomly initialised model needs a tokenizer: pass tokenizer.path=DIR|FILE")
        tokenizer = load_tokenizer(cfg.tokenizer.path)
        return Start(finetune_model_config(cfg, cfg.model, tokenizer.vocab_size), tokenizer)
    path = Path(init)
    if not path.exists():
        raise FileNotFoundError(f"init '{init}' does not exist (expected a run, checkpoint or model directory)")
    if not (path / MARK).is_file() and (path / "best" / MARK).is_file():  # a finetune run dir: its best model
        path = path / "best"
    if (path / MARK).is_file():
        saved, model, _, meta = load_classifier(path)
        if model.num_labels != task.num_labels:
            raise ValueError(f"init '{init}' has a head of {model.num_labels} outputs (finetuned on "
                             f"{meta.get('task') or 'an unnamed task'}), task {task.name} needs {task.num_labels}")
        tokenizer = _tokenizer_for(cfg, init, path / "tokenizer")
        _check_vocab(tokenizer, saved.model.vocab_size, init)
        run_cfg = finetune_model_config(cfg, saved.model, saved.model.vocab_size)
        model = eqx.tree_at(lambda m: m.bert, model, with_config(model.bert, "", run_cfg.model))
        return Start(run_cfg, tokenizer, classifier=model, source=str(path))

    saved, pretrained, tokenizer_path = load_pretrained(path)
    tokenizer = _tokenizer_for(cfg, init, Path(tokenizer_path))
    _check_vocab(tokenizer, saved.model.vocab_size, init)
    run_cfg = finetune_model_config(cfg, saved.model, saved.model.vocab_size)
    encoder = with_config(encoder_of(pretrained), "", run_cfg.model)  # ELECTRA: the discriminator's encoder
    return Start(run_cfg, tokenizer, encoder=encoder, source=str(path))


def build_classifier(start: Start, task: Task, key: jax.Array) -> BertForClassification:
    """The model to finetune: the start's classifier, or its (or a random) encoder with a new head from ``key``."""
    if start.classifier is not None:
        return start.classifier
    return _new_classifier(start.cfg.model, task.num_labels, key, start.encoder)


@eqx.filter_jit
def _new_classifier(model_cfg: Any, num_labels: int, key: jax.Array,
                    encoder: Optional[BertModel]) -> BertForClassification:
    """Initialisation under one jit: one compilation instead of one per parameter shape."""
    return BertForClassification(model_cfg, num_labels, key=key, bert=encoder)


# ----------------------------------------------------------------------------------------- save / load


def write_finetuned(directory: Path, cfg: Config, model: BertForClassification, tokenizer: Tokenizer,
                    meta: dict[str, Any]) -> dict[str, Any]:
    """Write the files of a finetuned model into the (new, temporary) ``directory``; returns manifest fields."""
    config_lib.save(cfg, directory)
    save_file(io.named_arrays(model), str(directory / WEIGHTS), metadata={"format": "jaxbert-classifier"})
    tokenizer.save(directory / "tokenizer")
    io.write_json(directory / MARK, {**meta, "num_labels": model.num_labels})
    facts = pretraining_facts(str(meta.get("init") or "random"))
    modelcard.write_card(directory, modelcard.finetuned_card(cfg, meta, model.num_labels, init_facts=facts))
    return {"kind": "finetuned"}


def save_classifier(directory: str | Path, cfg: Config, model: BertForClassification, tokenizer: Tokenizer,
                    meta: dict[str, Any]) -> Path:
    """Write a finetuned model (weights, config, tokenizer, ``finetuned.json``, card, manifest) into
    ``directory``, atomically (an existing one is replaced)."""
    return io.atomic_dir(Path(directory), lambda tmp: write_finetuned(tmp, cfg, model, tokenizer, meta))


def finetuned_dir(path: Path) -> Optional[Path]:
    """``path`` itself, or its ``best/``, when it is a finetuned-model directory (holds ``finetuned.json``)."""
    for candidate in (path, path / "best"):
        if (candidate / MARK).is_file():
            return candidate
    return None


def load_classifier(directory: str | Path) -> tuple[Config, BertForClassification, Tokenizer, dict[str, Any]]:
    """(config, model, tokenizer, metadata) of a directory written by :func:`save_classifier`."""
    directory = Path(directory)
    if not (directory / MARK).is_file():
        raise FileNotFoundError(f"'{directory}' is not a finetuned model (no {MARK})")
    meta = json.loads((directory / MARK).read_text())
    cfg = config_lib.load_saved(directory)
    skeleton = eqx.filter_eval_shape(BertForClassification, cfg.model, int(meta["num_labels"]),
                                     key=jax.random.PRNGKey(0))
    model = io.from_named(skeleton, load_file(str(directory / WEIGHTS)), f"'{directory / WEIGHTS}'")
    return cfg, model, load_tokenizer(directory / "tokenizer"), meta
