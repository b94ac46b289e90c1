"""Files that survive crashes: written through a temp file, fsync and rename, with the user's umask,
and one fixed temp name per target so an interrupted write leaves nothing the next one does not replace."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["atomic_write", "remove_stale_temp", "temp_path", "write_error"]


def temp_path(path: str | os.PathLike) -> Path:
    """Where :func:`atomic_write` stages ``path``: one fixed name per target, so a save interrupted by
    SIGKILL or a power cut leaves at most one stray file, which the next save of the target replaces."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp")


# Temp names of older versions (``tempfile.mkstemp``: ``.<name>.<8 random chars><suffix>``).
_OLD_TEMP = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.(tmp|png|gif)$")


def remove_stale_temp(path: str | os.PathLike) -> list[Path]:
    """Delete the temp files an interrupted save of ``path`` left next to it; returns them."""
    path = Path(path)
    gone = []
    try:
        candidates = [p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")]
    except OSError:  # the directory does not exist (yet)
        return gone
    for p in candidates:
        m = _OLD_TEMP.match(p.name)
        if p == temp_path(path) or (m is not None and m.group("name") == path.name):
            with contextlib.suppress(OSError):
                p.unlink()
                gone.append(p)
    return gone


def write_error(path: str | os.PathLike, e: BaseException) -> OSError:
    """One line naming ``path`` for a failed write (a full disk, a quota, an I/O error): a flush's or
    torch.save's own error does not name the file."""
    errno = getattr(e, "errno", None)
    why = getattr(e, "strerror", None) or " ".join(str(e).split())[:200]
    if errno == 28:  # ENOSPC
        why = "No space left on device (the disk is full)"
    elif not isinstance(e, OSError):  # torch.save's RuntimeError does not say why
        why = f"the write failed; is the disk full? ({why[:160]})"
    err = OSError(f"cannot write {path}: {why}")
    err.errno = errno
    return err


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Write ``path`` through :func:`temp_path`: ``write(f)``, flush, fsync, then rename over ``path``.

    A crash at any point leaves either the old file or the new one, never a torn file. The file is
    created with mode 0o666 minus the umask (as ``open`` does; ``mkstemp`` would make it 0o600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # left by an interrupted save; O_EXCL below also refuses a planted symlink
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        # torch.save reports a failed write as a RuntimeError ("... failed writing file ...")
        if isinstance(e, OSError) or (isinstance(e, RuntimeError) and ("failed writing" in str(e)
                                                                       or "write failed" in str(e))):
            raise write_error(path, e) from None
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path
