"""Checkpoints and exported models: atomic, checksummed, self-contained directories.

Two kinds of directory share one layout::

    <dir>/manifest.json       written last: kind, step, data position, elapsed time, sha256 of every file
    <dir>/config.yaml         the resolved run config (model.vocab_size matches the weights)
    <dir>/model.safetensors   BertForMLM weights by name ("bert.layers.qkv.weight", ...), float32
    <dir>/tokenizer/          the tokenizer the model was trained with
    <dir>/README.md           the model card (data, tokens seen, MLM metrics, config, command)
    <dir>/train_state.eqx     checkpoints only: optimizer state, loss scale, step, PRNG key

A training run keeps its checkpoints in ``<run_dir>/checkpoints/step_XXXXXXXX``. Every directory is written
under a temporary name, fsynced and renamed into place, so a crash or a full disk never leaves a half-written
directory under the final name; a directory without a valid manifest is ignored by :func:`latest_checkpoint`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from . import config as config_lib
from . import fileio, modelcard
from .config import Config
from .model import BertForMLM, pretraining_model

FORMAT = 1
MANIFEST = "manifest.json"
CONFIG_FILE = "config.yaml"
MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.eqx"
TOKENIZER_DIR = "tokenizer"
CHECKPOINTS = "checkpoints"
_PREFIX = "step_"


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupt, or was written for an incompatible config."""


@dataclass(frozen=True)
class Progress:
    """Where a run stands: what the loop needs, besides the TrainState, to continue exactly."""

    step: int = 0  # optimizer steps done
    data_position: int = 0  # global index of the next training sample
    elapsed_seconds: float = 0.0  # training time so far (time-budget mode)


# ----------------------------------------------------------------------------------------------- low-level I/O


def _write_file(path: Path, data: bytes) -> None:
    """Write bytes and fsync them (the one place checkpoint payloads reach the disk)."""
    with fileio.open_write(path) as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def _atomic_dir(final: Path, write: Callable[[Path], dict[str, Any]]) -> Path:
    """Fill a temporary sibling of ``final`` with ``write(tmp) -> manifest fields``, then rename it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fields = write(tmp)
        for path in _files(tmp):  # files written by other libraries (tokenizer, config) are synced here
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        files = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in _files(tmp)}
        manifest = {"format": FORMAT, **fields, "files": files}
        _write_file(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        _fsync_dir(tmp)
        if final.exists():  # same name written again (e.g. an export overwritten): swap it out
            trash = final.parent / f".old-{final.name}-{os.getpid()}"
            final.rename(trash)
            tmp.rename(final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(final)
        _fsync_dir(final.parent)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            raise OSError(err.errno, f"could not write '{final}' ({err.strerror or err}); "
                                     "any previous checkpoint is left as it was") from err
        raise
    return final


def read_manifest(directory: Path, verify: bool = True) -> dict[str, Any]:
    """The manifest of a complete directory; with ``verify``, every listed file is checked (size, sha256)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"'{directory}' is not a complete jaxbert checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"'{path}' is corrupt (not a jaxbert manifest)") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"'{path}': format {manifest.get('format')!r}, this jaxbert reads format {FORMAT}")
    if verify:
        for name, info in files.items():
            file = directory / name
            if not file.is_file() or file.stat().st_size != info["bytes"] or _sha256(file) != info["sha256"]:
                raise CheckpointError(f"'{file}' is missing, truncated or corrupt (checksum mismatch)")
    return manifest


# ------------------------------------------------------------------------------------------- model weights


def model_tensors(model: BertForMLM) -> dict[str, np.ndarray]:
    """The model's arrays by dotted name, as host numpy arrays."""
    named = jax.tree_util.tree_flatten_with_path(model)[0]
    return {".".join(k.name for k in path): np.asarray(leaf) for path, leaf in named}


def model_from_tensors(cfg: Config, tensors: dict[str, np.ndarray], source: str = "weights") -> Any:
    """The pretraining model of ``cfg`` (a BertForMLM, or an ELECTRA generator + discriminator with
    ``train.objective=electra``) filled from named arrays; any missing, extra or mis-shaped name is an error."""
    skeleton = eqx.filter_eval_shape(pretraining_model, cfg.model, cfg.train.objective, cfg.train.electra_generator,
                                     key=jax.random.PRNGKey(0))
    named, treedef = jax.tree_util.tree_flatten_with_path(skeleton)
    leaves, expected = [], set()
    for path, leaf in named:
        name = ".".join(k.name for k in path)
        expected.add(name)
        if name not in tensors:
            raise CheckpointError(f"{source}: tensor '{name}' is missing")
        value = tensors[name]
        if tuple(value.shape) != tuple(leaf.shape):
            raise CheckpointError(f"{source}: tensor '{name}' has shape {tuple(value.shape)}, the config "
                                  f"expects {tuple(leaf.shape)}")
        leaves.append(jnp.asarray(value, dtype=leaf.dtype))
    extra = sorted(set(tensors) - expected)
    if extra:
        raise CheckpointError(f"{source}: unexpected tensors {extra[:3]} (a different model?)")
    return jax.tree_util.tree_unflatten(treedef, leaves)


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


def _write_common(tmp: Path, cfg: Config, model: BertForMLM, tokenizer: Any, card: str) -> None:
    if model.config != cfg.model:
        raise ValueError("the model's config differs from cfg.model (was model.vocab_size set from the tokenizer?)")
    config_lib.save(cfg, tmp, CONFIG_FILE)
    _write_file(tmp / MODEL_FILE, st_save(model_tensors(model), metadata={"format": "jaxbert"}))
    _save_tokenizer(tokenizer, tmp / TOKENIZER_DIR)
    _write_file(tmp / modelcard.CARD, card.encode("utf-8"))


def save_model(directory: str | Path, cfg: Config, model: BertForMLM, tokenizer: Any,
               card: Optional[str] = None) -> Path:
    """Export weights, config, tokenizer and a model card into ``directory`` (atomically); readable by
    :func:`load_pretrained`.

    ``tokenizer``: a Tokenizer (anything with ``.save(dir)``), a tokenizer file or directory, or None.
    ``card``: the README.md text (default: a card rendered from ``cfg``).
    """

    def write(tmp: Path) -> dict[str, Any]:
        _write_common(tmp, cfg, model, tokenizer, card or modelcard.pretraining_card(cfg))
        return {"kind": "model"}

    return _atomic_dir(Path(directory), write)


def _load_model_dir(directory: Path, verify: bool) -> tuple[Config, BertForMLM]:
    read_manifest(directory, verify=verify)
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
        _write_common(tmp, cfg, state.model, tokenizer, modelcard.pretraining_card(cfg, facts))
        buffer = io.BytesIO()
        eqx.tree_serialise_leaves(buffer, _without_model(state))
        _write_file(tmp / STATE_FILE, buffer.getvalue())
        return {"kind": "checkpoint", "step": progress.step, "data_position": progress.data_position,
                "elapsed_seconds": progress.elapsed_seconds}

    _atomic_dir(final, write)
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in (Path(run_dir) / CHECKPOINTS).glob(".tmp-*"):  # left by a process that was killed mid-save
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
