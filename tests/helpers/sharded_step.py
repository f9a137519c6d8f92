"""Run in a subprocess with 8 simulated CPU devices: one train step under several meshes vs one device.

Prints JSON {mesh name: {"loss_diff": .., "param_diff": .., "losses": ..}}.

optim.eps is 1e-3 here: Adam's first steps are lr·g/(|g|+eps), which for |g| near the default
eps (1e-8) turns 1e-9 summation-order differences between meshes into lr-sized parameter
differences. A larger eps keeps the update a smooth function of the gradient, so the comparison
checks the sharded computation rather than Adam's amplification of rounding.
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import collections  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxlm import config, data, sharding, train  # noqa: E402
from jaxlm.errors import ConfigError  # noqa: E402

MESHES = {
    "DP=8": dict(data=8, fsdp=1, tensor=1),
    "FSDP=8": dict(data=1, fsdp=8, tensor=1),
    "TP=2xDP=4": dict(data=4, fsdp=1, tensor=2),
    "FSDP=2xTP=4": dict(data=1, fsdp=2, tensor=4),
}


def one_step(cfg, devices):
    mesh = sharding.make_mesh(cfg.mesh, devices=devices)
    trainer = train.Trainer(cfg, mesh, vocab_size=cfg.data.vocab_size)
    batch = np.random.RandomState(0).randint(0, cfg.data.vocab_size, (cfg.train.batch_size, cfg.train.seq_len + 1))
    state = trainer.init(np.uint32(cfg.train.seed))
    hlo = trainer.train_step.lower(state, data.to_global(batch.astype(np.int32), trainer.batch_sharding)).compile().as_text()
    init = jax.tree.map(np.asarray, jax.device_get(state.params))
    losses = []
    for _ in range(2):
        state, metrics = trainer.train_step(state, data.to_global(batch.astype(np.int32), trainer.batch_sharding))
        losses.append(float(metrics["train/loss"]))
    params = jax.tree.map(np.asarray, jax.device_get(state.params))
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(init)))
    shard_shapes = {  # what one device holds: proof the parameters really are partitioned
        "c_attn": list(state.params["h"][0]["attn"]["c_attn"]["kernel"].addressable_shards[0].data.shape),
        "wte": list(state.params["wte"]["embedding"].addressable_shards[0].data.shape),
    }
    return losses, params, moved, shard_shapes, census(hlo, cfg)


def census(hlo: str, cfg) -> dict:
    """The compiled step's collectives: how many of each kind, and the floating-point arrays among
    them that span the whole global batch (activations computed unsharded, then reduced)."""
    # one instruction: "%name = <result type, maybe a tuple> <kind>[-start](operands...)"
    op = re.compile(r"= (.*?) (all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)(?:-start)?\(")
    ops = [m.groups() for m in map(op.search, hlo.splitlines()) if m]
    whole = rf"\b(?:f32|bf16|f16)\[{cfg.train.batch_size},{cfg.train.seq_len}[,\]]"
    return {"counts": dict(collections.Counter(kind for _, kind in ops)),
            "global_batch": sorted({m for result, _ in ops for m in re.findall(whole, result)})}


def main():
    assert jax.device_count() == 8, jax.devices()
    cfg = config.load(os.path.join(os.path.dirname(__file__), "..", "..", "jaxlm", "configs", "tiny.py"),
                      # vocab 1000: the table is padded to 1024 rows, so the logits' mask runs sharded too
                      {"train.batch_size": 16, "train.seq_len": 32, "model.n_positions": 64, "data.vocab_size": 1000,
                       "optim.warmup_steps": 0, "optim.eps": 1e-3})
    cfg.mesh.update(dict(data=1, fsdp=1, tensor=1))
    ref_losses, ref_params, moved, _, _ = one_step(cfg, jax.devices()[:1])
    out = {"reference": {"losses": ref_losses, "params_moved": moved}}
    for name, m in MESHES.items():
        cfg.mesh.update(m)
        losses, params, _, shapes, collectives = one_step(cfg, jax.devices())
        diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)))
        out[name] = {"losses": losses, "loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses)),
                     "param_diff": diff, "shard_shapes": shapes, "collectives": collectives}
    # the batch must split over the data-parallel devices
    cfg.mesh.update(dict(data=8, fsdp=1, tensor=1))
    cfg.train.batch_size = 12
    try:
        train.Trainer(cfg, sharding.make_mesh(cfg.mesh), vocab_size=cfg.data.vocab_size)
        out["indivisible_batch_error"] = None
    except ConfigError as e:
        out["indivisible_batch_error"] = str(e)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
