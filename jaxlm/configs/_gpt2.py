"""Mistral's GPT-2 recipe (Stanford CRFM), shared by the gpt2_* configs: what Mistral's released runs
did, as written in its code at release (2021-08: transformers 4.5.0 + DeepSpeed 0.3.13, ZeRO-2;
conf/trainers/gpt2-small.yaml, conf/deepspeed/z2-small-conf.json, src/corpora/auto.py).

512 sequences x 1024 tokens per step, 400K steps, AdamW (0.9, 0.999, eps 1e-8), weight decay
0.1, clip 1.0, dropout 0.1, seeds 21/49/81/343/777, checkpoints on Mistral's dense early schedule,
GPT-2's tokenizer, and the DeepSpeed semantics Mistral trained with (each a switch; README,
"Reproduce Mistral's numbers", says what each reproduces).
"""

from jaxlm.configs import base
from jaxlm.model import SIZES


def recipe(size: str, lr: float):
    """Mistral's recipe for GPT-2 `size` (a key of jaxlm.model.SIZES) at peak learning rate `lr`."""
    c = base.get_config()
    c.model.update(SIZES[size])
    c.model.n_positions = 1024
    # Your corpus and GPT-2's tokenizer (nothing is downloaded): a run without them stops at once with
    # one line saying what to set (--config.data.source=..., --config.data.tokenizer=hf:DIR).
    c.data.source = ""
    c.data.tokenizer_kind = "none"  # GPT-2's BPE, given; never a tokenizer trained on the corpus
    c.data.vocab_size = 50257  # GPT-2's vocabulary size (for parameter counts before a tokenizer is read)
    c.data.eos = False  # Mistral tokenized each document with tokenizer(text), no EOS, and concatenated
    c.data.seed = -1  # the run's seed orders the data, as Mistral's seeded its sampler
    c.precision.regime = "fp16_upcast"
    c.model.scale_attn_by_inverse_layer_idx = True  # Mistral's fix, with the upcast
    c.model.scan_layers = True  # one scanned block: compile time independent of depth (PERFORMANCE.md)
    # DeepSpeed 0.3.13's dynamic loss scaler as a config with only fp16.enabled builds it: 2^32 to start,
    # every overflow halves (no hysteresis), doubled after 1000 clean steps, at least 1.
    c.precision.loss_scale_init = 2.0**32
    c.precision.loss_scale_hysteresis = 1
    c.precision.loss_scale_window = 1000
    c.precision.loss_scale_min = 1.0
    c.precision.loss_scale_update_first = True  # ZeRO-2 updates the scale, then unscales with it
    c.train.steps = 400_000
    c.train.batch_size = 512
    c.train.seq_len = 1024
    c.train.seed = 21
    c.train.eval_every = 1000
    c.train.eval_batches = 0  # the whole validation split, as Mistral's evaluation
    c.optim.lr = lr
    c.optim.warmup_steps = 4000
    c.optim.warmup = "log"  # DeepSpeed 0.3.13's WarmupDecayLR warms up logarithmically
    c.optim.deepspeed_lag = True  # update 1 at optim.lr, then the schedule one behind (DeepSpeed's engine)
    c.optim.schedule = "linear"  # ... then linear decay to 0 at train.steps
    c.optim.decay_mask = "all"  # transformers 4.5 handed DeepSpeed every parameter with decay 0.1
    return c
