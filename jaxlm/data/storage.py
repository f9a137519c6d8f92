"""Corpus files on a local disk or an object store (``gs://``), behind three functions the sources use.

``expand(pattern, field)``  the files a glob matches, sorted (local: ``glob`` with ``**``; a URL:
                            fsspec's glob on the store), or one ``DataError`` naming the field;
``open_binary(path)``       a binary file object (``.gz`` decompressed), seekable where the store is;
``fingerprint(paths)``      names, sizes and modification stamps (generation/ETag on a store): cheap,
                            and changed by any rewrite, so it keys the caches.

A corpus path is a ``str``: a local path or a URL. Local files stay plain ``open``; URLs go through
fsspec (gcsfs for ``gs://``), which is what ``etils.epath`` in ``jaxlm.paths`` uses too.
"""

from __future__ import annotations

import glob as glob_lib
import gzip
import hashlib
import os
from pathlib import Path

import fsspec

from jaxlm import paths
from jaxlm.errors import DataError


def _fs(url: str):
    fs, _ = fsspec.core.url_to_fs(url)
    return fs


def expand(pattern: str, field: str) -> list[str]:
    """The files `pattern` matches, sorted; one DataError when none do."""
    if paths.is_remote(pattern):
        scheme = paths.scheme(pattern)
        try:
            fs = _fs(pattern)
            found = sorted(f"{scheme}://{p}" for p in fs.glob(pattern.split("://", 1)[1])
                           if fs.isfile(p))
        except DataError:
            raise
        except Exception as e:  # credentials, network: the library's words on one line
            raise DataError(f"data.source={field}:{pattern!r}: cannot list it ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:200]})") from None
        where = "in the bucket"
    else:
        # sorted as paths (by component), as the corpus order always was
        found = [str(p) for p in sorted(Path(p) for p in glob_lib.glob(pattern, recursive=True) if Path(p).is_file())]
        where = f"relative to {Path.cwd()}"
    if not found:
        raise DataError(
            f"data.source={field}:{pattern!r} matched no files ({where}); "
            "check the pattern (use ** for subdirectories) or the working directory"
        )
    return found


def open_binary(path: str, decompress: bool = True):
    """A binary file object for `path` (gzip-decompressed for ``.gz`` unless `decompress` is False)."""
    f = _fs(path).open(path, "rb") if paths.is_remote(path) else open(path, "rb")
    return gzip.GzipFile(fileobj=f, mode="rb") if decompress and path.endswith(".gz") else f


def read_bytes(path: str) -> bytes:
    with open_binary(path) as f:
        return f.read()


def size(path: str) -> int:
    return int(_fs(path).size(path)) if paths.is_remote(path) else os.path.getsize(path)


def is_dir(path: str) -> bool:
    return _fs(path).isdir(path) if paths.is_remote(path) else os.path.isdir(path)


def exists(path: str) -> bool:
    return _fs(path).exists(path) if paths.is_remote(path) else os.path.exists(path)


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts]) if paths.is_remote(base) else str(Path(base, *parts))


def fingerprint(files: list[str]) -> str:
    h = hashlib.sha256()
    for p in files:
        if paths.is_remote(p):
            info = _fs(p).info(p)
            stamp = info.get("generation") or info.get("etag") or info.get("mtime") or info.get("updated")
            h.update(f"{p}\0{info.get('size')}\0{stamp}\n".encode())
        else:
            st = os.stat(p)
            h.update(f"{Path(p).resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()
