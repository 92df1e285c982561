"""Checkpoints and exported models: atomic, checksummed, self-contained directories.

Two kinds of directory share one layout::

    <dir>/manifest.json       written last: kind, step, data position, elapsed time, sha256 of every file
    <dir>/config.yaml         the resolved run config (model.vocab_size matches the weights)
    <dir>/model.safetensors   BertForMLM weights by name ("bert.layers.qkv.weight", ...), float32
    <dir>/tokenizer/          the tokenizer the model was trained with
    <dir>/README.md           the model card (data, tokens seen, MLM metrics, config, command)
    <dir>/train_state.eqx     checkpoints only: optimizer state, loss scale, step, PRNG key (and the FP8
                              amax histories with train.precision=fp8_delayed)

A training run keeps its checkpoints in ``<run_dir>/checkpoints/step_XXXXXXXX``. Every directory is written
under a temporary name, fsynced and renamed into place, so a crash or a full disk never leaves a half-written
directory under the final name; a directory without a valid manifest is ignored by :func:`latest_checkpoint`.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from io import BytesIO
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from . import config as config_lib
from . import io, modelcard
from .config import Config
from .model import BertForMLM, pretraining_model

MANIFEST = io.MANIFEST
CONFIG_FILE = "config.yaml"
MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.eqx"
TOKENIZER_DIR = "tokenizer"
CHECKPOINTS = "checkpoints"
_PREFIX = "step_"


class CheckpointError(io.ManifestError):
    """A checkpoint is missing, truncated, corrupt, or was written for an incompatible config."""


@dataclass(frozen=True)
class Progress:
    """Where a run stands: what the loop needs, besides the TrainState, to continue exactly."""

    step: int = 0  # optimizer steps done
    data_position: int = 0  # global index of the next training sample
    elapsed_seconds: float = 0.0  # training time so far (time-budget mode)


def read_manifest(directory: Path, verify: bool = True) -> dict[str, Any]:
    """The manifest of a complete checkpoint or model directory (see :func:`jaxbert.io.verify_manifest`)."""
    try:
        return io.verify_manifest(directory, verify)
    except io.ManifestError as err:
        raise CheckpointError(str(err)) from None


# ------------------------------------------------------------------------------------------- model weights


def model_from_tensors(cfg: Config, tensors: dict[str, np.ndarray], source: str = "weights") -> Any:
    """The pretraining model of ``cfg`` (a BertForMLM, or an ELECTRA generator + discriminator with
    ``train.objective=electra``) filled from named arrays (:func:`jaxbert.io.named_arrays`); any missing, extra
    or mis-shaped name is a CheckpointError."""
    skeleton = eqx.filter_eval_shape(pretraining_model, cfg.model, cfg.train.objective, cfg.train.electra_generator,
                                     key=jax.random.PRNGKey(0))
    return io.from_named(skeleton, tensors, source, error=CheckpointError)


def _save_tokenizer(tokenizer: Any, target: Path) -> None:
    """Save a Tokenizer object (``.save(dir)``) or copy a tokenizer file/directory into ``target``."""
    if tokenizer is None:
        return
    if hasattr(tokenizer, "save"):
        target.mkdir()
        tokenizer.save(target)
        return
    source = Path(tokenizer)
    if source.is_dir():
        shutil.copytree(source, target)
    elif source.is_file():
        target.mkdir()
        shutil.copy2(source, target / source.name)
    else:
        raise FileNotFoundError(f"tokenizer '{source}' does not exist")


def write_model_files(tmp: Path, cfg: Config, model: BertForMLM, tokenizer: Any, card: str) -> dict[str, Any]:
    """Write config, weights, tokenizer and card of a model into the (new, temporary) directory ``tmp``; returns
    the manifest fields of a model directory."""
    if model.config != cfg.model:
        raise ValueError("the model's config differs from cfg.model (was model.vocab_size set from the tokenizer?)")
    config_lib.save(cfg, tmp, CONFIG_FILE)
    io.write_bytes(tmp / MODEL_FILE, st_save(io.named_arrays(model), metadata={"format": "jaxbert"}))
    _save_tokenizer(tokenizer, tmp / TOKENIZER_DIR)
    io.write_bytes(tmp / modelcard.CARD, card.encode("utf-8"))
    return {"kind": "model"}


def save_model(directory: str | Path, cfg: Config, model: BertForMLM, tokenizer: Any,
               card: Optional[str] = None) -> Path:
    """Export weights, config, tokenizer and a model card into ``directory`` (atomically); readable by
    :func:`load_pretrained`.

    ``tokenizer``: a Tokenizer (anything with ``.save(dir)``), a tokenizer file or directory, or None.
    ``card``: the README.md text (default: a card rendered from ``cfg``).
    """

    return io.atomic_dir(Path(directory), lambda tmp: write_model_files(tmp, cfg, model, tokenizer,
                                                                          card or modelcard.pretraining_card(cfg)))


def _load_model_dir(directory: Path, verify: bool) -> tuple[Config, BertForMLM]:
    kind = read_manifest(directory, verify=verify).get("kind")
    if kind not in ("model", "checkpoint"):  # a finetuned model or an HF export: written by jaxbert, not an MLM dir
        raise CheckpointError(f"'{directory}' is a {kind} directory, not a jaxbert pretrained model or checkpoint")
    cfg = config_lib.load_saved(directory / CONFIG_FILE)
    try:
        tensors = st_load((directory / MODEL_FILE).read_bytes())
    except Exception as err:  # safetensors reports corruption with several exception types
        raise CheckpointError(f"'{directory / MODEL_FILE}' is corrupt ({err})") from None
    return cfg, model_from_tensors(cfg, tensors, str(directory / MODEL_FILE))


def load_pretrained(path: str | Path) -> tuple[Config, BertForMLM, Path]:
    """(config, model, tokenizer path) from a model dir, a checkpoint dir, or a run dir (its latest checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"pretrained model '{path}' does not exist")
    verified = False
    if not (path / MANIFEST).is_file() and (path / CHECKPOINTS).is_dir():
        latest = latest_checkpoint(path)  # verified
        if latest is None:
            raise CheckpointError(f"run '{path}' has no complete checkpoint in {path / CHECKPOINTS}")
        path, verified = latest, True
    cfg, model = _load_model_dir(path, verify=not verified)
    return cfg, model, path / TOKENIZER_DIR


# --------------------------------------------------------------------------------------------- checkpoints


def _without_model(state: Any) -> Any:
    return eqx.tree_at(lambda s: s.model, state, None)


def pretraining_facts(directory: str | Path) -> dict[str, Any]:
    """Step, tokens seen and held-out MLM metrics of a checkpoint (or run) dir; ``{}`` for anything else."""
    directory = Path(directory)
    if not (directory / MANIFEST).is_file() and (directory / CHECKPOINTS).is_dir():
        directory = latest_checkpoint(directory) or directory
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        cfg = config_lib.load_saved(directory)
    except (OSError, ValueError):
        return {}
    if manifest.get("kind") != "checkpoint":
        return {}
    step, position = int(manifest.get("step", 0)), int(manifest.get("data_position", 0))
    in_run = directory.parent.name == CHECKPOINTS
    mlm = modelcard.last_eval(directory.parent.parent / "metrics.jsonl", step) if in_run else None
    return {"step": step, "tokens_seen": position * cfg.data.seq_len, "mlm": mlm, "source": str(directory)}


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Checkpoint directories of a run that have a manifest, oldest first (not verified)."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.name.startswith(_PREFIX) and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    """The newest checkpoint that passes verification; corrupt newer ones are skipped with a warning."""
    for path in reversed(checkpoint_dirs(run_dir)):
        try:
            read_manifest(path, verify=True)
            return path
        except CheckpointError as err:
            warnings.warn(f"skipping checkpoint: {err}", stacklevel=2)
    return None


def save_checkpoint(run_dir: str | Path, cfg: Config, state: Any, progress: Progress, tokenizer: Any,
                    keep: int) -> Path:
    """Write ``state`` (a TrainState: ``.model`` plus optimizer/loss-scale/key leaves) and prune to ``keep``."""
    final = Path(run_dir) / CHECKPOINTS / f"{_PREFIX}{progress.step:08d}"

    def write(tmp: Path) -> dict[str, Any]:
        facts = {"step": progress.step, "tokens_seen": progress.data_position * cfg.data.seq_len,
                 "mlm": modelcard.last_eval(Path(run_dir) / "metrics.jsonl", progress.step)}
        write_model_files(tmp, cfg, state.model, tokenizer, modelcard.pretraining_card(cfg, facts))
        buffer = BytesIO()
        eqx.tree_serialise_leaves(buffer, _without_model(state))
        io.write_bytes(tmp / STATE_FILE, buffer.getvalue())
        return {"kind": "checkpoint", "step": progress.step, "data_position": progress.data_position,
                "elapsed_seconds": progress.elapsed_seconds}

    io.atomic_dir(final, write, failed="any previous checkpoint is left as it was")
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in (Path(run_dir) / CHECKPOINTS).glob(".*tmp-*"):  # left by a process that was killed mid-save
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)
    return final


# Keys that change the shape or meaning of the saved state; other keys may change on resume.
_STATE_KEYS = ("data.seq_len", "data.max_predictions", "train.precision", "train.seed", "train.objective",
               "train.electra_generator")


def _get(cfg: Config, dotted: str) -> Any:
    section, name = dotted.split(".")
    return getattr(getattr(cfg, section), name)


def compatibility_problems(saved: Config, cfg: Config) -> list[str]:
    """Why a checkpoint written with ``saved`` cannot continue under ``cfg`` (empty when it can)."""
    problems = [f"model.{k}: checkpoint {v!r}, config {getattr(cfg.model, k)!r}"
                for k, v in config_lib.to_dict(saved)["model"].items() if getattr(cfg.model, k) != v]
    problems += [f"{k}: checkpoint {_get(saved, k)!r}, config {_get(cfg, k)!r}"
                 for k in _STATE_KEYS if _get(saved, k) != _get(cfg, k)]
    if (saved.train.clip_norm > 0) != (cfg.train.clip_norm > 0):
        problems.append("train.clip_norm: enabling/disabling clipping changes the optimizer state")
    if cfg.train.precision == "fp8_delayed" and saved.train.fp8_history != cfg.train.fp8_history:
        problems.append(f"train.fp8_history: checkpoint {saved.train.fp8_history}, config {cfg.train.fp8_history}")
    return problems


def restore_checkpoint(path: str | Path, cfg: Config, template: Any) -> tuple[Any, Progress]:
    """Load a checkpoint into a TrainState shaped like ``template``; a clear error when it cannot be used."""
    path = Path(path)
    manifest = read_manifest(path, verify=True)
    if manifest.get("kind") != "checkpoint":
        raise CheckpointError(f"'{path}' is an exported model, not a training checkpoint")
    saved = config_lib.load_saved(path / CONFIG_FILE)
    problems = compatibility_problems(saved, cfg)
    if problems:
        raise CheckpointError(f"checkpoint '{path}' was written with an incompatible config: {'; '.join(problems)}")
    _, model = _load_model_dir(path, verify=False)
    like = _without_model(template)
    try:
        rest = eqx.tree_deserialise_leaves(path / STATE_FILE, like)
    except Exception as err:
        raise CheckpointError(f"'{path / STATE_FILE}' does not match this config's training state ({err})") from None
    shapes = [(jnp.shape(a), jnp.result_type(a)) for a in jax.tree.leaves(rest)]
    if shapes != [(jnp.shape(a), jnp.result_type(a)) for a in jax.tree.leaves(like)]:
        raise CheckpointError(f"'{path / STATE_FILE}' does not match this config's training state (array shapes)")
    state = eqx.tree_at(lambda s: s.model, rest, model, is_leaf=lambda x: x is None)
    progress = Progress(int(manifest["step"]), int(manifest["data_position"]), float(manifest["elapsed_seconds"]))
    return state, progress


def restore_latest(run_dir: str | Path, cfg: Config, template: Any) -> tuple[Any, Progress, Path]:
    """Restore the newest usable checkpoint of a run, falling back past corrupt ones with a warning."""
    candidates = list(reversed(checkpoint_dirs(run_dir)))
    if not candidates:
        raise CheckpointError(f"no checkpoint to resume from in '{Path(run_dir) / CHECKPOINTS}'")
    for path in candidates:
        try:
            state, progress = restore_checkpoint(path, cfg, template)
            return state, progress, path
        except CheckpointError as err:
            if "incompatible config" in str(err):
                raise
            warnings.warn(f"checkpoint unusable, trying the previous one: {err}", stacklevel=2)
    raise CheckpointError(f"every checkpoint in '{Path(run_dir) / CHECKPOINTS}' is corrupt or truncated")
