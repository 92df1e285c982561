"""Writing files safely: every file jaxbert writes is opened by :func:`open_write`, small files go through
:func:`write_atomic` (a temporary name, then a rename), and a failed write (a full disk, a read-only folder)
becomes one :class:`WriteError` naming the file, with nothing half-written left under the final name.

:func:`open_write` is the single place where files are opened for writing, so a test can replace it with a
writer that fails after N bytes to simulate a full disk.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import BinaryIO


class WriteError(OSError):
    """A file could not be written (reported in one line naming the file)."""

    def __str__(self) -> str:
        return str(self.strerror)


def open_write(path: str | Path) -> BinaryIO:
    """Open ``path`` for writing bytes (truncating it)."""
    return open(path, "wb")


def write_failed(path: str | Path, err: OSError, what: str = "") -> WriteError:
    """A one-line WriteError for a failed write of ``path`` (``what`` adds what was kept or what to do)."""
    reason = err.strerror or str(err) or type(err).__name__
    if err.errno == errno.ENOSPC:
        reason += "; expected free space on that disk"
    return WriteError(err.errno, f"cannot write '{path}': {reason}{'; ' + what if what else ''}")


def tmp_name(path: Path) -> Path:
    """The temporary sibling a file is written under before it is renamed into place."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_atomic(path: str | Path, data: bytes | str, fsync: bool = False) -> Path:
    """Write ``data`` to a temporary sibling of ``path`` and rename it into place; on failure the temporary file
    is removed, ``path`` keeps its previous content and a WriteError says which file could not be written."""
    path = Path(path)
    tmp = tmp_name(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        with open_write(tmp) as handle:
            handle.write(payload)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and not isinstance(err, WriteError):
            raise write_failed(path, err) from None
        raise
    return path
