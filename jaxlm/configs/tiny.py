"""The CPU quickstart: a 2-layer, d=64 GPT-2 on the offline stdlib corpus; about a minute on 2 CPU cores.

    python -m jaxlm.main --config=configs/tiny.py --workdir=runs/tiny
"""

from jaxlm.configs import _gpt2, base
from jaxlm.model import SIZES


def get_config():
    c = base.get_config()
    c.model.update(SIZES["tiny"])
    c.model.update(dict(n_positions=128, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0))
    c.data.source = "stdlib"
    c.data.vocab_size = 1024
    c.data.tokenizer_max_docs = 2000
    c.data.max_docs = 0
    c.data.val_fraction = 0.02
    c.precision.regime = "fp32"
    c.train.steps = 300
    c.train.batch_size = 16
    c.train.seq_len = 128
    c.train.eval_every = 100
    c.train.eval_batches = 4
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 30
    c.optim.weight_decay = 0.1
    c.checkpoint.stages = ((100, 300),)
    c.checkpoint.latest_every_minutes = 5.0
    c.log.every = 10
    c.log.stats_every = 50
    return c


def budget_base(size: str, lr: float):
    """The base of a budget recipe (configs/crammed.py, configs/speedrun.py): this tiny config, saving
    at 1000-step intervals and evaluating every 250 steps, or GPT-2 `size` with Mistral's recipe at `lr`."""
    if size != "tiny":
        return _gpt2.recipe(size, lr=lr)
    c = get_config()
    c.checkpoint.stages = ((1000, 1_000_000),)
    c.train.eval_every = 250
    return c
