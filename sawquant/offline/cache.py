"""The user cache directory, and building one directory in it once: atomic, locked.

:func:`build_once` runs a build into a temporary directory next to the target and renames it
into place, so an interrupted run leaves no half copy; a file lock keeps concurrent processes
from building twice, and temporary directories of killed runs are removed by the next build.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from sawquant.errors import InputError

__all__ = ["build_once", "cache_root", "is_complete"]

# What every converted checkpoint in the cache holds; a directory without them is not one.
_COMPLETE_FILES = ("config.json", "model.safetensors")


def cache_root() -> Path:
    """``$SAWQUANT_CACHE``, else ``$XDG_CACHE_HOME/sawquant``, else ``~/.cache/sawquant``."""
    if os.environ.get("SAWQUANT_CACHE"):
        return Path(os.environ["SAWQUANT_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "sawquant"


def is_complete(target: Path) -> bool:
    return all((target / name).is_file() for name in _COMPLETE_FILES)


def build_once(
    target: Path,
    build: Callable[[Path], None],
    *,
    prefix: str,
    stale: str | None = None,
    announce: Callable[[], None] | None = None,
) -> Path:
    """``target`` (in the cache root), built by ``build(tmp_dir)`` unless already complete.

    ``prefix`` names the lock (``.{prefix}.lock``) and the temporary directories
    (``.{prefix}-tmp-*``); directories beside the target matching the glob ``stale`` (older
    conversions of the same model) are deleted after a build. ``announce()`` is called once,
    just before a build starts.
    """
    root = target.parent
    if is_complete(target):
        _readable_by_all(target)
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(
            f"cannot create the cache directory {str(root)!r} ({_first_line(err)}); "
            "set SAWQUANT_CACHE to a writable directory"
        ) from err
    with _file_lock(root / f".{prefix}.lock") as exclusive:
        if is_complete(target):  # another process built it while we waited
            return target
        if exclusive:  # every builder holds the lock: temp dirs seen now are from killed runs
            for leftover in root.glob(f".{prefix}-tmp-*"):
                shutil.rmtree(leftover, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{prefix}-tmp-", dir=root))
        if announce is not None:
            announce()
        try:
            build(tmp)
            _readable_by_all(tmp)
            if target.exists():  # a stale, incomplete copy from an older layout
                shutil.rmtree(target)
            os.replace(tmp, target)
            if stale is not None:
                _remove_stale_copies(target, stale)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _remove_stale_copies(keep: Path, pattern: str) -> None:
    """Delete older copies of the same model (about 0.5-1 GB each)."""
    for old in keep.parent.glob(pattern):
        if old != keep and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)


def _readable_by_all(directory: Path) -> None:
    """Give the cache copy the usual umask permissions (transformers writes its weights 0600;
    exports hard-link them, so a private file would make every export private too)."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        want = 0o666 & ~umask
        if path.is_file() and (path.stat().st_mode & 0o777) != want:
            try:
                path.chmod(want)
            except OSError:  # a cache copy owned by another user: leave it
                pass


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[bool]:
    """Hold an exclusive lock on ``path``; yields False where there is no flock (Windows)."""
    try:
        import fcntl
    except ImportError:  # Windows: the atomic rename alone keeps the cache consistent
        yield False
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
