"""Kill and resume on another mesh with attention dropout in the flash kernel (4 simulated CPU devices).

``first WORKDIR``: on FSDP=4, trains STEPS steps, saving the checkpoint of step CUT on the way, prints
{"losses": [...]} and SIGKILLs itself. ``second WORKDIR``: on DP=2×TP=2, restores step CUT and trains
to STEPS, printing {"losses": [...]} of steps CUT..STEPS-1. Batch k is a pure function of k, so the
two runs see the same data; the dropout masks are the kernel's hash of global rows and heads.
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import json  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402

from jaxlm import checkpoint, config, data, sharding, telemetry, train  # noqa: E402

STEPS, CUT = 6, 3
MESHES = {"first": dict(data=1, fsdp=4, tensor=1), "second": dict(data=2, fsdp=1, tensor=2)}


def main(mode: str, workdir: str):
    cfg = config.load(os.path.join(os.path.dirname(__file__), "..", "..", "jaxlm", "configs", "tiny.py"),
                      {"train.batch_size": 8, "train.seq_len": 32, "model.n_positions": 32, "data.vocab_size": 256,
                       "model.attn_pdrop": 0.1, "model.attention_impl": "flash", "train.steps": STEPS,
                       "optim.warmup_steps": 2, "checkpoint.async_save": False})
    cfg.mesh.update(MESHES[mode])
    trainer = train.Trainer(cfg, sharding.make_mesh(cfg.mesh), vocab_size=cfg.data.vocab_size)
    ckpt = checkpoint.Checkpointer(workdir, cfg, abstract_state=train.abstract_state(trainer))
    if mode == "first":
        state, start = trainer.init(np.uint32(cfg.train.seed)), 0
    else:
        state, _, _, start = ckpt.restore(CUT)
    losses = []
    for step in range(start, STEPS):
        if mode == "first" and step == CUT:
            ckpt.save(CUT, state, {"next_index": CUT})
            ckpt.manager.wait_until_finished()
        batch = np.random.RandomState(step).randint(0, cfg.data.vocab_size, (8, 33)).astype(np.int32)
        state, metrics = trainer.train_step(state, data.to_global(batch, trainer.batch_sharding))
        losses.append(float(metrics[telemetry.LOSS]))
    print(json.dumps({"losses": losses, "attention": trainer.attention, "mesh": dict(trainer.mesh.shape)}), flush=True)
    if mode == "first":
        os.kill(os.getpid(), signal.SIGKILL)  # killed, not closed: the second run has only what is on disk
    ckpt.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
