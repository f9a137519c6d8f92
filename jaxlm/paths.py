"""Local paths and object-store URLs (``gs://bucket/dir``; ``s3://`` and the other fsspec schemes
where the same code works) behind one small interface, over ``etils.epath`` (which Orbax uses).

* ``path(p)``: a ``pathlib.Path`` for a local path (so local behaviour is exactly pathlib's), an
  ``epath.Path`` for a URL. Both take ``/``, ``exists``, ``read_text``, ``write_bytes``, ``iterdir``.
* ``check_url(p, what)``: fails with one line before anything compiles when a URL's scheme is
  unknown, its bucket is missing or there are no credentials.
* ``machine_cache()``: this machine's cache directory (``$JAXLM_CACHE``, else ``$XDG_CACHE_HOME/jaxlm``,
  else ``~/.cache/jaxlm``): tokenizers and token caches by default, the mirrors of URLs.
* ``mirror(p)``: a local directory standing for a URL, for what must be a local file (memory-mapped
  token rows, log files, wandb): ``machine_cache()/mirror/<hash>``.
* ``publish(local_dir, url)`` / ``committed(url)``: commit semantics that hold on object stores,
  which have no atomic directory rename: a directory is uploaded file by file and its commit object
  (``.jaxlm-commit.json``, the list of files and sizes) is written last; readers trust nothing
  without it. ``pull(url, local_dir)`` downloads a committed directory, checking the sizes.

A single object write is atomic on GCS and S3 (readers see the old object or the new one), so
``jaxlm.files.atomic_write`` writes URLs directly.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Union

from etils import epath

from jaxlm.errors import ConfigError

AnyPath = Union[Path, epath.Path]
COMMIT = ".jaxlm-commit.json"
SCHEMES = ("gs", "s3", "az", "hf")  # the URL schemes epath hands to fsspec
_CHUNK = 16 << 20  # bytes per read/write when copying to and from a store


def scheme(p) -> str | None:
    s = os.fspath(p) if not isinstance(p, str) else p
    head, sep, _ = s.partition("://")
    return head if sep else None


def is_remote(p) -> bool:
    return scheme(p) is not None


def path(p) -> AnyPath:
    """pathlib for local paths, epath for URLs (a URL of an unknown scheme is a ConfigError)."""
    if isinstance(p, epath.Path) and not isinstance(p, Path):
        return p
    s = os.fspath(p)
    sch = scheme(s)
    if sch is None:
        return Path(s)
    if sch not in SCHEMES:
        raise ConfigError(f"{s}: unknown URL scheme {sch!r}; use a local path or one of "
                          f"{', '.join(x + '://' for x in SCHEMES)}")
    return epath.Path(s)


def resolve(p) -> AnyPath:
    """Absolute: local paths resolved, URLs as they are."""
    q = path(p)
    return q if is_remote(q) else q.resolve()


def check_url(p, what: str) -> None:
    """For a URL: its scheme is known, its bucket exists and can be listed with the credentials at
    hand. One ConfigError naming `what` otherwise; local paths pass."""
    if not is_remote(p):
        return
    try:
        q = path(p)
    except ConfigError as e:
        raise ConfigError(f"{what}={e}") from None
    bucket = f"{scheme(os.fspath(q))}://{os.fspath(q).split('://', 1)[1].split('/', 1)[0]}"
    _check_connection(bucket, what, p)
    try:
        found = epath.Path(bucket).exists()
    except ImportError as e:
        raise ConfigError(f"{what}={p}: {e}; install the file-system package for this scheme "
                          "(gcsfs for gs://, s3fs for s3://)") from None
    except Exception as e:  # credentials, network: the library's own words, on one line
        msg = " ".join(str(e).split())[:300]
        raise ConfigError(f"{what}={p}: cannot reach {bucket} ({type(e).__name__}: {msg}); check the "
                          "credentials (gcloud auth application-default login, or the VM's service account)") from None
    if not found:
        raise ConfigError(f"{what}={p}: bucket {bucket} does not exist (or these credentials cannot see it)")


CONNECT_TIMEOUT_S = 5.0


def _check_connection(bucket: str, what: str, p) -> None:
    """For gs://: one TCP connection to the endpoint gcsfs would use (``$STORAGE_EMULATOR_HOST``, else
    storage.googleapis.com:443), so a machine without a route fails in seconds, not after the
    client's minute of retries."""
    if not bucket.startswith("gs://"):
        return
    emulator = os.environ.get("STORAGE_EMULATOR_HOST", "")
    hostport = emulator.split("://", 1)[-1].split("/", 1)[0] if emulator else "storage.googleapis.com:443"
    host, _, port = hostport.rpartition(":") if ":" in hostport else (hostport, "", "")
    port = int(port) if port.isdigit() else (80 if emulator.startswith("http://") else 443)
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise ConfigError(f"{what}={p}: cannot reach {bucket} (no connection to {host}:{port} within "
                          f"{CONNECT_TIMEOUT_S:.0f} s: {e.strerror or type(e).__name__}); check the network, and the "
                          "credentials (gcloud auth application-default login, or the VM's service account)") from None


def machine_cache() -> Path:
    """This machine's jaxlm cache: ``$JAXLM_CACHE``, else ``$XDG_CACHE_HOME/jaxlm``, else ``~/.cache/jaxlm``
    (as HF's ``HF_HOME`` and ``~/.cache/huggingface``): one per machine, so one per host on a pod."""
    for name in ("JAXLM_CACHE", "JAXLM_LOCAL_CACHE"):  # (JAXLM_LOCAL_CACHE: its name before it held the data caches)
        if os.environ.get(name):
            return Path(os.environ[name]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "jaxlm"


def mirror(p) -> Path:
    """A local directory standing for URL `p` (the same directory for the same URL on this machine)."""
    root = machine_cache()
    digest = hashlib.sha256(os.fspath(p).rstrip("/").encode()).hexdigest()[:16]
    return root / "mirror" / digest


def committed(url) -> dict | None:
    """The commit record of a published directory, or None if it is absent or incomplete."""
    f = path(url) / COMMIT
    try:
        return json.loads(f.read_text()) if f.exists() else None
    except (ValueError, OSError):
        return None


def publish(local: Path, url) -> None:
    """Uploads the files under `local` to `url`, then the commit object listing them (last)."""
    dest = path(url)
    files = sorted(p for p in Path(local).rglob("*") if p.is_file() and p.name != COMMIT)
    listing = {}
    for f in files:
        rel = f.relative_to(local).as_posix()
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(f, "rb") as src, target.open("wb") as dst:  # streamed: token rows may be many GB
            shutil.copyfileobj(src, dst, _CHUNK)
        listing[rel] = f.stat().st_size
    (dest / COMMIT).write_text(json.dumps({"files": listing}, sort_keys=True))


def pull(url, local: Path, exclude: tuple[str, ...] = ()) -> bool:
    """Downloads committed directory `url` into `local` (missing or wrong-sized files only, none of
    `exclude`); False if `url` is not committed."""
    record = committed(url)
    if record is None:
        return False
    src = path(url)
    for rel, size in record["files"].items():
        if rel in exclude:
            continue
        target = Path(local) / rel
        if target.is_file() and target.stat().st_size == size:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.part")
        with (src / rel).open("rb") as remote, open(tmp, "wb") as out:  # streamed, like publish
            shutil.copyfileobj(remote, out, _CHUNK)
        got = tmp.stat().st_size
        if got != size:
            tmp.unlink()
            raise ConfigError(f"{src / rel}: {got} bytes where its commit record says {size}; the upload "
                              "was changed after it was committed")
        os.replace(tmp, target)
    return True
