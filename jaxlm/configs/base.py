"""The config schema: every key jaxlm knows, with its default. Other configs start from this.

The model section is ``jaxlm.model.GPT2Config``'s fields and defaults, so the two cannot disagree.

Values only; ``jaxlm/config.py`` validates them (unknown keys, wrong types, impossible
combinations) before anything is compiled. Override any key from the command line with
``--config.section.key=value``.
"""

import dataclasses

import ml_collections

from jaxlm.model import GPT2Config


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    # --- model: GPT-2 shape and behaviour; every field and default is jaxlm.model.GPT2Config's
    # (names as Hugging Face's GPT2Config; see its comments) ------------------------------------
    c.model = ml_collections.ConfigDict(dataclasses.asdict(GPT2Config()))
    c.model.vocab_size = 0  # 0 = the tokenizer's vocabulary size

    # --- precision: a regime preset; explicit dtypes ('' = the regime's) win --------------
    c.precision = ml_collections.ConfigDict()
    c.precision.regime = "fp32"  # fp32 | bf16 | bf16_upcast | fp16 | fp16_upcast | fp8
    c.precision.param_dtype = ""
    c.precision.compute_dtype = ""
    c.precision.attn_dtype = ""
    # fp16 dynamic loss scaling (DeepSpeed semantics); used only when the policy has fp16.
    c.precision.loss_scale_init = 2.0**16  # the gpt2_* configs: 2**32, DeepSpeed 0.3.13's default (Mistral's)
    c.precision.loss_scale_window = 1000  # clean steps before the scale doubles
    # overflows that halve no scale (the step is still skipped) before one does; 1 = every overflow halves.
    # DeepSpeed's config default is 2, but a config giving only fp16.enabled (Mistral's) gets 1.
    c.precision.loss_scale_hysteresis = 2
    c.precision.loss_scale_min = 1.0
    # True: unscale with the scale as updated by this step (DeepSpeed ZeRO-2's order, Mistral's): on a step
    # where the scale doubles the gradients are halved. False: unscale with the scale the loss was scaled by
    c.precision.loss_scale_update_first = False

    # --- train ------------------------------------------------------------------------------
    c.train = ml_collections.ConfigDict()
    c.train.steps = 400_000
    c.train.batch_size = 512  # global, in sequences
    c.train.micro_batch_size = 0  # per step and globally; 0 = no gradient accumulation
    c.train.seq_len = 1024
    c.train.seed = 21  # init, dropout and (unless data.seed is set) data order, as Mistral's seed did
    c.train.seeds = (21, 49, 81, 343, 777)  # Mistral's five seeds, for ablation grids
    c.train.eval_every = 1000  # 0 = no periodic evaluation
    c.train.eval_batches = 20  # validation batches per evaluation; 0 = the whole validation split (Mistral's)
    # more evaluation sets, each 'NAME=SPEC', logged as eval/NAME/<metric> at every evaluation. SPEC:
    # wikitext:PATH (a WikiText raw file, sliding window, stride 512), lambada:PATH (OpenAI's jsonl, last word),
    # or a data.source spec (its documents as one stream). Files only: nothing is downloaded.
    c.train.eval_sets = ()
    c.train.stop_on_nonfinite = True  # non-finite loss outside fp16 loss scaling stops the run
    # GPU: --xla_gpu_deterministic_ops=true, so reruns are bit-identical (no atomics in scatter and
    # reductions; costs some speed, see README). CPU and TPU are deterministic anyway.
    c.train.deterministic = True
    # --- budgeted training (jaxlm/budget.py): the schedule and the batch ramp read the budget fraction f
    c.train.budget = "none"  # none (step-based) | wall-clock '15m', '2h', '90s' | FLOPs '1e18flops'
    # what a wall-clock budget counts: wall (the steps' seconds) | process (this process's CPU seconds in
    # them, every thread: on a shared machine the other jobs' load then does not shorten a run's budget)
    c.train.budget_clock = "wall"
    c.train.budget_replay = ""  # RUN: replay that finished budgeted run's per-step f exactly (step-based)
    # Under a budget train.steps is not read: the budget ends the run, or this step cap if it comes first
    # (0 = none). An explicit train.steps (--config.train.steps=N, an overrides dict) sets it as well; a
    # config file's own train.steps is the length of its step-based runs and never cuts a budget short.
    c.train.max_steps = 0
    c.train.batch_ramp = 0.0  # >0: micro-batches trained on ramp with f, the full batch from f = this on

    # --- data ---------------------------------------------------------------------------------
    c.data = ml_collections.ConfigDict()
    # stdlib | files:GLOB | jsonl:GLOB | tfds:NAME[:SPLIT] | parquet:GLOB | hf:DIR (a datasets directory) |
    # tokens:GLOB (token shards) | tokens:DIR (nanoGPT's train.bin + val.bin [+ meta.pkl]) |
    # mix:W*SOURCE,W*SOURCE,... (a weighted mixture); GLOB/DIR local or gs://
    c.data.source = "stdlib"
    c.data.seed = -1  # data order (shuffle); -1 = train.seed, so a seed sweep sweeps data order too
    c.data.text_field = "text"  # jsonl
    c.data.on_missing_field = "fail"  # fail | skip  (jsonl lines without text_field)
    c.data.doc_separator = ""  # files: split each file into documents on this string; '' = whole file
    c.data.eos = True  # EOS after every document; False: documents concatenated with nothing between (Mistral)
    c.data.tfds_data_dir = ""  # tfds: where prepared datasets live
    # held-out share when the source has no validation split (nor data.val_source): of its documents, by
    # hash; of its text's tail where it has too few documents for that (one file; jaxlm/data/splits.py)
    c.data.val_fraction = 0.0005
    # a data.source spec whose documents are the validation split (its own validation split where it has
    # one), instead of what data.val_fraction holds out; '' = none
    c.data.val_source = ""
    # PATH.model (SentencePiece) | hf:DIR (Hugging Face: tokenizer.json, or GPT-2's vocab.json + merges.txt);
    # '' = train one on the corpus
    c.data.tokenizer = ""
    # what is trained: sentencepiece (BPE, byte fallback) | byte_bpe (GPT-2-style byte-level BPE, HF format)
    # | none (nothing: data.tokenizer must be given; the gpt2_* configs, whose tokenizer is GPT-2's)
    c.data.tokenizer_kind = "sentencepiece"
    c.data.vocab_size = 8192  # when training the tokenizer
    c.data.tokenizer_max_docs = 20_000  # documents sampled to train the tokenizer
    c.data.tokenizer_max_chars = 50_000_000
    c.data.cache_dir = ""  # '' = this machine's cache ($JAXLM_CACHE, else ~/.cache/jaxlm); a shared directory is fine
    c.data.max_docs = 0  # 0 = all documents (a cap for quick experiments)
    c.data.prefetch = 2  # batches buffered ahead by the loader
    # processes tokenizing the corpus when the token cache is built; 0 or 1 = in this process
    # (the tokenizer's threads over all cores). The rows are the same bytes for any count.
    c.data.workers = 1
    c.data.token_format = "auto"  # tokens: shards: auto | llmc (256-int32 header) | raw (nanoGPT uint16)
    # a token cache on an object store: auto = read by byte ranges when it would not fit on the local
    # disk, else downloaded once; stream | download to insist
    c.data.remote_reads = "auto"

    # --- optim ---------------------------------------------------------------------------
    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 6e-4
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.1  # AdamW, on the parameters optim.decay_mask names
    c.optim.decay_mask = "matrices"  # matrices (kernels, embeddings) | all (every parameter, as Mistral's DeepSpeed)
    c.optim.clip_norm = 1.0  # 0 = no clipping
    c.optim.schedule = "linear"  # linear | cosine | constant (all after warmup)
    c.optim.warmup = "linear"  # linear (0 -> lr) | log (DeepSpeed 0.3.13's WarmupDecayLR: lr*ln(k+1)/ln(W))
    c.optim.warmup_steps = 4000
    # DeepSpeed's scheduler lag (Mistral's runs): the first applied update runs at optim.lr, update n >= 2 at
    # the schedule's value for n - 2 (the scheduler steps after each applied update, none before the first)
    c.optim.deepspeed_lag = False
    c.optim.final_lr_ratio = 0.0  # end of decay, as a fraction of lr
    # --- budget schedules (under train.budget every schedule reads f; these two only exist there)
    c.optim.budget_peak = 0.5  # triangle: f where the lr peaks
    c.optim.budget_decay = 0.2  # wsd: the final share of the budget that decays to the floor
    # --- Muon (configs/speedrun.py): the hidden weight matrices (jaxlm.optim.MUON) trained by Muon, the rest by AdamW
    c.optim.muon = False
    c.optim.muon_lr = 0.02  # Muon's peak lr (optim.lr stays AdamW's); the schedule scales both alike
    c.optim.muon_momentum = 0.95  # Muon's Nesterov momentum

    # --- mesh: device axes; -1 = the rest of the devices ------------------------------------
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    # --- checkpoint ---------------------------------------------------------------------------
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.stages = ((10, 100), (50, 2000), (100, 20000), (1000, 400000))  # Mistral's (every, until)
    c.checkpoint.keep = 0  # 0 = keep all; N = keep the last N ...
    c.checkpoint.keep_every = 0  # ... plus every step divisible by this (0 = none)
    c.checkpoint.latest_every_minutes = 30.0  # time-based 'latest' save for preemptible machines
    c.checkpoint.async_save = True
    c.checkpoint.allow_config_change = False  # resume even if result-changing fields differ (e.g. train.steps)

    # --- distributed: multi-process runs (see jaxlm/distributed.py) --------------------------
    c.distributed = ml_collections.ConfigDict()
    c.distributed.lost_after_s = 10.0  # a peer silent this long is lost: every process stops (0 = off)
    c.distributed.heartbeat_timeout_s = 30  # the coordination service's own (backstop) heartbeat timeout
    c.distributed.shutdown_timeout_s = 30  # how long a finishing process waits for the others at exit
    c.distributed.init_timeout_s = 120  # how long a process waits for every other to join (raise it where hosts start far apart)

    # --- log ---------------------------------------------------------------------------------
    c.log = ml_collections.ConfigDict()
    c.log.every = 10
    c.log.stats_every = 100  # per-layer activation/attention stats (a costlier step); 0 = off
    c.log.wandb_mode = "offline"  # disabled | offline | online
    c.log.wandb_project = "jaxlm"
    # W&B's grouping (jaxlm.ablate sets them per cell: the study, the regime, the keys the grid switches)
    c.log.wandb_group = ""  # the run's group ("" = none)
    c.log.wandb_job_type = ""  # its job type ("" = none)
    c.log.wandb_keys = ()  # config keys also logged as top-level W&B config, by their last name (e.g. 'lr')
    c.log.tensorboard = True  # event files in WORKDIR/tensorboard (tensorboard --logdir runs/)
    c.log.profile_steps = 0  # > 0: a jax.profiler trace of this many steps into WORKDIR/tensorboard (XProf)
    c.log.profile_start = 10  # ... of the steps after this one (after compiles and warm-up)
    c.log.peak_tflops = 0.0  # override the device peak used for MFU (0 = from the table)
    return c
