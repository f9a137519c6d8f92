"""Cramming for a decoder: Geiping & Goldstein's budget recipe (*Cramming: Training a Language Model
on a Single GPU in One Day*, 2023) as switches on jaxlm's GPT-2, trained to a wall-clock budget.

    python -m jaxlm.main --config=configs/crammed.py --workdir=runs/crammed            # tiny, 10 minutes
    python -m jaxlm.main --config=configs/crammed.py:small --workdir=runs/crammed-small  # GPT-2 small, 20 minutes

Each switch below carries the paper's reason (Cramming studied an encoder, BERT; here the same
changes are applied to GPT-2's decoder, which the paper did not test). Everything not listed is the
base config's (``tiny``: configs/tiny.py; ``small``: Mistral's recipe, jaxlm/configs/_gpt2.py), the
sequence length included. ``crammed(c)`` applies the recipe to any config.

Not HF-exportable: the embedding LayerNorm and the gated MLP change GPT-2's function
(``jaxlm.hf.unexportable``); a model with only ``use_bias=False`` exports (as zero biases).
"""

from jaxlm.configs import tiny

BUDGETS = {"tiny": "10m", "small": "20m"}


def crammed(c, budget: str):
    """`c` with Cramming's recipe switched on, trained to `budget`."""
    # Architecture -------------------------------------------------------------------------------
    # No biases in the Linear layers: they cost time and memory yet hardly help ("disabling all
    # linear layer biases ... does not reduce performance per step but speeds up each step").
    c.model.use_bias = False
    # No dropout: with a small budget a run sees each token about once, so there is nothing to
    # regularise against, and dropout only slows learning per step and per second.
    c.model.embd_pdrop = c.model.attn_pdrop = c.model.resid_pdrop = 0.0
    # Pre-LN blocks with a final LayerNorm before the head (GPT-2's ln_f), plus a LayerNorm on the
    # embedding: Cramming found the embedding norm stabilises the early, high-learning-rate phase.
    c.model.ln_final = True
    c.model.ln_embed = True
    # Gated GELU (GLU) MLP: a small, consistent gain in the paper, at a lower parameter count here
    # (c_fc's outputs are split into the gate and the value, so the hidden width halves).
    c.model.mlp_kind = "gated_gelu"
    # Optimizer ------------------------------------------------------------------------------------
    # AdamW with beta2 0.98 and a tiny epsilon (RoBERTa's settings, which Cramming kept), weight decay
    # 0.01 on matrices only (the decay mask), clipping at 0.5: the paper's stable settings.
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.98, 1e-12
    c.optim.weight_decay = 0.01
    c.optim.decay_mask = "matrices"
    c.optim.clip_norm = 0.5
    # Peak lr 1e-3 on a one-cycle triangle by budget fraction (Cramming's budget-triangle schedule):
    # tying the schedule to the budget anneals the run exactly at the deadline whatever the step rate;
    # the rising half is the warmup, so no step-based warmup.
    c.optim.lr = 1e-3
    c.optim.schedule = "triangle"
    c.optim.budget_peak = 0.5
    c.optim.warmup_steps = 0
    c.optim.warmup, c.optim.deepspeed_lag = "linear", False  # (Mistral's DeepSpeed lag is step-based)
    c.optim.final_lr_ratio = 0.0
    # Batch-size ramp: start with small batches (more updates per second while the loss falls fast)
    # and reach the final batch at 60% of the budget (the paper's "aggressive batch size schedule").
    # Here the ramp counts micro-batches of train.micro_batch_size (see jaxlm/budget.py).
    c.train.micro_batch_size = max(c.train.batch_size // 4, 1)
    c.train.batch_ramp = 0.6
    # Budget ---------------------------------------------------------------------------------------
    c.train.budget = budget
    return c


def get_config(size: str = "tiny"):
    return crammed(tiny.budget_base(size, lr=1e-3), BUDGETS.get(size, "1h"))
