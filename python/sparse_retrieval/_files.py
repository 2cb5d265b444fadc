"""Atomic file writes, shared by every file the library writes."""
from __future__ import annotations

import os
import secrets
import threading
from pathlib import Path
from typing import BinaryIO, Callable


def write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Calls ``write(f)`` on a temporary file in ``path``'s folder, fsyncs it, renames it over ``path`` and fsyncs
    the folder: a crash leaves the old file or the new one, never a mix. The temporary name is unique per process,
    thread and call, so concurrent writes to one path each write their own file and the last rename wins whole;
    temporaries of earlier writes whose process is gone (killed) are deleted first."""
    _remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _remove_stale_temporaries(path: Path) -> None:
    """Deletes temporary files of earlier writes to ``path`` whose process is gone (a killed save)."""
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        try:
            pid = int(tmp.name.rsplit(".tmp-", 1)[1].split("-", 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except (ValueError, PermissionError, OSError):
            pass  # not ours to judge: a name we did not write, or a live process of another user
