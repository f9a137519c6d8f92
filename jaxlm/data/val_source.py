"""``data.val_source``: a named validation corpus for any source, read whole (``sources.open_source``
wraps data.source in ``WithValidation`` when it is set). Its documents are the validation split instead
of what data.val_fraction would hold out; every document of data.source's training split trains (a
validation split of its own goes unused). A token cache's key carries the validation source's
fingerprint, so a cache made with another validation split is never taken for this one.
"""

from __future__ import annotations

from jaxlm.data import sources
from jaxlm.errors import DataError


class WithValidation(sources.Source):
    """``data.val_source``: data.source's training split trains; the validation source's own validation
    split, or all its documents where it has none, is the validation split."""

    has_validation = True

    def __init__(self, main: sources.Source, val: sources.Source, data_cfg):
        super().__init__(main.spec, data_cfg)
        kind = lambda s: "token ids" if s.pretokenized else "text"  # noqa: E731
        if main.pretokenized != val.pretokenized:
            raise DataError(f"data.val_source={val.spec!r} holds {kind(val)}, data.source={main.spec!r} {kind(main)}; "
                            f"give a validation source of {kind(main)}")
        mine, theirs = main.own_tokenizer(), val.own_tokenizer()
        if theirs is not None and (mine is None or mine.sha256 != theirs.sha256):
            raise DataError(f"data.val_source={val.spec!r}: its meta.pkl vocabulary is not data.source's tokenizer; "
                            "ids of two vocabularies cannot be compared: give a validation source made with the same one")
        self.main, self.val, self.pretokenized = main, val, main.pretokenized

    def fingerprint(self):
        return {**self.main.fingerprint(), "val_source": self.val.fingerprint()}

    def own_tokenizer(self):
        return self.main.own_tokenizer()

    def _part(self, split: str) -> tuple[sources.Source, str]:
        if split not in sources.SPLITS:
            raise ValueError(f"split must be one of {sources.SPLITS}, got {split!r}")
        src = self.main if split == "train" else self.val
        src.counters = self.counters  # what reading notices is counted where the cache looks
        return src, "validation" if split == "validation" and src.has_validation else "train"

    def documents(self, split):
        src, native = self._part(split)
        return src.documents(native)

    def token_chunks(self, split, *args):
        src, native = self._part(split)
        return src.token_chunks(native, *args)


sources.WITH_VALIDATION[:] = [WithValidation]  # sources.open_source wraps data.source with it when val_source is set
