"""The files a run folder is the only copy of: written atomically on any filesystem, and the
folder held by one run at a time.

Atomic: a file is written beside its destination (same folder, so the same filesystem), flushed
and fsynced, then ``os.replace``d over it, and the folder fsynced, so that a kill or a full disk
at any moment leaves either the old file or the new one, never a mix. (A temporary file in
``$TMPDIR`` moved into place, as fsspec's local transaction does, is a copy over the old file
whenever ``$TMPDIR`` is on another filesystem: a node-local disk beside NFS or Lustre.)

Held: a run takes an exclusive POSIX lock on ``FOLDER/.selfsup.lock`` for as long as its process
lives; the system releases it when the process ends, however it ends, so a killed run leaves no
stale lock. A second run on the same folder stops in one line naming the process that holds it.
"""

from __future__ import annotations

import errno
import fcntl
import io
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from selfsup import SelfsupError
from selfsup.console import say

LOCK_NAME = ".selfsup.lock"


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (and all of Windows) refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def _human(n: int) -> str:
    """A byte count the way ``df -h`` prints it: 1.2 GB, 340 MB, 12 kB."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def write_atomic(path: str | Path, data: bytes | str | Callable[[IO[bytes]], None], what: str = "") -> None:
    """Write ``data`` (bytes, text, or a function that writes to a binary file) to ``path``
    atomically: the old file stays whole until the new one is complete on disk.

    A full disk (or quota) stops in one line naming the folder, the space needed and the file
    that is kept, ``what`` (e.g. "the last good checkpoint is ..."); the partial file is removed.
    """
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    if callable(data):  # serialized first: its size is known for the message, and a failure writes nothing
        buffer = io.BytesIO()
        data(buffer)
        payload = buffer.getbuffer()
    else:
        payload = memoryview(data.encode() if isinstance(data, str) else data)
    tmp = folder / f".{path.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            kept = what or (f"{path} is kept as it was" if path.exists() else f"{path} was not written")
            raise SelfsupError(
                f"no space left in {folder} to write {path.name} ({_human(len(payload))} needed, "
                f"{_human(_free(folder))} free); {kept}"
            ) from None
        if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise SelfsupError(f"cannot write in {folder} ({e.strerror}): choose a folder you can write to") from None
        raise
    _fsync_folder(folder)


def _free(folder: Path) -> int:
    try:
        st = os.statvfs(folder)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


#: Locks held by this process: folder -> open lock file (kept open: closing it releases the lock).
_held: dict[Path, IO[str]] = {}


def hold_folder(folder: str | Path, command: str = "selfsup") -> None:
    """Hold ``folder`` for this process until it ends (or :func:`release_folder`); a folder held
    by another live process stops in one line naming its process, host and start time.

    Holding a folder this process holds already does nothing, so a pipeline's stages may hold
    their own folders inside the pipeline's."""
    folder = Path(folder).resolve()
    if folder in _held:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        f = open(folder / LOCK_NAME, "a+")  # noqa: SIM115 (kept open: the lock lives as long as the file)
    except OSError as e:
        raise SelfsupError(f"cannot write in {folder} ({e.strerror}): choose a folder you can write to") from None
    try:
        # A POSIX record lock, not flock(): it belongs to this process alone. A flock() is shared
        # with the data loader's workers forked from it, which outlive a killed run by seconds
        # and would refuse its re-run.
        fcntl.lockf(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise SelfsupError(
                f"{folder} is in use by {holder}: two runs in one folder would overwrite each other's "
                "checkpoints; wait for it to end, or give this run its own folder"
            ) from None
        if e.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            # Lustre mounted with -o noflock, some NFS setups: run unguarded rather than not at all.
            say(f"note: {folder} is on a filesystem without file locks: a second run there would not be stopped")
            return
        raise
    f.seek(0)
    f.truncate()
    f.write(
        f"{command} (process {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')})\n"
    )
    f.flush()
    _held[folder] = f


def release_folder(folder: str | Path) -> None:
    """Let other runs use ``folder`` (held by :func:`hold_folder`)."""
    f = _held.pop(Path(folder).resolve(), None)
    if f is not None:
        f.close()
