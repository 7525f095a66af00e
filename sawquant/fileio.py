"""Writing results safely: output paths checked before the work starts, atomic replacement.

Every file sawquant writes for a user (calibration JSON, verify report, plots) goes through
``check_output_file`` at the start of the command, so a bad ``-o`` fails in a second instead of
after an hour of work, and through ``write_atomic``, so an interrupted or failed write leaves the
old file (or nothing) behind, never half a file.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from sawquant.errors import InputError

__all__ = ["check_output_file", "describe_os_error", "write_atomic", "write_text_atomic"]


def describe_os_error(err: OSError) -> str:
    """A short reason for a failed write, with the fix when there is an obvious one."""
    if err.errno == errno.ENOSPC:
        return "no space left on the device; free some space or write elsewhere"
    if err.errno == errno.EROFS:
        return "the filesystem is read-only; write to a writable directory"
    if err.errno in (errno.EACCES, errno.EPERM):
        return "permission denied; write to a directory you own"
    return (err.strerror or str(err)).rstrip(".")


def check_output_file(path: str | os.PathLike, what: str) -> Path:
    """Raise InputError now unless ``path`` can be written: its directory exists and is
    writable, and ``path`` is not a directory. Returns the path (``~`` expanded)."""
    path = Path(path).expanduser()
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise InputError(f"{what} {str(path)!r} is a directory; give a file name")
    if not parent.is_dir():
        raise InputError(
            f"the directory of {what} {str(path)!r} does not exist; create {str(parent)!r} "
            "first or choose another path"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(
            f"cannot write {what} {str(path)!r}: directory {str(parent)!r} is not writable; "
            "choose another path"
        )
    return path


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None], what: str) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``.

    A failure (disk full, read-only filesystem, Ctrl-C) removes the temporary file and leaves
    ``path`` as it was; OSErrors become one-line InputErrors naming ``what``.
    """
    path = check_output_file(path, what)
    parent = path.parent if str(path.parent) else Path(".")
    tmp = None
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
        os.close(fd)
        tmp = Path(name)
        write(tmp)
        # mkstemp makes the file private; results get the usual umask permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
        tmp = None
    except OSError as err:
        raise InputError(f"cannot write {what} {str(path)!r}: {describe_os_error(err)}") from err
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()
    return path


def write_text_atomic(path: str | os.PathLike, text: str, what: str) -> Path:
    """``write_atomic`` for text (UTF-8), flushed to disk before the rename."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())

    return write_atomic(path, write, what)
