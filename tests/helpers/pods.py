"""Multi-process runs for the pods tests and the chaos soak: N local ``jaxlm.main`` processes joined by
jax.distributed on 127.0.0.1, their output in files (no pipe fills up), and a fault injector.

``python tests/helpers/pods.py ARGS...`` runs ``jaxlm.main ARGS`` with one fault from
``$JAXLM_TEST_FAULT`` = ``WHEN:PROCESS:SIGNAL``, fired in process PROCESS only (test-only; jaxlm
itself is not changed):

* ``step=K``: SIGNAL to itself right after step K (in ``Checkpointer.on_step``);
* ``save=K``: SIGNAL to itself at the start of the save of step K (it lands while Orbax writes);
* ``build``: SIGNAL to itself as the token cache build starts;
* ``compile``: SIGNAL to itself as the first train step compiles;
* ``init``: SIGNAL to itself as it starts to join jax.distributed (before its peers may have);
* ``error-build``: the cache build raises a DataError instead.

Cost: every Job of one test session shares one XLA compilation cache (:func:`compile_cache`), so only
the first run of each program compiles; the cached executables are the same code, bit for bit.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_shared: dict = {}


def compile_cache() -> Path:
    """This session's persistent XLA compilation cache (removed at exit), shared by every Job."""
    if "jcc" not in _shared:
        import atexit
        import shutil

        _shared["jcc"] = Path(tempfile.mkdtemp(prefix="jaxlm-pods-jcc-"))
        atexit.register(shutil.rmtree, _shared["jcc"], True)
    return _shared["jcc"]


def tiny_args(workdir, corpus, cache, steps, extra=()) -> list[str]:
    return ["--config=configs/tiny.py", f"--workdir={workdir}", f"--config.data.source=files:{corpus}/*.txt",
            "--config.data.vocab_size=300", f"--config.data.cache_dir={cache}", "--config.data.val_fraction=0.0",
            f"--config.train.steps={steps}", "--config.train.batch_size=8", "--config.train.seq_len=32",
            "--config.model.n_positions=32", "--config.log.every=1", "--config.log.stats_every=0",
            "--config.log.wandb_mode=disabled", "--config.train.eval_every=0",
            "--config.checkpoint.stages=((3, 1000),)", "--config.checkpoint.latest_every_minutes=0.0",
            "--config.optim.schedule=constant", "--config.optim.warmup_steps=2", "--config.optim.eps=1e-3", *extra]


class Job:
    """N processes of one command; ``wait`` returns their exit codes, ``out(i)`` their stdout+stderr."""

    def __init__(self, args, n_proc, devices, logdir: Path, fault: str | None = None, env=None):
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        base = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
                "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices // n_proc}",
                "JAX_COMPILATION_CACHE_DIR": str(compile_cache()), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1", **(env or {})}
        if fault:
            base["JAXLM_TEST_FAULT"] = fault
        cmd = [sys.executable, str(HERE)] if fault else [sys.executable, "-m", "jaxlm.main"]
        port = free_port()
        self.procs, self.files = [], []
        for i in range(n_proc):
            dist = [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={n_proc}",
                    f"--process_id={i}"] if n_proc > 1 else []
            f = open(self.logdir / f"p{i}.txt", "w")
            self.files.append(f)
            self.procs.append(subprocess.Popen(cmd + list(args) + dist, cwd=ROOT, env=base, stdout=f,
                                               stderr=subprocess.STDOUT))

    def wait(self, timeout: float = 600) -> list[int | None]:
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        codes = [p.poll() for p in self.procs]
        if None in codes:
            self.kill()
        for f in self.files:
            f.close()
        return codes

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def out(self, i: int) -> str:
        if not self.files[i].closed:
            self.files[i].flush()
        return (self.logdir / f"p{i}.txt").read_text(errors="replace")


def _install_fault(spec: str) -> None:
    when, proc, sig = spec.split(":")
    me = next((int(a.split("=", 1)[1]) for a in sys.argv if a.startswith("--process_id=")), 0)
    if int(proc) != me:
        return
    signum = getattr(signal, sig)
    fire = lambda: os.kill(os.getpid(), signum)  # noqa: E731
    from jaxlm import checkpoint, data

    if when.startswith("step="):
        k, real = int(when[5:]), checkpoint.Checkpointer.on_step

        def on_step(self, step, state, data_state):
            if step == k:
                fire()
            return real(self, step, state, data_state)
        checkpoint.Checkpointer.on_step = on_step
    elif when.startswith("save="):
        k, real_save = int(when[5:]), checkpoint.Checkpointer.save

        def save(self, step, state, data_state):
            real_save(self, step, state, data_state)
            if step == k:
                fire()  # the async save is writing now
        checkpoint.Checkpointer.save = save
    elif when in ("build", "error-build"):
        real_build = data.build

        def build(*a, **kw):
            if when == "build":
                fire()
                return real_build(*a, **kw)
            from jaxlm.errors import DataError
            raise DataError("data.source: injected failure of this process's cache build")
        data.build = build
    elif when == "init":
        import jax

        real_init = jax.distributed.initialize

        def initialize(*a, **kw):
            fire()
            return real_init(*a, **kw)
        jax.distributed.initialize = initialize
    elif when == "compile":
        import jax

        real_compile, done = jax.stages.Lowered.compile, []

        def compile_(self, *a, **kw):
            if not done:
                done.append(1)
                fire()
            return real_compile(self, *a, **kw)
        jax.stages.Lowered.compile = compile_


if __name__ == "__main__":
    import runpy

    _install_fault(os.environ["JAXLM_TEST_FAULT"])
    sys.argv = ["jaxlm.main"] + sys.argv[1:]
    runpy.run_module("jaxlm.main", run_name="__main__", alter_sys=True)
