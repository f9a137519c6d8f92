"""The fp16 stress preset made deep (6 layers) so that attention-logit growth is not a layer-0 affair:
the question "does layer-index scaling alone prevent the overflow?" then has a real answer
(Hugging Face's scaling never touches layer 0 and divides after the fp16 product; Megatron's scales
Q before the product in every layer, by 1/(sqrt(d_head)·(layer+1))).

    python -m jaxlm.ablate --config=configs/stress_fp16_deep.py --regimes=fp16 \
        --layer-scaling=none,hf,megatron --seeds=21 --out=runs/stress_deep

Same recipe as ``stress_fp16`` (one 256-wide head, lr 3e-2, no weight decay, loss scale 2^10,
seq_len 128), 6 layers, a batch of 8 to keep a cell near a minute on 2 CPU cores. Measured
numbers are in STUDIES.md.
"""

from jaxlm.configs import stress_fp16


def get_config():
    c = stress_fp16.get_config()
    c.model.update(dict(n_layer=6, scale_attn_by_inverse_layer_idx=False))
    c.train.batch_size = 8
    c.train.steps = 80
    c.train.eval_every = 40
    c.checkpoint.stages = ((40, 80),)
    return c
