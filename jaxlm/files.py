"""Writing files so that a kill never leaves half of one: every file jaxlm rewrites goes through here.

``atomic_write(path, data)`` writes a temporary sibling, flushes it to disk and renames it over
`path` (``os.replace``, atomic on POSIX file systems): a reader, or a run resumed after ``kill -9``,
sees the old content or the new one, never a torn or empty file. Permissions are the usual 0644
(less the umask), whatever the temporary file was created with. An object-store URL (``gs://``)
is written in one request: an object upload is atomic on GCS and S3.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from jaxlm import paths


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Replaces `path` with `data` (text is UTF-8) in one step; returns the path."""
    if paths.is_remote(path):
        remote = paths.path(path)
        remote.write_bytes(data.encode() if isinstance(data, str) else data)
        return remote
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any, **kw) -> Path:
    return atomic_write(path, json.dumps(obj, **kw))
