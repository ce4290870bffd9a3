"""Atomic writes: temp file or folder beside the target, fsync, rename.

A reader never sees a half-written output, and a failure leaves the old file (if any) untouched. Without
``overwrite`` the final rename never replaces a path that appeared while the output was being written (two
writers racing to one output: the second gets :class:`OutputExistsError`, the first's output stays).

Temporaries are named ``.<output name>.<pid>.<random>.tmp`` (``.old`` while a folder is swapped). A process
killed with SIGKILL leaves its temporary behind; the next write of the same output removes the
temporaries whose process is gone (:func:`clean_stale`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ..errors import OutputExistsError

_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_output(path: str | os.PathLike[str], overwrite: bool) -> Path:
    """Refuse to write over an existing path unless ``overwrite`` is set."""
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise OutputExistsError("output exists; pass overwrite=True (CLI: --overwrite) to replace it", path=path)
    return path


def _renameat2() -> object | None:
    lib = ctypes.util.find_library("c")
    func = getattr(ctypes.CDLL(lib, use_errno=True), "renameat2", None) if lib else None
    if func is not None:
        func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return func


_RENAMEAT2 = _renameat2() if os.name == "posix" else None


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; raise :class:`OutputExistsError` if ``dst`` exists, atomically where the
    system allows (Linux ``renameat2(RENAME_NOREPLACE)``; a hard link then unlink for files elsewhere)."""
    if _RENAMEAT2 is not None:
        if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise OutputExistsError("output appeared while it was being written (another writer?); "
                                    "nothing was replaced", path=dst)
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EPERM):  # the file system lacks the flag: fall back
            raise OSError(err, os.strerror(err), str(dst))
    if src.is_dir():
        if dst.exists() or dst.is_symlink():
            raise OutputExistsError("output appeared while it was being written; nothing was replaced", path=dst)
        os.rename(src, dst)
        return
    try:
        os.link(src, dst)
    except FileExistsError:
        raise OutputExistsError("output appeared while it was being written; nothing was replaced", path=dst) from None
    os.unlink(src)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(path: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporaries of earlier writes of ``path`` whose process no longer runs; returns them."""
    path = Path(path)
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)\.[^.]+\.(tmp|old)$")
    removed = []
    with contextlib.suppress(OSError):
        for entry in path.parent.iterdir():
            m = pattern.match(entry.name)
            if m and not _alive(int(m.group(1))) and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed


def _prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[BinaryIO]:
    """Open a temp file beside ``path``; on clean exit fsync it and rename it onto ``path`` (replacing an
    existing file only with ``overwrite``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            rename_noreplace(Path(tmp), path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside ``path``; on clean exit move it into place (replacing the old one if asked)."""
    path = check_output(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        if overwrite and path.exists():
            old = Path(tempfile.mkdtemp(prefix=_prefix(path), suffix=".old", dir=path.parent))
            os.rmdir(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            rename_noreplace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
