"""What a machine's cache holds and which runs use it: ``python -m jaxlm.data --cache`` / ``--prune``.

A cache root (``paths.machine_cache()`` unless ``data.cache_dir`` is set) is shared by every run on
the machine, so it needs a record of who uses what before anything can be deleted. Each run that
prepares its data writes ``runs/<hash of its workdir>.json`` there: the workdir and the token
directories it read (``tokens/<key>``). ``prune`` keeps a token directory while a run directory that
still exists names it, and a trained tokenizer (``tokenizers/<key>``) while a kept token directory
was made with it (the same sha256) -- a token cache found again needs its tokenizer to find its key.
Builds in progress (``.build-*``), set-aside damaged caches (``*.corrupt-*``) and URL mirrors are
listed; only the set-aside caches are pruned with the unused ones. An entry made or used in the last
``GRACE_S`` is kept (a run starting now records its use only once it has opened the cache), and a run
recorded by another host counts as alive (its directory may be on that host's disk).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from pathlib import Path

from jaxlm import files, paths
from jaxlm.data import tokenizer as tok_lib

RUNS = "runs"
GRACE_S = 3600.0


def _entry(root: Path, directory) -> str | None:
    """`directory`'s entry name under `root` ('tokens/<key>'), or None where it is not under it."""
    try:
        rel = Path(directory).resolve().relative_to(Path(root).resolve())
    except ValueError:
        return None
    return "/".join(rel.parts[:2]) if len(rel.parts) >= 2 else None


def record(root, workdir, directories) -> None:
    """Notes that the run in `workdir` uses these token directories of the cache `root` (a local root only;
    a URL's cache is shared by design and never pruned from here). Best effort: a cache that cannot be
    written to (read-only) is used all the same."""
    if paths.is_remote(root):
        return
    where = str(workdir) if paths.is_remote(workdir) else str(Path(workdir).resolve())
    root = Path(root)
    uses = {e for d in directories if (e := _entry(root, d))}
    for e in uses:  # used now: --prune leaves it for GRACE_S whatever the records say
        try:
            os.utime(root / e)
        except OSError:
            pass
    f = root / RUNS / (hashlib.sha256(where.encode()).hexdigest()[:16] + ".json")
    try:
        old = json.loads(f.read_text()) if f.exists() else {}
        uses |= set(old.get("uses", ()))
        files.atomic_write_json(f, {"workdir": where, "host": socket.gethostname(), "uses": sorted(uses)}, indent=1)
    except (OSError, ValueError):
        pass


def _size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    total = 0
    for dirpath, _, names in os.walk(p):
        for n in names:
            try:
                total += os.lstat(os.path.join(dirpath, n)).st_size
            except OSError:
                pass
    return total


def _runs(root: Path) -> list[dict]:
    out = []
    for f in sorted((root / RUNS).glob("*.json")) if (root / RUNS).is_dir() else ():
        try:
            d = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        d["file"] = f
        here = d.get("host", socket.gethostname()) == socket.gethostname()
        d["alive"] = paths.is_remote(d["workdir"]) or not here or Path(d["workdir"]).is_dir()
        out.append(d)
    return out


def _tokenizer_sha(directory: Path) -> str | None:
    spec = tok_lib.stored(directory)
    try:
        return tok_lib.load(spec).sha256 if spec else None
    except Exception:  # an unreadable tokenizer is kept out of every kept token cache's way: unused
        return None


def entries(root) -> list[dict]:
    """Every entry of the cache: {name, bytes, runs (the live run directories using it), kind}."""
    root = Path(root)
    runs = [r for r in _runs(root) if r["alive"]]
    used = {}
    for r in runs:
        for e in r.get("uses", ()):
            used.setdefault(e, []).append(r["workdir"])
    out = []
    for sub in ("tokens", "tokenizers", "mirror"):
        for d in sorted((root / sub).iterdir()) if (root / sub).is_dir() else ():
            name = f"{sub}/{d.name}"
            kind = ("building" if d.name.startswith(".build-") else "set aside" if ".corrupt-" in d.name
                    else "temporary" if d.name.startswith(".") else sub.rstrip("s") if sub != "mirror" else "mirror")
            out.append({"name": name, "path": d, "bytes": _size(d), "runs": used.get(name, []), "kind": kind})
    kept_shas = set()
    for e in out:
        if e["kind"] == "token" and e["runs"]:
            try:
                kept_shas.add(json.loads((e["path"] / "manifest.json").read_text())["tokenizer_sha256"])
            except (OSError, ValueError, KeyError):
                pass
    for e in out:
        if e["kind"] == "tokenizer":
            e["needed"] = _tokenizer_sha(e["path"]) in kept_shas
    return out


def describe(root) -> str:
    """The table `--cache` prints."""
    es = entries(root)
    lines = [f"cache {root}: {len(es)} entries, {_human(sum(e['bytes'] for e in es))}"]
    for e in es:
        who = (", ".join(e["runs"]) if e["runs"] else
               "needed by a used token cache" if e.get("needed") else "no run")
        lines.append(f"  {_human(e['bytes']):>9}  {e['kind']:<10} {e['name']:<40} {who}")
    return "\n".join(lines)


def prune(root, log=print) -> list[str]:
    """Deletes the token directories no existing run directory uses, the tokenizers none of the kept
    token directories was made with, the set-aside damaged caches and the records of deleted runs.
    Builds in progress and URL mirrors are left. Returns the names deleted."""
    root = Path(root)
    gone = []
    for e in entries(root):
        drop = (e["kind"] == "token" and not e["runs"]) or (e["kind"] == "tokenizer" and not e.get("needed")) \
            or e["kind"] == "set aside"
        if drop and time.time() - e["path"].stat().st_mtime > GRACE_S:
            shutil.rmtree(e["path"], ignore_errors=True)
            gone.append(e["name"])
            log(f"deleted {e['name']} ({_human(e['bytes'])})")
    for r in _runs(root):
        if not r["alive"]:
            r["file"].unlink(missing_ok=True)
    return gone


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
