"""An exclusive lock on a run directory, so that two writers never share one (issue 11).

The lock is the file ``<run>/.dsom.lock`` holding the writer's pid, locked with ``flock``: the kernel drops
the lock when its holder dies, so a lock left by a crashed or killed run is stale by construction and is
taken over (with a log line naming the dead pid). A second writer while the holder lives gets a
:class:`~dsom.errors.DsomError` (exit 2) naming the holder's pid. Where ``fcntl`` is missing (Windows), the
file is created exclusively and a stale one is recognised by its pid no longer running.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

from dsom.errors import DsomError

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Linux/macOS
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("dsom")

LOCK_NAME = ".dsom.lock"


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _read_pid(fd: int) -> int | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 64).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


class RunLock:
    """``with RunLock(run_dir): ...`` or :meth:`acquire` / :meth:`release`. Creates ``run_dir`` if needed."""

    def __init__(self, run_dir: str | Path) -> None:
        self.dir = Path(run_dir)
        self.path = self.dir / LOCK_NAME
        self.fd: int | None = None

    def _busy(self, pid: int | None) -> DsomError:
        who = f"pid {pid}" if pid else "another process"
        return DsomError(f"run directory {self.dir} is in use by another dsom process ({who}, lock file "
                         f"{self.path}); wait for it to finish or choose another -o")

    def acquire(self) -> RunLock:
        if self.dir.exists() and not self.dir.is_dir():
            raise DsomError(f"-o {self.dir}: exists and is not a directory; choose another -o")
        self.dir.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            return self._acquire_exclusive_create()
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                pid = _read_pid(fd)
                os.close(fd)
                if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise self._busy(pid) from None
                raise
            # The holder we waited behind may have unlinked the file before we locked it: lock the file
            # that is at the path now.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            old = _read_pid(fd)
            if old and old != os.getpid():
                log.info("run directory %s: taking over the stale lock of pid %d (no longer running)", self.dir, old)
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, f"{os.getpid()}\n".encode("ascii"))
            self.fd = fd
            return self
        raise self._busy(None)

    def _acquire_exclusive_create(self) -> RunLock:  # fallback without fcntl (tests/test_exit_codes.py)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                fd = os.open(self.path, os.O_RDONLY)
                pid = _read_pid(fd)
                os.close(fd)
                if pid is not None and _pid_alive(pid):
                    raise self._busy(pid) from None
                log.info("run directory %s: removing the stale lock of pid %s", self.dir, pid)
                self.path.unlink(missing_ok=True)
                continue
            os.write(fd, f"{os.getpid()}\n".encode("ascii"))
            self.fd = fd
            return self
        raise self._busy(None)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # unlinked while still held: see the samestat check above
        except OSError:
            pass
        os.close(self.fd)  # closing drops the flock
        self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
