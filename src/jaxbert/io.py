"""Writing files and directories safely, and naming a model's tensors: the one place jaxbert's writers go through.

* :func:`open_write` opens every file jaxbert writes, so a test can replace it with a writer that fails after N
  bytes to simulate a full disk.
* :func:`atomic_file` / :func:`write_atomic` write one file, :func:`atomic_dir` one directory: under a
  temporary sibling named by :func:`tmp_name`, fsynced, then renamed into place; on failure the temporary is
  removed and the final name keeps its previous content. A failed write (a full disk, a read-only folder) is
  one :class:`WriteError` naming the file.
* :func:`atomic_dir` can write a ``manifest.json`` (size and sha256 of every file, plus caller fields) so that a
  reader can tell a complete, intact directory (:func:`verify_manifest`): every saved model directory has one.
* :func:`named_arrays` / :func:`from_named` map a model (any Equinox module) to ``{"dotted.name": array}`` and
  back: the one tensor naming used by checkpoints, finetuned models and the HF conversion.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Mapping, Optional

import numpy as np

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


class WriteError(OSError):
    """A file could not be written (reported in one line naming the file)."""

    def __str__(self) -> str:
        return str(self.strerror)


class ManifestError(ValueError):
    """A directory is incomplete or corrupt: no manifest, an unreadable one, or a file that does not match it."""


def open_write(path: str | Path) -> BinaryIO:
    """Open ``path`` for writing bytes (truncating it)."""
    return open(path, "wb")


def write_failed(path: str | Path, err: OSError, what: str = "") -> WriteError:
    """A one-line WriteError for a failed write of ``path`` (``what`` adds what was kept or what to do)."""
    reason = err.strerror or str(err) or type(err).__name__
    if err.errno == errno.ENOSPC:
        reason += "; expected free space on that disk"
    return WriteError(err.errno, f"cannot write '{path}': {reason}{'; ' + what if what else ''}")


# ---------------------------------------------------------------------------------------------- temporaries


def tmp_name(path: str | Path, pid: Optional[int] = None) -> Path:
    """The temporary sibling ``.<name>.tmp-<host>-<pid>`` a file or directory is written under before it is
    renamed into place (the host keeps processes on a shared filesystem apart)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid() if pid is None else pid}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(folder: str | Path) -> None:
    """Remove temporaries left in ``folder`` by processes of this host that are gone (a run killed outright)."""
    marker = f".tmp-{socket.gethostname()}-"
    for stale in Path(folder).glob(f".*{marker}*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------------- files


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through :func:`open_write` and fsync it (no rename: for files inside a
    directory that :func:`atomic_dir` publishes)."""
    with open_write(path) as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """``with atomic_file(p) as tmp:`` write ``tmp`` (with any library: np.save, zipfile, savefig); on leaving
    the block it is fsynced and renamed to ``p``. On failure ``tmp`` is removed, ``p`` keeps its previous content
    and an OSError becomes a WriteError naming ``p``."""
    path = Path(path)
    tmp = tmp_name(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and not isinstance(err, WriteError):
            raise write_failed(path, err) from None
        raise


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` (str: UTF-8) to ``path`` atomically (see :func:`atomic_file`); returns ``path``."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_file(path) as tmp:
        write_bytes(tmp, payload)
    return Path(path)


def write_json(path: str | Path, data: Any, indent: int = 1) -> Path:
    """``data`` as JSON (UTF-8, trailing newline), written atomically."""
    return write_atomic(path, json.dumps(data, indent=indent, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------------------------------- directories


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def _publish(tmp: Path, final: Path, exists: str) -> None:
    if exists == "refuse":
        check_empty(final)  # again: something may have appeared meanwhile
        if final.exists():
            final.rmdir()
        os.replace(tmp, final)
    elif exists == "keep":
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not a concurrent writer finishing first: a real failure
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    elif final.exists():  # "replace": the same name written again (e.g. an export overwritten): swap it out
        trash = tmp_name(final.with_name(final.name + ".old"))
        final.rename(trash)
        tmp.rename(final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(final)


def check_empty(path: Path) -> None:
    """``path`` must not exist, or be an empty directory (for writers that never overwrite)."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"output '{path}' already exists and is not empty (choose a new directory)")


def atomic_dir(final: str | Path, write: Callable[[Path], Optional[dict[str, Any]]], *, manifest: bool = True,
               exists: str = "replace", failed: str = "") -> Path:
    """Fill a temporary sibling of ``final`` with ``write(tmp) -> manifest fields``, then rename it into place.

    ``manifest``: write ``manifest.json`` (format, the fields, size and sha256 of every file) last.
    ``exists``: what happens to an existing ``final``: ``"replace"`` it, ``"refuse"`` unless it is an empty
    directory (ValueError), or ``"keep"`` it when a concurrent writer published it first (a cache).
    ``failed``: added to the WriteError of a failed write (e.g. what was kept).
    """
    final = Path(final)
    if exists == "refuse":
        check_empty(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fields = write(tmp) or {}
        for path in _files(tmp):  # files written by other libraries (tokenizer, safetensors) are synced here
            fsync_file(path)
        if manifest:
            files = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in _files(tmp)}
            write_bytes(tmp / MANIFEST, json.dumps({"format": MANIFEST_FORMAT, **fields, "files": files},
                                                   indent=1).encode())
        fsync_dir(tmp)
        _publish(tmp, final, exists)
        fsync_dir(final.parent)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and (failed or not isinstance(err, WriteError)):
            raise WriteError(err.errno, f"could not write '{final}' ({err.strerror or err})"
                                        f"{'; ' + failed if failed else ''}") from err
        raise
    return final


def verify_manifest(directory: str | Path, verify: bool = True) -> dict[str, Any]:
    """The manifest of a directory written by :func:`atomic_dir`; with ``verify``, every listed file is checked
    (size, sha256). Raises :class:`ManifestError` naming what is missing or corrupt."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ManifestError(f"'{directory}' is not a complete jaxbert directory (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError):
        raise ManifestError(f"'{path}' is corrupt (not a jaxbert manifest)") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"'{path}': format {manifest.get('format')!r}, this jaxbert reads format "
                            f"{MANIFEST_FORMAT}")
    if verify:
        for name, info in files.items():
            file = directory / name
            if not file.is_file() or file.stat().st_size != info["bytes"] or sha256(file) != info["sha256"]:
                raise ManifestError(f"'{file}' is missing, truncated or corrupt (checksum mismatch)")
    return manifest


# ------------------------------------------------------------------------------------------- named tensors


def _name(path: tuple) -> str:
    import jax

    return jax.tree_util.keystr(path, simple=True, separator=".")


def named_leaves(module: Any) -> dict[str, Any]:
    """Every leaf of a model (arrays, or shapes of a skeleton) by dotted attribute path."""
    import jax

    return {_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(module)[0]}


def named_arrays(module: Any) -> dict[str, np.ndarray]:
    """``{"bert.layers.qkv.weight": array, ...}``: every array leaf of a model by dotted attribute path, as host
    numpy arrays (the names :func:`from_named` reads)."""
    import equinox as eqx

    return {name: np.asarray(leaf) for name, leaf in named_leaves(module).items() if eqx.is_array(leaf)}


def from_named(skeleton: Any, arrays: Mapping[str, Any], source: str = "weights", *, allow_extra: bool = False,
               error: type[Exception] = ValueError) -> Any:
    """Fill a model skeleton (e.g. from ``eqx.filter_eval_shape``) with the arrays named as by
    :func:`named_arrays`, cast to the skeleton's dtypes. A missing or mis-shaped name (and, unless
    ``allow_extra``, an unexpected one) raises ``error`` naming ``source`` and the tensor."""
    import jax
    import jax.numpy as jnp

    named, treedef = jax.tree_util.tree_flatten_with_path(skeleton)
    leaves, expected = [], set()
    for path, leaf in named:
        name = _name(path)
        expected.add(name)
        if name not in arrays:
            raise error(f"{source}: tensor '{name}' is missing")
        value = arrays[name]
        if tuple(value.shape) != tuple(leaf.shape):
            raise error(f"{source}: tensor '{name}' has shape {tuple(value.shape)}, the config expects "
                        f"{tuple(leaf.shape)}")
        leaves.append(jnp.asarray(value, dtype=leaf.dtype))
    extra = sorted(set(arrays) - expected)
    if extra and not allow_extra:
        raise error(f"{source}: unexpected tensors {extra[:3]} (a different model?)")
    return jax.tree_util.tree_unflatten(treedef, leaves)
