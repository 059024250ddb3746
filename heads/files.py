"""Writing files so that a crash, a full disk or a second process never leaves a half-written one."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: mkstemp creates 0600 files, renamed files get the usual permissions instead


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Write ``path`` through a temporary file beside it, renamed into place once complete.

    ``path`` is always either the old file or the whole new one; on any error (a full disk included) the
    temporary file is removed and the error re-raised.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, mode) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o666 & ~_UMASK)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def no_space_left(error: BaseException, folder: Path, size: int) -> bool:
    """Whether ``error``, raised while writing ``size`` bytes into ``folder``, means that its disk is full: ENOSPC
    (or EDQUOT, a full quota), raised or wrapped (``torch.save`` raises a ``RuntimeError`` "unexpected pos" whose
    context is the write's ENOSPC), or a ``RuntimeError`` while the disk has less than ``size`` bytes free."""
    seen, cause = set(), error
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return isinstance(error, RuntimeError) and shutil.disk_usage(folder).free < size


def mount_point(path: Path) -> Path:
    """The mount point of the disk that holds ``path`` (an existing file or folder)."""
    path = Path(path).resolve()
    while not os.path.ismount(path):
        path = path.parent
    return path


def write_once(root: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(folder)`` on a temporary sibling of ``root``, then rename it into place: ``root`` is
    either complete or absent, and when two processes race, the first rename wins."""
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        write(staging)
        try:
            os.replace(staging, root)
        except OSError:
            if not root.exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
