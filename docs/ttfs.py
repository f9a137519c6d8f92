"""Seconds from the command to the tiny quickstart's first step, and to its exit, for checkouts side by side.

    python docs/ttfs.py [--repeats=5] NAME=CHECKOUT[:PYTHONPATH] ...

Each arm runs ``python -m jaxlm.main --config=configs/tiny.py --workdir=NEW --config.train.steps=1`` from
its checkout (so that checkout's jaxlm is imported), optionally with PYTHONPATH put first (to try another
version of a dependency: ``pip install --target DIR pkg==X``); the arms interleaved, a fresh workdir each
time, one data and compilation cache for all (``$JAXLM_CACHE``, default /tmp/ttfs-cache), warmed by one
untimed run per arm. Prints each run and the medians; the load average before and after.
"""

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def once(checkout: str, pythonpath: str, cache: str) -> tuple[float, float]:
    workdir = tempfile.mkdtemp(prefix="ttfs-")
    env = {**os.environ, "JAXLM_CACHE": cache, "PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    p = subprocess.Popen([sys.executable, "-m", "jaxlm.main", "--config=configs/tiny.py", f"--workdir={workdir}",
                          "--config.train.steps=1"], cwd=checkout, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    first = None
    for line in p.stderr:
        if first is None and line.startswith("step 1/"):
            first = time.monotonic() - t0
    p.wait()
    total = time.monotonic() - t0
    shutil.rmtree(workdir, ignore_errors=True)
    if p.returncode or first is None:
        sys.exit(f"error: the run in {checkout} exited {p.returncode} (first step line: {first is not None})")
    return first, total


def main(argv: list[str]) -> None:
    repeats = next((int(a.split("=", 1)[1]) for a in argv if a.startswith("--repeats=")), 5)
    arms = {}
    for a in (a for a in argv if not a.startswith("--")):
        name, spec = a.split("=", 1)
        checkout, _, pythonpath = spec.partition(":")
        arms[name] = (checkout, pythonpath)
    if not arms:
        sys.exit(__doc__)
    cache = os.environ.get("JAXLM_CACHE", "/tmp/ttfs-cache")
    for checkout, pythonpath in arms.values():
        once(checkout, pythonpath, cache)  # builds the data cache, fills the compilation cache
    print("load average", os.getloadavg())
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in arms}
    for _ in range(repeats):
        for name, (checkout, pythonpath) in arms.items():
            times[name].append(once(checkout, pythonpath, cache))
            print(f"{name}: first step {times[name][-1][0]:.2f} s, exit {times[name][-1][1]:.2f} s", flush=True)
    print("load average", os.getloadavg())
    for name, runs in times.items():
        print(f"{name}: median first step {statistics.median(f for f, _ in runs):.2f} s, "
              f"median exit {statistics.median(t for _, t in runs):.2f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
