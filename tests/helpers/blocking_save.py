"""Runs a jaxlm module (``python blocking_save.py jaxlm.main ARGS...``) with one checkpoint save held
open: the save of step ``$JAXLM_TEST_BLOCK_STEP`` writes everything into Orbax's temporary directory,
then, instead of committing (Orbax's ``AtomicRenameTemporaryPath.finalize``: the commit-success
file and the rename to ``<step>/``), writes the temporary directory's path to
``$JAXLM_TEST_BLOCK_MARKER`` and sleeps. The training thread goes on until the next save, which
waits for this one, so a test that sees the marker can SIGKILL the process while that save is
provably in flight. Test-only; jaxlm itself is not changed.
"""

import asyncio
import os
import runpy
import sys
from pathlib import Path

from orbax.checkpoint._src.path import atomicity

BLOCK_STEP = os.environ["JAXLM_TEST_BLOCK_STEP"]
MARKER = Path(os.environ["JAXLM_TEST_BLOCK_MARKER"])
_real_finalize = atomicity.AtomicRenameTemporaryPath.finalize


async def _finalize(self, *args, **kwargs):
    if self.get_final().name != BLOCK_STEP:
        return await _real_finalize(self, *args, **kwargs)
    tmp = Path(self.get())
    assert tmp.is_dir() and ".orbax-checkpoint-tmp" in tmp.name, tmp
    MARKER.with_suffix(".partial").write_text(str(tmp))
    MARKER.with_suffix(".partial").rename(MARKER)  # the test never reads a half-written marker
    await asyncio.sleep(600)  # the test kills us long before; a leaked process still ends
    raise RuntimeError(f"blocking_save: nobody killed the process holding the save of step {BLOCK_STEP}")


atomicity.AtomicRenameTemporaryPath.finalize = _finalize

if __name__ == "__main__":
    module = sys.argv[1]
    sys.argv = [module] + sys.argv[2:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
