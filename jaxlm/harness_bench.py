"""Requests per second of the ``jaxlm`` harness model and of the harness's own ``hf`` model on the same
weights and tasks (the numbers in PERFORMANCE.md). A benchmark, not a test.

    python -m jaxlm.harness_bench --hf=DIR --tasks=TASK [--include_path=DIR] [--limit=N] [--batch_size=16]

Both models score the same requests in the same process, one after the other, each twice: the first
pass includes jaxlm's compiles (one per length bucket met) and torch's warm-up; the second is the
steady rate. Timed is the time inside the models' request methods (loglikelihood,
loglikelihood_rolling, generate_until), not the harness's dataset building or metrics.
"""

from __future__ import annotations

import json
import time

from absl import flags
from lm_eval.api.registry import get_model

from jaxlm import cli, harness

_METHODS = ("loglikelihood", "loglikelihood_rolling", "generate_until")


def timed(lm) -> dict:
    """Wraps `lm`'s request methods to count requests and seconds into the returned dict."""
    stats = {"requests": 0, "seconds": 0.0}
    for name in _METHODS:
        method = getattr(lm, name)

        def wrapper(requests, *args, _method=method, **kwargs):
            t = time.perf_counter()
            out = _method(requests, *args, **kwargs)
            stats["seconds"] += time.perf_counter() - t
            stats["requests"] += len(requests)
            return out

        setattr(lm, name, wrapper)
    return stats


def bench(hf_dir: str, tasks: list[str], *, include_path=None, limit=None, batch_size: int = 16,
          log=print) -> dict:
    models = {
        "jaxlm": harness.JaxlmLM(hf=hf_dir, batch_size=batch_size),
        "hf": get_model("hf").create_from_arg_string(f"pretrained={hf_dir},dtype=float32",
                                                     {"batch_size": batch_size, "device": "cpu"}),
    }
    out = {}
    for name, lm in models.items():
        stats = timed(lm)
        for run in ("first", "second"):
            stats.update(requests=0, seconds=0.0)
            harness.evaluate(lm, tasks, include_path=include_path, limit=limit)
            out[f"{name}_{run}"] = {**stats, "requests_per_s": stats["requests"] / stats["seconds"]}
            log(f"{name} ({run} pass): {stats['requests']} requests in {stats['seconds']:.2f} s, "
                f"{out[f'{name}_{run}']['requests_per_s']:.1f} requests/s")
    out["speedup"] = out["jaxlm_second"]["requests_per_s"] / out["hf_second"]["requests_per_s"]
    log(f"jaxlm / hf (second passes): {out['speedup']:.2f}x")
    return out


def define_flags():
    flags.DEFINE_string("hf", None, "A Hugging Face GPT-2 directory (an export of a run: python -m jaxlm.export).")
    flags.DEFINE_list("tasks", None, "Harness task names.")
    flags.DEFINE_string("include_path", None, "A directory of task YAML files.")
    flags.DEFINE_integer("limit", None, "At most this many documents per task.")
    flags.DEFINE_integer("batch_size", 16, "Rows per batch, both models.")


def main(argv):
    F = cli.FLAGS
    cli.require(hf=F.hf, tasks=F.tasks)
    print(json.dumps(bench(F.hf, F.tasks, include_path=F.include_path, limit=F.limit, batch_size=F.batch_size)))


if __name__ == "__main__":
    cli.run(main, define_flags)
