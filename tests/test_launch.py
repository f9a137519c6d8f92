"""Launchers: --dry-run prints well-formed commands that pass the config and workdir through."""

import json
import re
import shlex
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT

LAUNCH = ROOT / "launch"
JAXLM_ARGS = ["--config=configs/gpt2_small.py", "--workdir=/mnt/runs/small dir", "--config.train.steps=1000"]


def _dry(script, *args):
    out = subprocess.run(["bash", str(LAUNCH / script), "--dry-run", *args], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _commands(stdout):
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


@pytest.mark.parametrize("script", ["tpu_vm.sh", "slurm.sh", "slurm.sbatch", "gke.sh", "bench_gpu.sh", "gpu_check.sh",
                                    "offline_wheels.sh"])
def test_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(LAUNCH / script)]).returncode == 0


def test_tpu_vm_dry_run():
    cmds = _commands(_dry("tpu_vm.sh", "--", *JAXLM_ARGS))
    verbs = [c[4] for c in cmds]
    assert verbs == ["create", "scp", "ssh", "ssh", "delete"]
    create = cmds[0]
    assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
    assert "--accelerator-type=v4-32" in create and "--zone=us-central2-b" in create and "--spot" in create
    assert "--worker=all" in cmds[1] and "--worker=all" in cmds[2] and "--worker=all" in cmds[3]
    install = next(a for a in cmds[2] if a.startswith("--command="))
    assert "pip install" in install and "requirements.txt" in install
    train = next(a for a in cmds[3] if a.startswith("--command="))[len("--command="):]
    inner = shlex.split(train.split("&&", 1)[1])
    assert inner[:3] == ["python3", "-m", "jaxlm.main"] and inner[3:] == JAXLM_ARGS  # quoting survives
    assert cmds[4][-1] == "--quiet"


def test_tpu_vm_settings_and_steps(tmp_path):
    env = tmp_path / "my.env"
    env.write_text("TPU_NAME=mine\nZONE=europe-west4-a\nACCELERATOR_TYPE=v5p-16\nRUNTIME_VERSION=v2\n"
                   "SPOT=false\nMAX_RETRIES=1\nREMOTE_DIR=jl\n")
    cmds = _commands(_dry("tpu_vm.sh", "--env", str(env), "create"))
    assert cmds == [["gcloud", "compute", "tpus", "tpu-vm", "create", "mine", "--zone=europe-west4-a",
                     "--accelerator-type=v5p-16", "--version=v2"]]
    out = subprocess.run(["bash", str(LAUNCH / "tpu_vm.sh"), "--dry-run", "train", "--", "--config=x.py"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "--workdir" in out.stderr


def test_slurm_dry_run():
    (cmd,) = _commands(_dry("slurm.sh", "--nodes", "4", "--gpus-per-node", "8", "--time", "48:00:00", "--",
                            *JAXLM_ARGS))
    assert cmd[:5] == ["sbatch", "--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--time=48:00:00"]
    assert cmd[5].endswith("launch/slurm.sbatch") and cmd[6:] == JAXLM_ARGS
    (cmd,) = _commands(_dry("slurm.sh", "--per", "node", "--", *JAXLM_ARGS))
    assert "--ntasks-per-node=1" in cmd
    script = (LAUNCH / "slurm.sbatch").read_text()
    assert 'python -m jaxlm.main "$@"' in script and "#SBATCH --signal=TERM@300" in script
    assert "#SBATCH --requeue" in script


@pytest.mark.parametrize("accel", ["tpu", "gpu"])
def test_gke_dry_run(accel):
    out = _dry("gke.sh", "--image", "registry.example/jaxlm:1", "--accelerator", accel, "--hosts", "4", "--",
               *JAXLM_ARGS)
    manifest, _, tail = out.rpartition("+ kubectl apply -f -")
    service, job = list(yaml.safe_load_all(manifest))
    assert service["kind"] == "Service" and service["spec"]["clusterIP"] == "None"
    assert job["kind"] == "Job" and job["spec"]["completions"] == 4 and job["spec"]["completionMode"] == "Indexed"
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["image"] == "registry.example/jaxlm:1"
    assert c["command"] == ["python", "-m", "jaxlm.main", *JAXLM_ARGS]
    limits = c["resources"]["limits"]
    if accel == "tpu":
        assert limits == {"google.com/tpu": "4"} and "cloud.google.com/gke-tpu-topology" in pod["nodeSelector"]
    else:
        assert limits == {"nvidia.com/gpu": "8"}
        env = {e["name"]: e for e in c["env"]}
        assert env["JAXLM_COORDINATOR_ADDRESS"]["value"] == "jaxlm-0.jaxlm:1234"
        assert env["JAXLM_NUM_PROCESSES"]["value"] == "4"
        assert "job-completion-index" in env["JAXLM_PROCESS_ID"]["valueFrom"]["fieldRef"]["fieldPath"]


def test_distributed_detection(monkeypatch):
    from jaxlm import distributed

    for var in ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "SLURM_NTASKS",
                "JAXLM_COORDINATOR_ADDRESS", "JAXLM_NUM_PROCESSES", "JAXLM_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.detect() is None
    assert distributed.initialize() == "single"  # one process: nothing to do
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w-0,w-1,w-2,w-3")
    assert distributed.detect() == "tpu"
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")  # a single-host TPU VM
    assert distributed.detect() is None
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert distributed.detect() is None
    monkeypatch.setenv("SLURM_NTASKS", "16")
    assert distributed.detect() == "slurm"
    monkeypatch.setenv("JAXLM_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    with pytest.raises(ValueError, match="needs --num_processes and --process_id"):
        distributed.initialize()


def test_gpu_bench_suite_dry_run():
    cmds = _commands(_dry("bench_gpu.sh", "--sizes", "small medium", "--batch", "8", "/tmp/out dir", "--", "--steps=5"))
    assert len(cmds) == 8
    for c in cmds:
        assert c[1:3] == ["-m", "jaxlm.bench"] and "--steps=5" in c
    fast, mistral, nondet, remat = cmds[:4]
    assert "--config=configs/gpt2_small.py" in fast and "--config=configs/gpt2_medium.py" in cmds[4]
    assert "--regimes=bf16,bf16_upcast,fp16_upcast,fp16,fp32" in fast and "--batch_per_device=8" in fast
    assert "--config.model.attn_pdrop=0.0" in fast and "--config.train.deterministic=False" in fast
    assert "--out=/tmp/out dir/small-fast.json" in fast
    # the recipe as configured, with its same-dropout HF baseline; then without deterministic ops only
    assert not any(a.startswith("--config.") for a in mistral) and "--nobaseline" not in mistral
    assert [a for a in nondet if a.startswith("--config.")] == ["--config.train.deterministic=False"]
    assert "--config.model.remat=dots" in remat and "--batch_per_device=16" in remat


@pytest.mark.parametrize("script", ["tpu_vm.sh", "slurm.sh", "gke.sh", "bench_gpu.sh", "gpu_check.sh", "offline_wheels.sh"])
def test_launchers_answer_help(script):
    for flag in ("--help", "-h"):
        out = subprocess.run(["bash", str(LAUNCH / script), flag], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert f"launch/{script}" in out.stdout and "unknown argument" not in out.stderr


def test_tpu_vm_takes_a_bucket_workdir_and_finds_its_per_host_logs():
    args = ["--config=configs/gpt2_small.py", "--workdir=gs://my-bucket/runs/small"]
    cmds = _commands(_dry("tpu_vm.sh", "--", *args))
    install = next(a for a in cmds[2] if a.startswith("--command="))
    assert ".[gcs]" in install  # gcsfs: the gs:// file system
    train = next(a for a in cmds[3] if a.startswith("--command="))
    assert "--workdir=gs://my-bucket/runs/small" in train
    logs = next(a for a in _commands(_dry("tpu_vm.sh", "logs", "--", *args))[0] if a.startswith("--command="))
    assert "paths.mirror" in logs and "gs://my-bucket/runs/small" in logs and "/logs/process-*.log" in logs


# --- launch/gpu_check.sh, launch/gpu_report.py, launch/offline_wheels.sh -----------------------------------------

def _gpu_report():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_report", LAUNCH / "gpu_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _bench(rows, baseline_tps=None):
    """A jaxlm.bench --out JSON: the fields gpu_report reads, as bench writes them."""
    results = [{"regime": reg, "tokens_per_s": tps, "compile_s": comp, "step_s": 16 * 1024 / tps,
                "profile": {"busy_ms": 40.0, "parts": {}, "top_ops": []} if prof else None}
               for reg, tps, comp, prof in rows]
    base = {"regime": "torch bf16 autocast", "tokens_per_s": baseline_tps} if baseline_tps else None
    return json.dumps({"results": results, "baseline": base})


def _write_check_outputs(d):
    """What a finished gpu_check.sh run leaves in OUTDIR (the numbers made up, one target missed)."""
    (d / "hlo").mkdir(parents=True, exist_ok=True)
    (d / "meta.json").write_text(json.dumps({"device": "NVIDIA H200, 580.159.04, 143771 MiB",
                                             "cache_entries_at_start": 0}))
    (d / "test_gpu.xml").write_text('<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="17" '
                                    'failures="1" errors="0" skipped="2"></testsuite></testsuites>')
    (d / "small-recipe.json").write_text(_bench([("fp16_upcast", 340_000.0, 31.0, False)], 272_000.0))
    (d / "small-dropout0.json").write_text(_bench([("fp16_upcast", 470_000.0, 28.5, True),
                                                   ("bf16_upcast", 500_000.0, 64.2, False)], 350_000.0))
    (d / "small-fp8.json").write_text(_bench([("fp8", 550_000.0, 40.0, False)]))
    call = '%cublas-gemm.{} = (bf16[16384,768]{{1,0}}, s8[33554432]{{0}}) custom-call(%a, %b), ' \
           'custom_call_target="__cublas$lt$matmul$f8", backend_config={{}}'
    quantise = "%convert.7 = f8e4m3fn[768,2304]{1,0} convert(%clamp.7)"
    (d / "hlo" / "fp8.hlo.txt").write_text("\n".join(["HloModule jit__train_step", quantise,
                                                      *(call.format(i) for i in range(3))]))


def test_gpu_report_renders_each_target_as_measured_over_target(tmp_path):
    _write_check_outputs(tmp_path)
    text = _gpu_report().render(tmp_path)
    lines = text.splitlines()
    assert lines[0] == "## gpu_check: measured / target on NVIDIA H200, 580.159.04, 143771 MiB"
    assert "ratios to torch are the binding ones" in lines[1]  # an H200, not the H100 the targets were set on
    assert "tests/test_gpu.py: 14 passed, 1 failed, 2 skipped" in text
    rows = {cells[1].strip(): cells[2:5] for cells in (line.split("|") for line in lines if line.startswith("| "))}
    recipe = "gpt2_small recipe (attn dropout 0.1), fp16_upcast, tokens/s"
    assert [c.strip() for c in rows[recipe]] == ["340,000", "≥ 330,000", "yes"]
    assert [c.strip() for c in rows["same, vs HF with the same dropout"]] == ["1.25x", "≥ 1.2x", "yes"]
    assert [c.strip() for c in rows["gpt2_small dropout 0, fp16_upcast, tokens/s"]] == ["470,000", "≥ 480,000", "**no**"]
    ratios = [line for line in lines if "vs HF + torch.compile" in line]  # 470/350 and 500/350, the same run's torch
    assert "| 1.34x | ≥ 1.3x | yes |" in ratios[0] and "| 1.43x | ≥ 1.3x | yes |" in ratios[1]
    assert "| fp8: cuBLASLt f8 GEMMs in the compiled step | 3 (float8 arrays in 1 instructions) | > 0 | yes |" in text
    assert "550,000 vs 500,000 (1.10x); 1.57x HF + torch.compile" in text  # the dropout-0 run's torch row
    assert "| compile, slowest row (s) | 64.2 | < 60 | **no** |" in text
    assert "| 40.0 / 34.9 ms (115%) |" in text  # the profile's busy time against the step time (16·1024/470K s)
    # a run that did not happen is "not measured", never a number
    (tmp_path / "small-fp8.json").unlink()
    (tmp_path / "hlo" / "fp8.hlo.txt").unlink()
    text = _gpu_report().render(tmp_path)
    assert "| fp8: cuBLASLt f8 GEMMs in the compiled step | not measured | > 0 | n/a |" in text
    assert "| compile, slowest row (s) | 64.2 |" in text


def test_gpu_report_medium_rows_are_the_ratios_to_hf(tmp_path):
    (tmp_path / "medium-recipe.json").write_text(_bench([("fp16_upcast", 110_000.0, 50.0, False)], 100_000.0))
    rows = _gpu_report().rows(tmp_path, "medium")
    assert rows[0] == ("gpt2_medium recipe, fp16_upcast, vs HF (same dropout)", "1.10x", "≥ 1.1x", "yes")
    assert [r[1] for r in rows[1:]] == ["not measured", "not measured"]


def test_gpu_check_dry_run_is_the_plan_in_under_8_minutes():
    out = _dry("gpu_check.sh", "/tmp/check out")
    cmds = _commands(out)
    tests, recipe, fast, fp8, report = cmds
    assert tests[:2] == ["env", "JAX_PLATFORMS=cuda,cpu"] and "tests/test_gpu.py" in tests
    assert "--junitxml=/tmp/check out/test_gpu.xml" in tests
    for c in (recipe, fast, fp8):
        assert c[1:3] == ["-m", "jaxlm.bench"] and "--config=configs/gpt2_small.py" in c and "--batch_per_device=16" in c
    # the recipe as configured (attention dropout 0.1), with its same-dropout torch row
    assert "--regimes=fp16_upcast" in recipe and not any(a.startswith("--config.") for a in recipe)
    assert "--nobaseline" not in recipe and "--out=/tmp/check out/small-recipe.json" in recipe
    nodrop = {"--config.model.attn_pdrop=0.0", "--config.model.resid_pdrop=0.0", "--config.model.embd_pdrop=0.0",
              "--config.train.deterministic=False"}
    assert nodrop <= set(fast) and "--regimes=fp16_upcast,bf16_upcast" in fast and "--nobaseline" not in fast
    assert "--profile=/tmp/check out/prof" in fast
    assert nodrop <= set(fp8) and "--regimes=fp8" in fp8 and "--hlo_dir=/tmp/check out/hlo" in fp8
    assert report[1:] == ["launch/gpu_report.py", "/tmp/check out", "small"]
    assert "JAX_COMPILATION_CACHE_DIR=/tmp/check out/jax_cache" in out
    projected, limit = map(float, re.search(r"projected: ([\d.]+) minutes \(every step at its limit: ([\d.]+), "
                                            r"kill-after and report included\)", out).groups())
    assert projected < limit <= 7.5  # the worst case, with half a minute to spare of the 8
    medium = _commands(_dry("gpu_check.sh", "--with-medium", "/tmp/x"))
    assert sum("--config=configs/gpt2_medium.py" in c for c in medium) == 2


def _wheel(d, name, version):
    """A minimal pure-Python wheel of package `name` (one module) that pip installs offline."""
    import zipfile

    path = d / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}/__init__.py", f"VERSION = {version!r}\n")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


@pytest.mark.slow
def test_gpu_check_installs_only_missing_wheels_off_the_host_and_prints_the_table_last(tmp_path):
    """The whole script with a stand-in interpreter: pytest and jaxlm.bench are faked (they write what the
    real ones write), pip and the setup's Python are the real ones, and no index is reachable (--no-index)."""
    import sys

    wheels, sample, out = tmp_path / "whl", tmp_path / "sample", tmp_path / "out"
    wheels.mkdir()
    _wheel(wheels, "jaxlm_probe_pkg", "1.0")
    _wheel(wheels, "numpy", "0.0.1")  # the host has numpy: kept, not shadowed
    _write_check_outputs(sample)
    fake = tmp_path / "python3"
    fake.write_text(f"""#!/usr/bin/env bash
if [ "$1 $2" = "-m jaxlm.bench" ]; then
  for a in "$@"; do case "$a" in --out=*) o="${{a#--out=}}" ;; --hlo_dir=*) h="${{a#--hlo_dir=}}" ;; esac; done
  {sys.executable} -c "import jaxlm_probe_pkg, numpy; print('bench sees', jaxlm_probe_pkg.VERSION, numpy.__version__)"
  cp "{sample}/$(basename "$o")" "$o"; [ -n "${{h:-}}" ] && cp "{sample}/hlo/fp8.hlo.txt" "$h/"
  exit 0
fi
if [ "$1 $2" = "-m pytest" ]; then cp "{sample}/test_gpu.xml" "{out}/test_gpu.xml"; exit 0; fi
exec {sys.executable} "$@"
""")
    fake.chmod(0o755)
    res = subprocess.run(["bash", str(LAUNCH / "gpu_check.sh"), "--python", str(fake), "--wheels", str(wheels), str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "host has numpy" in res.stderr and "installing the wheels failed" not in res.stderr
    import numpy

    assert f"bench sees 1.0 {numpy.__version__}" in res.stdout  # ours on PYTHONPATH, the host's numpy untouched
    report = (out / "report.txt").read_text()
    # the setup's own device query wrote meta.json: no nvidia-smi here
    assert res.stdout.endswith(report) and report.startswith("## gpu_check: measured / target on unknown device")
    assert "| gpt2_small recipe (attn dropout 0.1), fp16_upcast, tokens/s | 340,000 |" in report
    import tarfile

    with tarfile.open(out / "results.tar.gz") as t:
        names = {n.lstrip("./") for n in t.getnames()}
    assert {"small-recipe.json", "small-dropout0.json", "small-fp8.json", "test_gpu.xml", "report.txt",
            "meta.json", "hlo/fp8.hlo.txt"} <= names
    assert not any(n.startswith("jax_cache/") for n in names)


def _offline_wheel_names():
    text = (LAUNCH / "offline_wheels.sh").read_text()
    return re.search(r'^WHEELS="([^"]*)"', text, re.M).group(1).split()


def test_offline_wheels_cover_every_runtime_dependency():
    """Each of pyproject's dependencies is downloaded, or named here as the host's or as a lazy import
    the check never makes: a new dependency cannot silently break the air-gapped check."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=!~\[ ;]", d)[0].lower() for d in deps}
    host = {"jax", "flax", "optax", "orbax-checkpoint", "numpy", "ml-dtypes"}  # the GPU host's Python has these
    # imported inside functions or by modules the check never loads (tensorboard: a run's TensorBoard sink, which
    # bench.py and tests/test_gpu.py never create; markdown: the ablation report; pyarrow, fastokens, tiktoken, fsspec: the
    # corpus readers and the token-cache build of jaxlm.data, which the check never loads); the test below blocks them
    lazy = {"tensorflow-datasets", "wandb", "matplotlib", "markdown", "pyarrow", "fastokens", "tiktoken",
            "fsspec", "tensorboard"}
    assert names - host - lazy <= set(_offline_wheel_names()), names - host - lazy - set(_offline_wheel_names())
    assert {"pytest", "pluggy", "iniconfig", "pygments"} <= set(_offline_wheel_names())  # the check's tests step
    cmds = _commands(_dry("offline_wheels.sh", "/tmp/w"))
    assert len(cmds) == len(_offline_wheel_names())
    for c, name in zip(cmds, _offline_wheel_names()):
        assert {"download", "--no-deps", "--only-binary=:all:", "/tmp/w"} <= set(c)
        assert c[c.index("--python-version") + 1] == "3.12" and c[-1].startswith(name + "==")


def test_downloaded_wheels_are_one_version_each_and_under_60_mb():
    d = ROOT / ".whl"
    wheels = sorted(d.glob("*.whl")) if d.is_dir() else []
    if not wheels:
        pytest.skip("no .whl/ here: launch/offline_wheels.sh .whl downloads them")
    dists = [w.name.split("-")[0].lower().replace("_", "-") for w in wheels]
    assert len(dists) == len(set(dists)), dists  # two versions of one stop pip's whole install
    assert sum(w.stat().st_size for w in wheels) < 60e6


@pytest.mark.slow
def test_the_checks_import_path_needs_none_of_the_lazy_dependencies():
    code = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {"tensorflow_datasets", "tensorflow", "wandb", "grain", "matplotlib",
                                   "tensorboard", "markdown", "pyarrow", "fastokens", "tiktoken", "fsspec"}:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import jaxlm.bench, jaxlm.throughput
from jaxlm import attention, config, flash, model, precision, sharding, telemetry, train
config.load("configs/gpt2_small.py")
print("ok")
"""
    import sys

    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]


def test_a_run_without_tensorboard_is_told_how_to_log_or_not(monkeypatch, tmp_path):
    """tensorboard is not on the air-gapped host: a run that asks for TensorBoard gets one error line."""
    from jaxlm import tensorboard_sink
    from jaxlm.errors import ConfigError

    for name in ("tensorboard", "tensorboard.compat.proto", "tensorboard.summary.writer.event_file_writer"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ConfigError, match=r"log.tensorboard=True needs tensorboard .*log.tensorboard=False"):
        tensorboard_sink.TensorBoard(tmp_path, 0, ())
