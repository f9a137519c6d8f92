"""Mistral's GPT-2 recipe (Stanford CRFM), shared by the gpt2_* configs.

512 sequences x 1024 tokens per step, 400K steps, AdamW (0.9, 0.999, eps 1e-8), weight decay
0.1, clip 1.0, 4000 warmup steps then linear decay to 0, dropout 0.1, seeds 21/49/81/343/777,
checkpoints on Mistral's dense early schedule.
"""

from jaxlm.configs import base
from jaxlm.model import SIZES


def recipe(size: str, lr: float):
    """Mistral's recipe for GPT-2 `size` (a key of jaxlm.model.SIZES) at peak learning rate `lr`."""
    c = base.get_config()
    c.model.update(SIZES[size])
    c.model.n_positions = 1024
    c.data.vocab_size = 50257  # GPT-2's vocabulary size, so parameter counts match the paper's
    c.data.source = "tfds:c4/en:train"  # set your corpus: --config.data.source=...
    c.precision.regime = "fp16_upcast"
    c.model.scale_attn_by_inverse_layer_idx = True  # Mistral's fix, with the upcast
    c.model.scan_layers = True  # one scanned block: compile time independent of depth (PERFORMANCE.md)
    c.train.steps = 400_000
    c.train.batch_size = 512
    c.train.seq_len = 1024
    c.train.seed = 21
    c.optim.lr = lr
    c.optim.warmup_steps = 4000
    c.optim.schedule = "linear"
    return c
