"""Hugging Face parity: the same function as GPT2LMHeadModel (eager attention), both directions.

transformers honours reorder_and_upcast_attn only with attn_implementation="eager", so every HF
model here is eager.
"""

import json
import os

import numpy as np
import pytest

from jaxlm import hf, model, precision
from jaxlm.errors import CheckpointError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Odd shapes on purpose: 3 and 5 heads, vocab not a multiple of 8, n_positions not a power of 2,
# sequences shorter than n_positions.
SHAPES = [
    dict(vocab_size=101, n_positions=37, n_embd=48, n_layer=3, n_head=3, T=29),
    dict(vocab_size=257, n_positions=64, n_embd=64, n_layer=2, n_head=4, T=64),
    dict(vocab_size=1001, n_positions=100, n_embd=96, n_layer=4, n_head=6, T=17),
    dict(vocab_size=50, n_positions=24, n_embd=40, n_layer=1, n_head=5, T=11),
]
FLAGS = [(False, False), (True, False), (False, True), (True, True)]


def _hf_model(shape, inv, reorder, seed=0):
    shape = dict(shape)
    shape.pop("T")
    cfg = transformers.GPT2Config(**shape, scale_attn_by_inverse_layer_idx=inv, reorder_and_upcast_attn=reorder,
                                  bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    m = transformers.GPT2LMHeadModel(cfg).eval()
    # Larger-than-init weights so logits are O(1) and a mismatch cannot hide below the tolerance.
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "ln" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return m


def _hf_logits(m, tokens):
    with torch.no_grad():
        return m(torch.tensor(tokens)).logits.numpy()


@pytest.mark.parametrize("inv,reorder", FLAGS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"v{s['vocab_size']}-p{s['n_positions']}-h{s['n_head']}")
def test_logits_parity_and_round_trip(tmp_path, shape, inv, reorder):
    m = _hf_model(shape, inv, reorder)
    m.save_pretrained(tmp_path / "hf")
    tokens = np.random.RandomState(1).randint(0, shape["vocab_size"], (2, shape["T"]))
    ref = _hf_logits(m, tokens)
    assert np.abs(ref).max() > 1.0  # the tolerance below means something

    cfg, policy, gd, params = hf.load_pretrained(tmp_path / "hf")
    assert cfg.scale_attn_by_inverse_layer_idx == inv
    ours = np.asarray(model.logits(gd, params, tokens))
    assert np.abs(ours - ref).max() <= 1e-4

    hf.save_pretrained(tmp_path / "back", cfg, policy, params)
    m2 = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "back", attn_implementation="eager").eval()
    assert m2.config.scale_attn_by_inverse_layer_idx == inv
    assert np.abs(_hf_logits(m2, tokens) - ours).max() <= 1e-4


def test_flags_map_to_the_policy(tmp_path):
    m = _hf_model(SHAPES[0], inv=True, reorder=True)
    m.save_pretrained(tmp_path)
    _, pol, _, _ = hf.load_pretrained(tmp_path, regime="fp16")
    assert pol.name == "fp16_upcast" and pol.upcasts_attention
    _, pol, _, _ = hf.load_pretrained(tmp_path, regime="bf16")
    assert pol.name == "bf16_upcast"
    cfg, _, _, params = hf.load_pretrained(tmp_path, regime="fp32")
    hf.save_pretrained(tmp_path / "up", cfg, precision.policy("fp16_upcast"), params)
    assert json.loads((tmp_path / "up" / "config.json").read_text())["reorder_and_upcast_attn"] is True
    hf.save_pretrained(tmp_path / "naive", cfg, precision.policy("fp16"), params)
    assert json.loads((tmp_path / "naive" / "config.json").read_text())["reorder_and_upcast_attn"] is False


def test_pytorch_state_dict_loads_with_weights_only(tmp_path):
    m = _hf_model(SHAPES[3], inv=False, reorder=False)
    m.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(m.state_dict(), tmp_path / "pytorch_model.bin")
    tokens = np.random.RandomState(2).randint(0, 50, (1, 11))
    _, _, gd, params = hf.load_pretrained(tmp_path)
    assert np.abs(np.asarray(model.logits(gd, params, tokens)) - _hf_logits(m, tokens)).max() <= 1e-4


def test_mismatched_tensors_are_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    m = _hf_model(SHAPES[3], inv=False, reorder=False)
    m.save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    tensors = load_file(str(f))
    key = next(k for k in tensors if k.endswith("h.0.attn.c_attn.weight"))
    bad = dict(tensors)
    bad[key] = np.zeros((3, 3), np.float32)
    save_file(bad, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"h\.0\.attn\.c_attn\.weight has shape \(3, 3\).*\(40, 120\)"):
        hf.load_pretrained(tmp_path)
    bad = {k: v for k, v in tensors.items() if not k.endswith("ln_f.weight")}
    save_file(bad, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing tensors: ln_f.weight"):
        hf.load_pretrained(tmp_path)
    bad = dict(tensors, **{"transformer.h.0.attn.q_attn.weight": np.zeros((2,), np.float32)})
    save_file(bad, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"does not have: transformer.h.0.attn.q_attn.weight"):
        hf.load_pretrained(tmp_path)


def test_a_padded_token_table_imports_and_exports_as_hf_shapes(tmp_path):
    m = _hf_model(SHAPES[0], inv=True, reorder=False)  # vocab 101
    m.save_pretrained(tmp_path / "hf")
    tokens = np.random.RandomState(3).randint(0, 101, (2, 29))
    cfg, policy, _, _ = hf.load_pretrained(tmp_path / "hf")
    padded = cfg.replace(vocab_multiple=64)
    gd, params = hf.params_from_hf(hf._read_tensors(tmp_path / "hf"), padded, policy)
    assert params["wte"]["embedding"].shape == (128, 48) and not np.asarray(params["wte"]["embedding"][101:]).any()
    ours = np.asarray(model.logits(gd, params, tokens))
    assert ours.shape == (2, 29, 101) and np.abs(ours - _hf_logits(m, tokens)).max() <= 1e-4
    hf.save_pretrained(tmp_path / "back", padded, policy, params)
    m2 = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "back", attn_implementation="eager").eval()
    assert m2.config.vocab_size == 101 and np.abs(_hf_logits(m2, tokens) - ours).max() <= 1e-4


def test_exported_files_are_world_readable(tmp_path):
    cfg = model.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    pol = precision.policy("fp32")
    _, params = model.create(cfg, pol)
    out = hf.save_pretrained(tmp_path / "hf", cfg, pol, params)
    umask = os.umask(0)
    os.umask(umask)
    for name in ("model.safetensors", "config.json"):
        assert ((out / name).stat().st_mode & 0o777) == 0o666 & ~umask, name
