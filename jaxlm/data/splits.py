"""How a corpus without a validation split of its own is split (``data.val_fraction``), and what to say
when its validation split is too small to evaluate on.

``hash``  the default: a document goes to validation iff the hash of its text (of its ids, for token
          shards) falls below ``data.val_fraction``, so identical documents land in the same split and
          the split does not depend on the corpus's order.
``tail``  where hashing would leave a split without documents (a one-file corpus, a few files, a
          token file without EOS): the last ``data.val_fraction`` of the corpus -- its characters, or
          its tokens for token shards -- is held out. The cut is the document boundary nearest that
          point when the share held out stays within a factor of two of the fraction, else the point
          itself, inside a document (``cut``).

Which rule a corpus gets is decided by one pass over its documents (``decide``), which stops at the
first document of each split: a large corpus is read only until then, and only where no cache of it
is found. The key of a tail-split tokenizer or token cache carries ``"val_split": "tail"``
(``directory``), so no token cache built under the hashed rule is taken for one; a corpus split by
hash keeps the key it always had. (A tokenizer trained for such a corpus before the tail split existed,
under the hashed key, is still found and used: it cannot be told from one trained since.)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np

T = TypeVar("T")
TAIL = "tail"


def held_out(text: str, fraction: float) -> bool:
    """Deterministic: the document goes to validation iff its hash falls below `fraction`."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).digest(), "big")
    return h < fraction * 2**64


def held_out_tokens(tokens: np.ndarray, fraction: float) -> bool:
    """`held_out` for a pre-tokenized document: by the hash of its ids."""
    if fraction <= 0:
        return False
    digest = hashlib.blake2b(np.ascontiguousarray(tokens, "<u4").tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2**64


def decide(docs: Iterable[T], is_held_out: Callable[[T], bool], cap: int = 0) -> list[int] | None:
    """None where the hashed split puts documents on both sides (it is used); else the lengths of the
    corpus's documents (its first `cap`, if `cap`), which the tail split cuts."""
    lengths, train, val = [], False, False
    for doc in docs:
        if is_held_out(doc):
            val = True
        else:
            train = True
        if train and val:
            return None
        if not cap or len(lengths) < cap:
            lengths.append(len(doc))
    return lengths


def cut(lengths: list[int], fraction: float) -> tuple[int, int]:
    """Where validation starts: (document index, offset in it; 0 = at its start) for the last `fraction`
    of the total length. At the document boundary nearest that point if the share held out there is
    within a factor of two of `fraction`, else inside the document holding the point."""
    total = sum(lengths)
    if total < 2:
        return len(lengths), 0  # nothing to split: all of it trains
    point = min(max(total - round(total * fraction), 1), total - 1)  # both sides non-empty
    ends = np.cumsum(lengths)[:-1]
    if ends.size:
        k = int(np.argmin(np.abs(ends - point)))
        if fraction / 2 <= (total - int(ends[k])) / total <= 2 * fraction:
            return k + 1, 0
    i = int(np.searchsorted(ends, point, side="right"))
    return i, point - (int(ends[i - 1]) if i else 0)


def tail(docs: Iterable[T], at: tuple[int, int], split: str, first: int = 0) -> Iterator[T]:
    """The documents of `split` under the tail rule, cut at `at` (``cut``); the document the cut falls
    in gives its head to training and its rest to validation. `first`: the index of the first of `docs`."""
    index, offset = at
    for i, doc in enumerate(docs, first):
        if i < index:
            if split == "train":
                yield doc
        elif i == index and offset:
            yield doc[:offset] if split == "train" else doc[offset:]
        elif split == "validation":
            yield doc


def directory(parent: Path, fields: dict, source, found, fetch, key) -> tuple[dict, Path]:
    """(fields, directory) of a tokenizer or token directory under `parent`, named `key(fields)`. A source
    whose validation split is its tail has its own, `key(fields + val_split: tail)`: looked for where the
    hashed split's directory is not `found` (deciding the rule, a pass over the corpus, only where
    neither is), so that no directory built under the hashed rule is taken for it. `fetch(directory)`,
    if given, fills a directory from an object store first."""
    final = parent / key(fields)
    if fetch is not None:
        fetch(final)
    if not source.holds_out() or found(final):
        return fields, final
    tail_fields = {**fields, "val_split": TAIL}
    tail_dir = parent / key(tail_fields)
    if fetch is not None:
        fetch(tail_dir)
    if found(tail_dir) or source.tail_cut() is not None:
        return tail_fields, tail_dir
    return fields, final


def hashed_cache(directory: Path) -> bool:
    """Whether a token directory is complete with validation documents: one built by the hashed rule,
    which since the tail split always has some (one built before it may have none)."""
    try:
        manifest = json.loads((Path(directory) / "manifest.json").read_text())
        return manifest["splits"]["validation"]["documents"] > 0
    except (OSError, ValueError, KeyError, TypeError):
        return False


def describe(manifest: dict) -> str | None:
    """The startup line of a tail-split cache (None for any other): what was held out, and why."""
    v = manifest.get("validation_split")
    if not v or v.get("rule") != TAIL:
        return None
    unit = "tokens" if v.get("unit") == "tokens" else "characters"
    where = "at a document boundary" if v.get("at_boundary") else "inside a document"
    n, docs = manifest["splits"]["validation"]["tokens"], v["documents"]
    return (f"data: validation is the last {100 * v['fraction']:g}% of the corpus's {unit}, cut {where} ({n:,} "
            f"tokens): data.val_fraction of its documents cannot be held out by hash, as it has {docs} "
            f"document{'s' * (docs != 1)} (data.doc_separator splits files into documents; data.val_source names "
            "a validation corpus)")


def too_small(manifest: dict, batch: int, seq_len: int, val_fraction: float, val_source: str) -> str:
    """Why the periodic evaluation cannot run on a validation split of fewer than `batch` rows, and what
    to change (the warning of ``jaxlm.run``)."""
    s = manifest["splits"]["validation"]
    have = (f"the validation split has {s['sequences']} sequences of train.seq_len+1={seq_len + 1} tokens "
            f"({s['tokens']:,} tokens, {s['documents']} document{'s' * (s['documents'] != 1)}), fewer than one "
            f"evaluation batch of {batch}")
    fixes = "lower train.batch_size (or train.micro_batch_size, the evaluation batch)"
    if val_source:
        return f"{have}: data.val_source={val_source!r} is too small; give a larger validation corpus or {fixes}"
    if manifest.get("fingerprint", {}).get("has_validation"):
        return f"{have}: the source's own validation split is too small; name another with data.val_source or {fixes}"
    if val_fraction <= 0:
        return f"{have}: data.val_fraction=0 holds nothing out; set data.val_fraction (e.g. 0.02) or data.val_source"
    rule = ("the last data.val_fraction of its text" if manifest.get("validation_split") else
            "data.val_fraction of its documents, chosen by hash")
    need = batch * (seq_len + 1)
    return (f"{have}: {rule} is held out (data.val_fraction={val_fraction:g}); raise data.val_fraction so that "
            f"about {need:,} tokens are held out, give a validation corpus with data.val_source, or {fixes}")
