"""Run in a subprocess with 8 simulated CPU devices: the flash kernel (interpreted) with attention
dropout on four meshes against one device and against the reference path.

Prints JSON with, per mesh: whether the dropout mask the kernel applied is bit-identical to the
reference path's global mask, the loss and the largest per-leaf relative gradient difference to
the one-device flash run and to the one-device reference run, and the compiled gradient step's
collective census (``sharded_step.census``); with ``--reference-census`` also the reference path's
census on each mesh (for comparison; it doubles the compile time). Then the FSDP=2×TP=4 train step
exported for CUDA and for TPU: its Triton (Mosaic) calls and any (B, H, T, T) array in it.
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import export  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from sharded_step import census  # noqa: E402

from jaxlm import config, data, flash, sharding, train  # noqa: E402

MESHES = {
    "DP=8": dict(data=8, fsdp=1, tensor=1),
    "FSDP=8": dict(data=1, fsdp=8, tensor=1),
    "FSDP=2xTP=4": dict(data=1, fsdp=2, tensor=4),
    "DP=2xTP=4": dict(data=2, fsdp=1, tensor=4),
}
B, T, H, RATE = 16, 32, 4, 0.1
ONE = dict(data=1, fsdp=1, tensor=1)


def make_cfg(impl: str, mesh: dict, regime: str = "fp32"):
    cfg = config.load(os.path.join(os.path.dirname(__file__), "..", "..", "jaxlm", "configs", "tiny.py"),
                      {"train.batch_size": B, "train.seq_len": T, "model.n_positions": T, "data.vocab_size": 256,
                       "model.attn_pdrop": RATE, "model.attention_impl": impl, "precision.regime": regime,
                       "optim.warmup_steps": 0, "model.n_layer": 1})  # one block: the kernels' compile is the cost
    cfg.mesh.update(mesh)
    return cfg


def applied_mask(mesh_axes: dict) -> np.ndarray:
    """The (B, H, T, T) keep mask the kernel applies on this mesh, read off its output: with q = k = 0
    every probability in row t is 1/(t+1), and v = one-hot of the key position makes output[t, s]
    that probability, dropped or scaled by 1/(1-p)."""
    mesh = sharding.make_mesh(mesh_axes, devices=jax.devices()[:int(np.prod(list(mesh_axes.values())))])
    spec = sharding.layout(flash.AXES_BTHK, (B, T, H, T), mesh, "q")
    zeros = jnp.zeros((B, T, H, T), jnp.float32)
    v = jnp.broadcast_to(jnp.eye(T, dtype=jnp.float32)[None, :, None, :], (B, T, H, T))

    @jax.jit
    def run(q, k, v):
        with sharding.use_mesh(mesh):
            return flash.flash_attention(q, k, v, scale=1.0, dropout_rate=RATE, dropout_key=jax.random.PRNGKey(7))

    put = lambda x: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    out = np.asarray(run(put(zeros), put(zeros), put(v)))  # (B, T, H, S)
    return out.transpose(0, 2, 1, 3) > 0


def loss_and_grads(cfg, devices, run=True):
    """Loss and gradients of one micro-batch (the train step's, before the optimizer), and the census."""
    trainer = train.Trainer(cfg, sharding.make_mesh(cfg.mesh, devices=devices), vocab_size=cfg.data.vocab_size)
    state = trainer.init(np.uint32(cfg.train.seed))
    batch = data.to_global(np.random.RandomState(0).randint(0, cfg.data.vocab_size, (B, T + 1)).astype(np.int32),
                           trainer.batch_sharding)
    grads = jax.jit(lambda p, b: trainer._grads(p, b, state.rng, jnp.int32(3), jnp.float32(1.0)),
                    in_shardings=(trainer.state_sharding.params, trainer.batch_sharding)).lower(
        state.params, batch).compile()
    if not run:
        return None, None, census(grads.as_text(), cfg), trainer
    loss, g = grads(state.params, batch)
    return float(loss), jax.tree.map(np.asarray, jax.device_get(g)), census(grads.as_text(), cfg), trainer


def rel(a_tree, b_tree) -> dict:
    """The largest over leaves of the relative error |a - b| / |b| (2-norms), and of the elementwise
    max|a - b| / max|b| (a stricter measure: one entry's rounding against the leaf's largest)."""
    pairs = list(zip(jax.tree.leaves(a_tree), jax.tree.leaves(b_tree)))
    return {"norm": max(float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)) for a, b in pairs),
            "max": max(float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)) for a, b in pairs)}


def exported(mesh_axes: dict, platform: str) -> dict:
    """The sharded train step exported for `platform`: its kernel calls and any (B, H, T, T) array in it."""
    cfg = make_cfg("flash", mesh_axes, regime="bf16_upcast")
    trainer = train.Trainer(cfg, sharding.make_mesh(cfg.mesh), vocab_size=cfg.data.vocab_size)
    batch = jax.ShapeDtypeStruct((B, T + 1), jnp.int32, sharding=trainer.batch_sharding)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), trainer.abstract_state,
                         trainer.state_sharding)
    triton = "__gpu$xla.gpu.triton"
    checks = [export.DisabledSafetyCheck.custom_call(triton)] if platform == "cuda" else []
    text = export.export(trainer.train_step, platforms=[platform], disabled_checks=checks)(state, batch).mlir_module()
    dp, tp = mesh_axes["data"] * mesh_axes["fsdp"], mesh_axes["tensor"]
    scores = [s for b, h in ((B, H), (B // dp, H // tp)) for s in re.findall(rf"tensor<{b}x{h}x{T}x{T}x\w+>", text)]
    return {"triton_calls": text.count(f"@{triton}"), "mosaic_calls": text.count("@tpu_custom_call"),
            "score_arrays": scores, "n_layer": cfg.model.n_layer}


def main():
    assert jax.device_count() == 8, jax.devices()
    ref_mask = np.asarray(flash.reference_keep_mask(jax.random.PRNGKey(7), B, H, T, T, RATE))
    causal = np.tril(np.ones((T, T), bool))
    one = jax.devices()[:1]
    flash1, g_flash1, census_flash1, _ = loss_and_grads(make_cfg("flash", ONE), one)
    ref1, g_ref1, _, _ = loss_and_grads(make_cfg("reference", ONE), one)
    out = {"one_device": {"flash_loss": flash1, "reference_loss": ref1, "grad_rel_flash_vs_reference":
                          rel(g_flash1, g_ref1), "mask_equal": bool(np.array_equal(applied_mask(ONE),
                                                                                   ref_mask & causal))}}
    for name, m in MESHES.items():
        loss, g, census_flash, trainer = loss_and_grads(make_cfg("flash", m), jax.devices())
        census_ref = None
        if "--reference-census" in sys.argv:
            census_ref = loss_and_grads(make_cfg("reference", m), jax.devices(), run=False)[2]
        out[name] = {
            "mask_equal": bool(np.array_equal(applied_mask(m), ref_mask & causal)),
            "loss": loss, "loss_rel_vs_flash1": abs(loss - flash1) / flash1, "loss_rel_vs_reference1":
            abs(loss - ref1) / ref1, "grad_rel_vs_flash1": rel(g, g_flash1), "grad_rel_vs_reference1": rel(g, g_ref1),
            "census_flash": census_flash, "census_reference": census_ref, "attention": trainer.attention,
        }
    out["export_cuda"] = exported(MESHES["FSDP=2xTP=4"], "cuda")
    out["export_tpu"] = exported(MESHES["FSDP=2xTP=4"], "tpu")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
