"""One writer per folder: an exclusive OS file lock on ``FOLDER/.lock`` for as long as a job writes there.

``flock`` locks belong to the open file, so the kernel drops them when the process ends however it ends
(SIGKILL, OOM, a node's Slurm job killed): a crashed run never blocks its own resume, and a requeued job
gets the lock as soon as its predecessor is gone. The holder writes its PID and host into the file, so a
refused second job can say who holds it. Forked children (DataLoader workers) close their copy, so a
worker outliving a killed parent for a moment does not keep the folder locked.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from pipeline.config import ConfigError

LOCK_FILE = ".lock"
_HELD: set[int] = set()  # descriptors of the locks this process holds (closed in forked children)


class FolderBusy(ConfigError):
    """Another process holds the folder's lock; the message names its PID and host."""


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    return text or "another process (PID unknown)"


def requeue_wait_s() -> float:
    """A requeued Slurm job may start while its predecessor's processes are still being killed: it waits
    this long for the lock to be released instead of failing at once."""
    return 120.0 if int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0 else 0.0


@contextmanager
def folder_lock(folder: str | Path, what: str, command: str, wait_s: float = 0.0) -> Iterator[Path]:
    """Hold ``FOLDER/.lock`` exclusively for the ``with`` block; refuse (:class:`FolderBusy`, one line
    naming the holder's PID and host) when another process still holds it after ``wait_s`` seconds.
    ``what`` names the folder in the message (``run_dir``, ``output``), ``command`` the job."""
    path = Path(folder) / LOCK_FILE
    deadline = time.monotonic() + wait_s
    fd = -1
    try:
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise
                os.close(fd)
                time.sleep(1.0)
                continue
            if _same_file(fd, path):
                break
            os.close(fd)  # locked the file of a holder that removed it on its way out: lock the new one
    except BlockingIOError:
        _close(fd)
        raise FolderBusy(
            f"{what}: {str(folder)!r} is in use by {_holder(path)} (a {command} job writing there); "
            "wait for it to end, or use another folder"
        ) from None
    except OSError as e:  # a file system without locks (some Lustre/NFS mounts): warn, do not refuse
        _close(fd)
        print(
            f"[{command}] warning: {what}: cannot lock {str(path)!r} ({e.strerror or e}): nothing stops a "
            "second job from writing there",
            flush=True,
        )
        yield path
        return
    _HELD.add(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"PID {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        yield path
    finally:
        _HELD.discard(fd)
        with suppress(OSError):  # a job refused before it wrote anything leaves the folder as it was
            if [p.name for p in Path(folder).iterdir()] == [LOCK_FILE]:
                path.unlink()
        os.close(fd)  # the last descriptor of the open file: the lock is released


def _close(fd: int) -> None:
    if fd >= 0:
        with suppress(OSError):
            os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (st.st_dev, st.st_ino)


def _close_held_in_child() -> None:
    for fd in _HELD:
        with suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_in_child)
