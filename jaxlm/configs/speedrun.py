"""The speedrun: modded-nanogpt's recipe (Keller Jordan et al., 2024-25: GPT-2 small to 3.28 FineWeb
validation loss in minutes on 8×H100) as switches on jaxlm's GPT-2, trained to a wall-clock budget.

    python -m jaxlm.main --config=configs/speedrun.py --workdir=runs/speedrun              # tiny, 10 minutes
    python -m jaxlm.main --config=configs/speedrun.py:small --workdir=runs/speedrun-small  # GPT-2 small, 20 minutes

Each switch below carries its reason. Everything not listed is the base config's (``tiny``:
configs/tiny.py; ``small``: Mistral's recipe, jaxlm/configs/_gpt2.py), the sequence length and the
precision regime included. ``speedrun(c, budget)`` applies the recipe to any config.

Left out (issue 39 part 1): value embeddings and U-net skip connections (both reach across layers,
which the scanned stack of identical blocks, model.scan_layers, does not have), the sequence-length
and attention-window warmups, Muon's momentum warmup, FP8 head matmuls (the precision regime
decides dtypes: precision.regime), and modded-nanogpt's per-group AdamW learning rates (embeddings,
head and gains share optim.lr here).

Not HF-exportable: RoPE, the QK-norm, the embedding norm and the untied head change GPT-2's function
(``jaxlm.hf.unexportable``).
"""

from jaxlm.configs import tiny

BUDGETS = {"tiny": "10m", "small": "20m"}


def speedrun(c, budget: str):
    """`c` with the speedrun's recipe switched on, trained to `budget`."""
    # Architecture -------------------------------------------------------------------------------
    # Rotary position embeddings on q and k, no learned position table: the scores see relative
    # positions only, which generalise across offsets and train faster than a learned wpe.
    c.model.rope = True
    # base 1024: the slowest plane turns at about 1/1024 rad per position, modded-nanogpt's lowest frequency
    # (it also leaves half the planes unrotated, "half-truncated" RoPE; here every plane turns)
    c.model.rope_base = 1024.0
    # QK-norm: an RMSNorm (with a gain) on each head's q and k bounds the attention logits whatever the
    # weights' scale, which lets Muon's large, orthogonal updates train the attention without blow-ups.
    c.model.qk_norm, c.model.qk_norm_kind = True, "rms"
    # Not switched on, because they lost at this size (STUDIES.md, issue 39's ablation: 2 minutes, seed
    # 21, each dropped alone from the whole recipe): the ReLU² MLP (model.mlp_kind="relu2"; GELU was
    # 0.092 nats better), the logit soft-cap (model.logit_softcap=15; 0.076 better without, and its tanh
    # over the vocabulary makes each step dearer) and warmup-stable-decay (optim.schedule="wsd",
    # budget_decay=0.4; linear decay was 0.058 better). All three stay available as switches.
    # Output projections (attn and mlp c_proj) start at zero: each block starts as the identity, so the
    # first steps train a shallow model and depth is added as the projections grow (modded-nanogpt, muP-like).
    c.model.zero_init_proj = True
    # An untied head: the input embedding (a lookup) and the output projection (a classifier) want different
    # geometry and learning rates; modded-nanogpt unties them (whether that pays at tiny size: issue 39's ablation).
    c.model.tie_word_embeddings = False
    # No Linear biases and no dropout (modded-nanogpt has neither): each token is seen about once.
    c.model.use_bias = False
    c.model.embd_pdrop = c.model.attn_pdrop = c.model.resid_pdrop = 0.0
    # A norm on the embedding's output (modded-nanogpt's norm(embed(x))): the residual stream starts at
    # unit scale whatever the embedding's lr does to the table.
    c.model.ln_embed = True
    # Optimizer ------------------------------------------------------------------------------------
    # Muon for the hidden matrices (c_attn per q/k/v, c_proj, c_fc): momentum orthogonalised by five
    # Newton-Schulz steps, so every direction of a matrix moves at the same rate, the speedrun's largest
    # single gain; AdamW for embeddings, head and gains (jaxlm.optim.MUON is the table).
    c.optim.muon = True
    c.optim.muon_lr, c.optim.muon_momentum = 0.05, 0.95
    # AdamW with modded-nanogpt's betas (0.8, 0.95) and a tiny eps, at its head's lr; no weight decay
    # and no clipping: both optimisers normalise their steps, and a budget this short does not overfit.
    c.optim.lr = 8e-3
    c.optim.b1, c.optim.b2, c.optim.eps = 0.8, 0.95, 1e-10
    c.optim.weight_decay = 0.0
    c.optim.clip_norm = 0.0
    # A linear decay to 0 by budget fraction (tied to the budget, so the run anneals exactly at the
    # deadline whatever the step rate), after a few steps of warmup for AdamW's moments. (modded-nanogpt's
    # trapezoid, optim.schedule="wsd", lost to it here: see above.)
    c.optim.schedule = "linear"
    c.optim.final_lr_ratio = 0.0
    c.optim.warmup_steps = 10
    c.optim.warmup, c.optim.deepspeed_lag = "linear", False  # (Mistral's DeepSpeed lag is step-based)
    # Budget ---------------------------------------------------------------------------------------
    c.train.budget = budget
    return c


def get_config(size: str = "tiny"):
    return speedrun(tiny.budget_base(size, lr=8e-3), BUDGETS.get(size, "1h"))
