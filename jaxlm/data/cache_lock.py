"""The token cache's build directory: its lock, its temporary directories, and publishing them.

A build works in ``tokens/.build-<key>/``, held by an exclusive ``fcntl`` lock on its ``lock`` file
(released by the kernel when its owner dies, even by SIGKILL), with the holder described in
``owner.json`` for the messages of those waiting. A finished directory is moved into place with one
``rename`` (``publish``), so a reader never sees half of one.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
import uuid
from pathlib import Path

from jaxlm.data import tokenizer as tok_lib
from jaxlm.errors import DataError

_POLL_S = 2.0  # how often a waiting builder looks again


def publish(tmp: Path, final: Path) -> Path:
    """Atomically moves a finished temp directory into place (another builder may have won)."""
    try:
        os.rename(tmp, final)
    except OSError:
        if (final / "manifest.json").exists() or tok_lib.stored(final):
            shutil.rmtree(tmp, ignore_errors=True)  # same content, built concurrently
        else:
            raise
    return final


def tmp_dir(parent: Path, name: str) -> Path:
    """A fresh temporary directory under `parent`, named after its owner (host and process id), after
    removing any earlier one whose owner on this host is gone (a build killed with SIGKILL)."""
    parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    for old in parent.glob(f".tmp-*-{host}-*"):
        pid = old.name.rsplit("-", 2)[-2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    tmp = parent / f".tmp-{name}-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True




class _Lock:
    """An exclusive ``fcntl`` lock on ``<work>/lock`` (the kernel drops it when its holder dies), with
    the holder described in ``<work>/owner.json`` for the messages of those waiting."""

    def __init__(self, work: Path):
        self.work, self.fd = work, None

    def try_acquire(self) -> bool:
        self.work.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.work / "lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        (self.work / "owner.json").write_text(json.dumps(
            {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        return True

    def owner_info(self) -> dict:
        try:
            return json.loads((self.work / "owner.json").read_text())
        except (OSError, ValueError):
            return {}

    def owner(self) -> str:
        o = self.owner_info()
        try:
            return f"process {o['pid']} on {o['host']} (since {o['since']})"
        except KeyError:
            return "another process"

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def hold(work: Path, final: Path, log, wait_s: float) -> _Lock | None:
    """The build lock for `final`, or None once another builder has published it (waits while a
    live builder holds it, up to `wait_s`)."""
    lock = _Lock(work)
    t0, said = time.monotonic(), False
    while True:
        if (final / "manifest.json").exists():
            return None
        if lock.try_acquire():
            if (final / "manifest.json").exists():  # published between the check and the lock
                shutil.rmtree(work, ignore_errors=True)
                lock.release()
                return None
            return lock
        if time.monotonic() - t0 > wait_s:
            raise DataError(
                f"{final}: {lock.owner()} has been building this token cache for over {wait_s:.0f}s (it holds "
                f"{work / 'lock'}); wait for it, stop it, or use another data.cache_dir")
        o = lock.owner_info()
        if o.get("pid") == os.getppid() and o.get("host") == socket.gethostname():
            raise DataError(
                f"{final}: this is a tokenizing worker process of the build, building again: data.workers > 1 "
                "starts its processes with spawn, which imports the main module, and the main module starts a "
                "build at import; guard that code with `if __name__ == \"__main__\":`")
        if not said:
            log(f"waiting for {lock.owner()}, which is building {final}")
            said = True
        time.sleep(min(_POLL_S, max(wait_s, 0.01)))
