"""Mistral's Figure 3 at small scale, on a CPU in a few minutes: naive fp16 attention overflows,
fp16_upcast (with layer-index scaling) trains like fp32.

    python -m jaxlm.ablate --config=configs/stress_fp16.py --regimes=fp32,fp16,fp16_upcast \
        --layer-scaling=on --seeds=21 --out=runs/stress

The mechanism is attention-logit growth (Dehghani et al. 2023; Wortsman et al. 2023, "Small-scale
proxies for large-scale Transformer training instabilities"): at a high learning rate the query
and key weights grow quickly and so does QK^T. We make it visible at toy scale with

* a high learning rate (3e-2, no weight decay) -- the driver of the growth;
* one 256-wide attention head, so each score sums 256 products, as wide heads do;
* normal GPT-2 initialisation (0.02), seq_len 128, 2 layers.

Measured here: layer 0's largest scaled score grows from ~1.3e3 at step 10 to ~1.4e4 by step 40,
i.e. a raw QK^T of ~2e5. In ``fp16`` the product is computed in fp16 and becomes inf past 65504
(from about step 15): non-finite scores and NaN logits, every step skipped by the loss scaler,
the loss stuck. ``fp16_upcast`` computes the same product in fp32 and trains like ``fp32``. The
initial loss scale is 2^10 rather than DeepSpeed's 2^16 so that the fp16 regimes' gradients do not
overflow for scale calibration alone: the only overflow left is the attention one.
"""

from jaxlm.configs import tiny


def get_config():
    c = tiny.get_config()
    c.model.update(dict(n_embd=256, n_head=1, n_layer=2, n_positions=128,
                        scale_attn_by_inverse_layer_idx=True))
    c.precision.regime = "fp16_upcast"
    c.precision.loss_scale_init = 2.0**10
    c.optim.lr = 3e-2
    c.optim.warmup_steps = 5
    c.optim.weight_decay = 0.0
    c.train.steps = 100
    c.train.eval_every = 50
    c.log.every = 5
    c.log.stats_every = 5
    c.checkpoint.stages = ((50, 100),)
    return c
