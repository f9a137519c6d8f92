"""Launchers: --dry-run prints well-formed commands that pass the config and workdir through."""

import shlex
import subprocess

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


@pytest.mark.parametrize("script", ["tpu_vm.sh", "slurm.sh", "slurm.sbatch", "gke.sh", "bench_gpu.sh"])
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


@pytest.mark.parametrize("script", ["tpu_vm.sh", "slurm.sh", "gke.sh", "bench_gpu.sh"])
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
