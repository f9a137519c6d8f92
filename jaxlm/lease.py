"""One run per workdir: the lease a training run holds on its workdir from its start to its end.

    with lease.Lease(workdir, log=say):   # LeaseError (one line naming the holder) if another run holds it
        ...                                # the run: cache, checkpoints, metrics

Only training takes it (``jaxlm.run.run``; on a multi-process run process 0 alone, for the whole
run, and every process waits for it before writing anything). The read-only tools (eval, generate,
export, probe, the batch viewer) never do.

* A local (or shared-file-system) workdir: an exclusive ``fcntl.flock`` on ``WORKDIR/.lease``, held
  for the run's life; the kernel drops it when its holder dies, even by ``kill -9``, so a dead run
  never blocks the next one. The file holds a small JSON naming the holder (host, pid, since when,
  command) for the message of a run refused; it is removed at release.
* A ``gs://`` workdir: the object ``WORKDIR/.lease``, created only if absent (GCS's generation
  precondition ``ifGenerationMatch=0``) and rewritten every ``stale_s / 4`` seconds by a background
  thread, each time only if its generation is still the one this run wrote. A lease not renewed for
  ``stale_s`` (the holder's own, recorded in the lease) is stale, and so is one whose holder was a
  process of this machine that is gone (a rerun after a kill, a crash, or an exit that skipped the
  release: a peer lost on a multi-process run ends the process at once): the next run takes it over,
  again under a generation precondition, so of two takers one wins. A holder that finds its lease taken
  (it was paused or cut off for longer than that) ends its process at once with one ``error:``
  line. Release rewrites the object as released (under the precondition: never over a taker's).
  The staleness is the object's update time on the store's clock against this host's clock.
* Other object stores (``s3://``...): no lease (a warning says so).

``STALE_S`` (the ``JAXLM_LEASE_STALE_S`` environment variable overrides it: tests set seconds) is the
gs:// timeout; the renewal period is a quarter of it.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable
from urllib.parse import quote

import fsspec
import jax
from jax.experimental import multihost_utils

from jaxlm import distributed, paths
from jaxlm.errors import JaxlmError

NAME = ".lease"
STALE_S = 120.0  # a gs:// lease not renewed for this long may be taken over (renewed every STALE_S / 4)
_READ_TRIES = 20  # a holder writes its JSON just after it locks: a refused run reads again briefly


class LeaseError(JaxlmError, RuntimeError):
    """Another run holds the workdir's lease."""


def stale_s() -> float:
    """STALE_S, or $JAXLM_LEASE_STALE_S where set."""
    return float(os.environ.get("JAXLM_LEASE_STALE_S") or STALE_S)


def describe(holder: dict) -> str:
    """'process 123 on host-a (since 2026-12-07 12:00:00 UTC)' of a lease's JSON."""
    if "pid" not in holder:
        return "another run (its lease names no holder yet)"
    n = holder.get("processes", 1)
    of = f" (process 0 of a {n}-process run)" if n > 1 else ""
    return f"process {holder['pid']} on {holder.get('host', '?')}{of} (since {holder.get('since', '?')})"


class Lease:
    """The workdir's lease, held between ``__enter__`` and ``__exit__`` (see the module's docstring).

    `holder`: whether this process takes it (default: process 0); the others only wait at a barrier
    until it has. `log`: the warning lines (a stale gs:// lease taken over; a store without leases).
    `on_lost`: called with the error line's message when a gs:// renewal finds the lease taken over
    (default: print it and end the process)."""

    def __init__(self, workdir, *, holder: bool | None = None, log: Callable[[str], None] | None = None,
                 on_lost: Callable[[str], None] | None = None):
        self.workdir = paths.path(workdir)
        self.holder = jax.process_index() == 0 if holder is None else holder
        self.log = log or (lambda s: print(s, file=sys.stderr, flush=True))
        self.on_lost = on_lost or _stop_process
        self._impl: _FileLease | _ObjectLease | None = None

    def __enter__(self) -> "Lease":
        if self.holder:
            record = {**_machine(), "pid": os.getpid(), "processes": jax.process_count(), "since": _utc_now(),
                      "command": shlex.join(sys.argv), "token": uuid.uuid4().hex}
            impl = None
            if not paths.is_remote(self.workdir):
                impl = _FileLease(Path(self.workdir) / NAME, record, self.log)
            elif paths.scheme(os.fspath(self.workdir)) == "gs":
                paths.check_url(self.workdir, "--workdir")  # a missing bucket: its own line, not a failed write
                impl = _ObjectLease(self.workdir / NAME, record, self.log, self.on_lost)
            else:
                self.log(f"warning: --workdir={self.workdir}: jaxlm holds a lease on local and gs:// workdirs only; "
                         "two runs started on this one are not refused")
            if impl is not None:
                impl.acquire()
                self._impl = impl
        try:
            if jax.process_count() > 1:  # the others write nothing before process 0 holds the lease (if it
                multihost_utils.sync_global_devices("jaxlm.lease")  # fails, its failure ends them: distributed)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> bool:  # (also on errors and signals: the with statement's exit)
        if self._impl is not None:
            self._impl.release()
            self._impl = None
        return False


def _what_to_do(holder: dict) -> str:
    stop = (f"stop it (kill {holder['pid']} on {holder.get('host', 'its host')}: SIGTERM saves a checkpoint and "
            "exits)" if "pid" in holder else "stop it")
    return f"wait for it to finish, or {stop}, then run this command again to resume"


def _utc_now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())


def _stop_process(message: str) -> None:
    """A holder whose lease was taken over: its one error line (every process's, on a multi-process
    run), and the process ends now, before it writes another checkpoint into the other run's workdir."""
    if not distributed.claim_error_line():
        return
    logging.getLogger("jaxlm").info("error: %s", message)
    print(f"error: {message}", file=sys.stderr, flush=True)
    distributed.publish_failure(message)
    sys.stdout.flush()
    os._exit(1)


# --- a local workdir: flock ------------------------------------------------------------------------

class _FileLease:
    def __init__(self, path: Path, record: dict, log):
        self.path, self.record, self.log, self.fd, self.created = path, record, log, None, False

    def acquire(self) -> None:
        self.created = not self.path.parent.exists()  # a run refused before writing anything leaves no workdir
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise LeaseError(self._refusal(self._holder())) from None
            except OSError as e:  # a file system without locks (an NFS mount without its lock service)
                os.close(fd)
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                self.path.unlink(missing_ok=True)
                self.log(f"warning: --workdir={self.path.parent}: its file system does not support locks "
                         f"({e.strerror}); two runs started on this workdir are not refused")
                return
            except BaseException:
                os.close(fd)
                raise
            if self._is_current(fd):
                break
            os.close(fd)  # locked a file its releasing holder had just removed: lock the path's file again
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(self.record).encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def _is_current(self, fd: int) -> bool:
        """Whether `fd` is still the file at the lease's path (a release removes the file while locked)."""
        try:
            st, mine = os.stat(self.path), os.fstat(fd)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def _holder(self) -> dict:
        for _ in range(_READ_TRIES):
            try:
                holder = json.loads(self.path.read_bytes())
                if isinstance(holder, dict) and "pid" in holder:
                    return holder
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        return {}

    def _refusal(self, holder: dict) -> str:
        return (f"--workdir={self.path.parent} is in use by another run: {describe(holder)} holds its lease "
                f"{self.path}; {_what_to_do(holder)}")

    def release(self) -> None:
        if self.fd is None:
            return
        if self._is_current(self.fd):
            self.path.unlink(missing_ok=True)  # while still locked: see acquire
        os.close(self.fd)
        self.fd = None
        if self.created and not any(self.path.parent.iterdir()):
            self.path.parent.rmdir()


# --- a gs:// workdir: an object under generation preconditions -------------------------------------------

class _ObjectLease:
    def __init__(self, url, record: dict, log, on_lost):
        self.url, self.log, self.on_lost = url, log, on_lost
        self.fs, bucket_key = fsspec.core.url_to_fs(os.fspath(url))  # gcsfs: the client epath uses
        self.bucket, _, self.key = bucket_key.partition("/")
        self.stale_s = stale_s()
        self.record = {**record, "stale_s": self.stale_s, "renewed_at": time.time()}
        self.generation = None
        self._stop = threading.Event()
        self._thread = None

    def acquire(self) -> None:
        taken = self._take()
        try:  # (a signal during startup lands here too: the lease is released, not left to go stale)
            if taken is not None:
                self.log(f"warning: --workdir={self.url.parent}: took over the lease of {taken}")
            self._thread = threading.Thread(target=self._renew, name="jaxlm-lease", daemon=True)
            self._thread.start()
        except BaseException:
            self.release()
            raise

    def _take(self) -> str | None:
        """Writes the lease (self.generation): created, or over a released one, or over a dead holder's
        (then it returns whose, and why dead). LeaseError while another run holds it."""
        for _ in range(5):  # each pass loses only to another run writing the lease in between
            try:
                self.generation = self._put(self.record, 0)
                return None
            except FileExistsError:
                pass
            found = self._read()
            if found is None:  # gone in between
                continue
            generation, age, holder = found
            if holder.get("token") == self.record["token"]:  # our own create, retried after a lost answer
                self.generation = generation
                return None
            dead = _dead(holder, age, _holder_stale_s(holder, self.stale_s))
            if "released" not in holder and dead is None:
                raise LeaseError(self._refusal(holder, age))
            try:
                self.generation = self._put(self.record, generation)
            except FileExistsError:
                continue
            return None if "released" in holder else f"{describe(holder)}: {dead}"
        found = self._read()
        raise LeaseError(self._refusal(found[2] if found else {}, found[1] if found else 0.0))

    def _refusal(self, holder: dict, age: float) -> str:
        stale = _holder_stale_s(holder, self.stale_s)
        return (f"--workdir={self.url.parent} is in use by another run: {describe(holder)} holds its lease "
                f"{self.url}, renewed {age:.0f} s ago; {_what_to_do(holder)}; if it is certainly dead, its lease goes "
                f"stale {max(stale - age, 0):.0f} s from now ({stale:.0f} s after its last renewal) and the next run "
                "takes it over")

    def _renew(self) -> None:
        every = self.stale_s / 4
        while not self._stop.wait(every):
            try:
                self.generation = self._put({**self.record, "renewed": _utc_now(), "renewed_at": time.time()},
                                            self.generation)
            except FileExistsError:
                found = self._read()
                if found is not None and found[2].get("token") == self.record["token"]:
                    self.generation = found[0]  # our own write, retried after a lost answer
                    continue
                holder = found[2] if found else {}
                self.on_lost(f"--workdir={self.url.parent}: this run's lease was taken over by {describe(holder)} "
                             f"as this run did not renew it within its {self.stale_s:.0f} s timeout (paused, or cut off "
                             "from the store); it stops now so that one run alone writes the workdir")
                return
            except Exception as e:  # the store unreachable for a moment: again at the next period
                logging.getLogger("jaxlm").warning("lease %s: renewal failed (%s: %s)", self.url, type(e).__name__, e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:  # only our own generation: a taker's lease stays
            self._put({**self.record, "released": _utc_now()}, self.generation)
        except FileExistsError:
            pass
        except Exception as e:  # it goes stale instead
            logging.getLogger("jaxlm").warning("lease %s: release failed (%s: %s)", self.url, type(e).__name__, e)

    def _put(self, record: dict, if_generation: int) -> int:
        """Writes the lease object only if its generation is `if_generation` (0: only if there is none);
        returns the new generation. FileExistsError when the precondition fails (gcsfs's 412). A
        multipart upload, as gcsfs writes small objects, with the precondition gcsfs has no argument for."""
        meta = json.dumps({"name": self.key, "contentType": "application/json"})
        body = (f"--==0==\nContent-Type: application/json; charset=UTF-8\n\n{meta}\n--==0==\n"
                f"Content-Type: application/json\n\n{json.dumps(record)}\n--==0==--").encode()
        location = getattr(self.fs, "_location", None) or "https://storage.googleapis.com"
        out = self.fs.call("POST", f"{location}/upload/storage/v1/b/{quote(self.bucket, safe='')}/o",
                           uploadType="multipart", ifGenerationMatch=str(int(if_generation)),
                           headers={"Content-Type": 'multipart/related; boundary="==0=="'}, data=body, json_out=True)
        return int(out["generation"])

    def _read(self) -> tuple[int, float, dict] | None:
        """(generation, seconds since its last write, its JSON) of the lease object; None if there is none."""
        try:
            meta = self.fs.call("GET", "b/{}/o/{}", self.bucket, self.key, json_out=True)
            _, content = self.fs.call("GET", "b/{}/o/{}", self.bucket, self.key, alt="media")
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(content)
        except ValueError:
            holder = {}
        holder = holder if isinstance(holder, dict) else {}
        written = _timestamp(meta.get("updated", ""))  # the store's clock; else the holder's own
        if written is None:
            written = holder.get("renewed_at", time.time()) if isinstance(holder.get("renewed_at"), float) else time.time()
        return int(meta["generation"]), time.time() - written, holder


def _dead(holder: dict, age: float, stale: float) -> str | None:
    """Why a gs:// lease's holder is known dead (None while it may live): its lease is stale, or it was a
    process of this machine (same host name, boot and pid namespace) that is gone, which a rerun after
    a kill finds at once."""
    if age > stale:
        return f"not renewed for {age:.0f} s (its timeout: {stale:.0f} s), so presumed dead"
    if not isinstance(holder.get("pid"), int) or any(holder.get(k) != v for k, v in _machine().items()):
        return None
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return f"its process is gone (this machine; the lease was renewed {age:.0f} s ago)"
    except PermissionError:  # alive, another user's
        pass
    return None


def _machine() -> dict:
    """What tells this machine's processes from others' (a container's pids from its host's)."""
    def read(f):
        try:
            return Path(f).read_text().strip() if f.startswith("/proc/sys") else os.readlink(f)
        except OSError:
            return ""
    return {"host": socket.gethostname(), "boot_id": read("/proc/sys/kernel/random/boot_id"),
            "pid_ns": read("/proc/self/ns/pid")}


def _holder_stale_s(holder: dict, default: float) -> float:
    """The timeout a lease's holder renews for (recorded in it), else `default`."""
    try:
        return float(holder["stale_s"])
    except (KeyError, TypeError, ValueError):
        return default


def _timestamp(rfc3339: str) -> float | None:
    """Seconds since the epoch of GCS's '2026-12-07T12:23:21.713Z' (None if unreadable)."""
    head, _, frac = rfc3339.rstrip("Z").partition(".")
    try:
        t = datetime.datetime.strptime(head, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=datetime.timezone.utc)
    except ValueError:
        return None
    digits = "".join(c for c in frac if c.isdigit())
    return t.timestamp() + (float("0." + digits) if digits else 0.0)
