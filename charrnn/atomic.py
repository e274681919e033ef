"""Writing files so that nothing is ever half-written: every file charrnn writes (a
checkpoint, config.toml, a trimmed metrics.jsonl, a viz page) goes through here.

A file is written to a temporary file in the same directory, fsynced and `os.replace`d
over its name, so a kill or a full disk at any instant leaves the old file or the new
one. The disk's own failures (full, read-only, no permission) become a CheckpointError
naming the file and saying what is left."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from charrnn.errors import CheckpointError


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call write(handle) on a temporary file, then rename it over path."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        problem = write_problem(err)
        if problem is None:
            raise
        kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
        raise CheckpointError(f"could not write {path}: {problem}; {kept}") from None
    _fsync_dir(path.parent)


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def append_line(path: str | Path, line: str) -> None:
    """Append one line (metrics.jsonl); a full disk is named as for atomic writes."""
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
    except OSError as err:
        problem = write_problem(err)
        if problem is None:
            raise
        raise CheckpointError(f"could not write {path}: {problem}; its earlier lines are intact") from None


def write_problem(err: BaseException) -> str | None:
    """A user's words for a failed write, or None when it is not one of the disk's doing."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full (free some space, then charrnn train --resume)"
    if isinstance(err, OSError) and err.errno == errno.EROFS:
        return "the file system is read-only (choose another --out)"
    if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM):
        return "permission denied (choose another --out)"
    # torch.save reports a short write from its C++ writer as a RuntimeError.
    if isinstance(err, RuntimeError) and any(s in str(err) for s in ("unexpected pos", "file write failed")):
        return "the disk is full (free some space, then charrnn train --resume)"
    return None


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # not supported on this platform (Windows)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
