"""Shared defaults of every unijax config: one documented place for each knob.

A config file builds on `get_base_config()` and changes what differs. Sections:
    model       the unified model: `llm` (MoT decoder), `vit` (or None), `vae` (or None), connectors
    attention   which attention backend and its block sizes
    data        packed-row capacities, batch size, datasets
    train       optimisation and losses
    init        a fresh run's weights from released parts or another run's checkpoint
    checkpoint  Orbax checkpointing
    mesh        device mesh shape and the logical-axis -> mesh-axis rules

`unijax.config.validate(config)` checks a finished config before anything compiles.
"""

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
    """Returns the defaults (unlocked, so a config file can add and change fields)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    # Build the model from abstract shapes only, print the parameter count and exit.
    c.dry_run = False
    # jax's persistent compilation cache ("" = off): a restarted or preempted job, and every
    # host of a pod, then loads its compiled programs instead of compiling them again.
    c.compilation_cache_dir = ""

    # --- model -------------------------------------------------------------------------------
    c.model = ml_collections.ConfigDict()
    c.model.dtype = "bfloat16"  # activations / compute
    c.model.param_dtype = "float32"  # master weights

    llm = c.model.llm = ml_collections.ConfigDict()
    llm.vocab_size = 152064
    llm.hidden_size = 3584
    llm.num_layers = 28
    llm.num_heads = 28
    llm.num_kv_heads = 4
    llm.head_dim = 128
    llm.intermediate_size = 18944
    llm.rope_theta = 1e6
    llm.rms_norm_eps = 1e-6
    llm.qk_norm = True
    llm.qkv_bias = True
    llm.tie_embeddings = False
    # 1: dense Transfusion-style model; 2: MoT (und expert: text + ViT, gen expert: VAE latents).
    llm.num_experts = 2
    # LlamaFusion / BAGEL `freeze_und`: the und expert gets no update and no optimizer state.
    llm.freeze_und_expert = False
    # BAGEL `copy_init_moe`: the gen expert starts as a copy of the und expert.
    llm.init_gen_from_und = True
    llm.scan_layers = True
    llm.remat_policy = "none"  # none | full | save_dots
    # LoRA (unijax/models/lora.py): rank 0 = none. With a rank, adapters sit on `lora_targets`
    # of the `lora_experts` (e.g. only the gen expert's attention and MLP), only they train and
    # only they are saved; the frozen base is `config.init.checkpoint`'s weights.
    llm.lora_rank = 0
    llm.lora_alpha = 16.0  # the update is alpha / rank * (x A) B
    llm.lora_experts = ("gen",)
    llm.lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                        "down_proj")

    c.model.vit = None  # a ConfigDict (see configs/bagel_7b_mot.py) or None: no understanding tower
    c.model.vae = None  # a ConfigDict or None: generate in pixel space (patches of raw pixels)
    # Side of the square table of 2D latent positions (BAGEL: 64 -> 1024 px images with a VAE).
    c.model.max_latent_size = 64
    # Latent tokens are latent_patch_size x latent_patch_size patches of the VAE latent (or of
    # pixels when vae is None).
    c.model.latent_patch_size = 2
    c.model.latent_channels = 16  # VAE latent channels (3 when vae is None: pixels)

    # --- attention ---------------------------------------------------------------------------
    c.attention = ml_collections.ConfigDict()
    c.attention.impl = "xla"  # xla | auto | pallas_tpu | pallas_gpu | cudnn
    c.attention.chunk_size = 512  # key chunk of the xla reference (memory O(L * chunk))
    # Tiles of the Pallas kernels (query x key tokens), forward and backward; 0: the platform's
    # default (TPU 512 x 512 / 256 x 256, GPU 128 x 64 / 64 x 64). Row lengths must be multiples.
    c.attention.block_q = 0
    c.attention.block_kv = 0
    c.attention.block_q_bwd = 0
    c.attention.block_kv_bwd = 0
    c.attention.interpret = False  # Pallas kernels in the interpreter (CPU tests, debugging)

    # --- data --------------------------------------------------------------------------------
    c.data = ml_collections.ConfigDict()
    c.data.batch_size = 8  # global rows per step
    # Expert-major rows: [und tokens | gen tokens]. und holds text + ViT tokens, gen VAE latents.
    c.data.und_capacity = 16384
    c.data.gen_capacity = 16384
    c.data.max_vit_patches = 8192  # ViT patches per row (NaViT packed)
    c.data.max_vae_images = 8  # VAE images per row
    c.data.vae_image_size = 1024  # pixels, side of the largest VAE image (resolution bucket)
    c.data.vit_image_size = 980  # pixels, longest side of a ViT image
    # Short-side minimums (BAGEL: ImageTransform(980, 224, 14) for ViT, (1024, 512, 16) for VAE).
    c.data.vit_min_image_size = 224
    c.data.vae_min_image_size = 512
    c.data.max_image_pixels = 64 * 1024 * 1024  # decode limit; larger images are skipped
    c.data.overlong = "truncate"  # truncate | drop: a document larger than an empty row
    # Documents held back for a later batch when they fit no open row (BAGEL's look-ahead
    # buffer); 0 = plain first-fit.
    c.data.pack_buffer = 16
    c.data.tokenizer = "byte"  # "byte" (built-in) or a local HF tokenizer (dir or tokenizer.json)
    c.data.shuffle = True
    c.data.num_epochs = 0  # 0: repeat forever (training); n: stop after n passes (evals, tests)
    c.data.num_workers = 0  # Grain multiprocessing workers (0: decode in this process)
    c.data.read_threads = 4  # threads per worker that fetch and decode records
    c.data.prefetch_buffer_size = 16  # records buffered per worker
    c.data.worker_buffer_size = 2  # packed batches buffered per worker
    # Bad storage (unijax/data/sources.py). A shard that does not open (truncated, no footer,
    # not an ArrayRecord file) is reported with its path at start-up and left out ("skip", so a
    # restarted pod does not crash-loop on it; counted as data/skipped_bad_shard) or stops the
    # job ("fail"). A record in a damaged chunk is skipped and counted as "unreadable".
    c.data.on_bad_shard = "skip"
    # Stop with an error when more than this fraction of the records read were skipped (any
    # reason), checked once skip_fraction_min_records were read; 1.0: never stop.
    c.data.max_skip_fraction = 0.1
    c.data.skip_fraction_min_records = 1000
    # The mixture: name -> data_source(...) or tfds_source(...) (see below); weights are
    # relative sampling rates.
    c.data.datasets = ml_collections.ConfigDict()
    # Per-dataset metric buckets: a static bound (>= the number of datasets), so a new mixture
    # does not recompile the train step.
    c.data.max_datasets = 16
    # Held-out data for the periodic evaluation (same entries; read once, in order, without
    # condition dropout). Empty: no held-out evaluation.
    c.data.eval_datasets = ml_collections.ConfigDict()
    # The embedded worlds: dataset paths may start with "{worlds}/" (e.g.
    # "{worlds}/shapes/train-*.array_record"); the main job then writes the worlds once into
    # `dir` (default WORKDIR/worlds) with these record counts, unless they are already there.
    c.data.worlds = ml_collections.ConfigDict()
    c.data.worlds.dir = ""
    c.data.worlds.shapes_train = 2000
    c.data.worlds.shapes_eval = 260
    c.data.worlds.digits_train = 1000
    c.data.worlds.digits_eval = 300
    c.data.worlds.image_size = 32
    # The shapes train split's kinds per cycle, "kind=count,..." in cycle order ("": the
    # world's default mix, shapes.DEFAULT_MIX).
    c.data.worlds.shapes_mix = ""
    c.data.worlds.seed = 0

    # --- training ----------------------------------------------------------------------------
    # BAGEL's recipe (train/pretrain_unified_navit.py): AdamW (0.9, 0.95), eps 1e-15, no weight
    # decay, clip 1.0, 2000 warmup steps then constant, EMA 0.9999, CE and MSE weights 1.
    c.train = ml_collections.ConfigDict()
    c.train.steps = 500_000
    c.train.lr = 1e-4
    c.train.warmup_steps = 2000
    c.train.schedule = "constant"  # after warmup: constant | cosine | linear (to min_lr)
    c.train.min_lr = 0.0
    c.train.b1 = 0.9
    c.train.b2 = 0.95
    c.train.eps = 1e-15
    c.train.weight_decay = 0.0  # decoupled, on weight matrices only (training/optim.py)
    c.train.grad_clip = 1.0  # global norm; 0 = off
    c.train.ema_decay = 0.9999  # EMA of the trainable parameters; 0 = no EMA kept
    # Memory levers (training/optim.py; benchmarks/aot.py measures them): Adam's moments in
    # "float32" or "bfloat16" (half their memory); the EMA on the "device" or in pinned "host"
    # memory (off the accelerator, brought over for its update).
    c.train.optimizer_state_dtype = "float32"
    c.train.ema_memory = "device"
    # Micro-batches per step: the global batch is split k ways, gradients are summed over the
    # same global normalisers, so the step equals the full-batch step.
    c.train.grad_accum = 1
    c.train.ce_weight = 1.0
    c.train.mse_weight = 1.0
    c.train.z_loss_weight = 0.0  # weight of logsumexp(logits)^2 (PaLM's z-loss)
    c.train.ce_chunk_size = 2048  # und tokens per LM-head chunk (no [B, L, V] logits at once)
    # Flow time shift s in t' = s t / (1 + (s - 1) t) applied to the data plan's t.
    c.train.timestep_shift = 1.0
    # Which parameters train, by regexes over "/"-joined paths (training/optim.py): only those
    # matching `trainable` (empty: all), never those matching `freeze`; lr_multipliers are
    # (regex, factor) pairs, first match wins.
    c.train.trainable = ()
    c.train.freeze = ()
    c.train.lr_multipliers = ()
    # A step whose loss or gradients are not finite is skipped (state unchanged); this many in
    # a row stop the run.
    c.train.max_nonfinite_steps = 20
    c.train.log_every = 10
    # Held-out evaluation on config.data.eval_datasets: CE and flow MSE at fixed times with
    # fixed noise (comparable across steps and runs); 0 = only at the start and the end.
    c.train.eval_every = 1000
    c.train.eval_batches = 4  # 0: no held-out evaluation (smoke runs)
    c.train.eval_timesteps = (0.25, 0.5, 0.75, 0.9)
    c.train.eval_seed = 1234

    # --- initialisation (unijax/training/init.py) --------------------------------------------
    # Where a fresh run's weights come from instead of the random init: BAGEL's released parts
    # (Qwen2.5 LLM + SigLIP + FLUX VAE) and/or another unijax run's checkpoint (read first; the
    # files replace what it set). "" = none; what no source names keeps its fresh init (e.g.
    # the connectors). Only on a fresh start: a run resuming its own checkpoint ignores this.
    c.init = ml_collections.ConfigDict()
    c.init.llm = ""  # HF Qwen2 / Qwen2.5 directory (config.json + safetensors): the und expert
    c.init.vit = ""  # HF SigLIP directory (SiglipVisionModel or SiglipModel weights)
    c.init.vae = ""  # FLUX ae.safetensors, or a diffusers AutoencoderKL directory
    c.init.checkpoint = ""  # a unijax workdir or checkpoint directory
    c.init.checkpoint_step = -1  # -1: its newest complete checkpoint
    # ema (BAGEL's finetune_from_ema) | params (resume_model_only); the optimizer starts fresh.
    c.init.checkpoint_weights = "ema"
    c.init.required = False  # True: a run with no source above is a config error (fine-tunes)

    # --- checkpointing -----------------------------------------------------------------------
    # Orbax: train state (sharded, each host writes its shards), data iterator, config JSON.
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.dir = ""  # default WORKDIR/checkpoints
    c.checkpoint.every_steps = 1000
    c.checkpoint.max_to_keep = 3
    c.checkpoint.async_save = True

    # --- sampling (unijax/inference, `python -m unijax.sample`) ------------------------------
    # BAGEL's defaults (inferencer.py / the notebook): 50 points of the time grid (49 Euler
    # steps), shift 3; guidance scales, interval on the shifted time and renorm per mode.
    c.sample = ml_collections.ConfigDict()
    c.sample.steps = 50
    c.sample.shift = 3.0
    c.sample.capacity = 0  # KV-cache slots per conversation; 0 = und + gen capacity x 2
    c.sample.max_new_tokens = 64
    c.sample.t2i = guidance(text_scale=4.0, image_scale=1.0, interval=(0.4, 1.0),
                            renorm="global")
    c.sample.edit = guidance(text_scale=4.0, image_scale=2.0, interval=(0.0, 1.0),
                             renorm="text_channel")

    # --- judges (training/judges.py): the embedded worlds' judges score what the model draws
    # and answers at step 0 and at the end (report.json), samples go to TensorBoard every
    # config.train.eval_every steps. Only meaningful for models trained on the worlds.
    c.judges = ml_collections.ConfigDict()
    c.judges.enabled = False
    c.judges.num_per_category = 16  # prompts per GenEval category and questions per type
    c.judges.num_digits = 100
    c.judges.batch_size = 64  # rows per sampling call
    c.judges.steps = 25  # points of the sampling time grid (24 Euler steps)
    c.judges.tb_samples = 4  # images per sample prompt in TensorBoard

    # --- mesh --------------------------------------------------------------------------------
    # Axis sizes; -1 takes every device the other axes leave. Their product must equal the number
    # of devices.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    # Multi-slice (TPU slices joined by the data-centre network): the slices split the axis
    # `slice_axis` (sizes above are global), so only it crosses the DCN; same logical rules.
    c.mesh.num_slices = 1
    c.mesh.slice_axis = "data"
    return c


def guidance(*, text_scale: float, image_scale: float, interval: tuple[float, float],
             renorm: str, renorm_min: float = 0.0) -> ml_collections.ConfigDict:
    """One mode of classifier-free guidance (`inference/image.py` defines the formulas)."""
    g = ml_collections.ConfigDict()
    g.text_scale = text_scale
    g.image_scale = image_scale
    g.interval = interval
    g.renorm = renorm  # global | channel | text_channel
    g.renorm_min = renorm_min
    return g


def siglip_so400m_vit() -> ml_collections.ConfigDict:
    """SigLIP so400m/14 as BAGEL uses it: 26 of its 27 layers (`vit_select_layer=-2`)."""
    v = ml_collections.ConfigDict()
    v.hidden_size = 1152
    v.num_layers = 26
    v.num_heads = 16
    v.intermediate_size = 4304
    v.patch_size = 14
    v.max_grid = 70  # side of the learned 2D position table (70 x 70 = 4900 entries)
    v.layer_norm_eps = 1e-6
    v.position_mode = "extrapolate"  # extrapolate | interpolate (to each image's patch grid)
    return v


def flux_vae() -> ml_collections.ConfigDict:
    """The FLUX autoencoder (`ae.safetensors`): 8x downsample, 16 latent channels."""
    v = ml_collections.ConfigDict()
    v.in_channels = 3
    v.latent_channels = 16
    v.base_channels = 128
    v.channel_mult = (1, 2, 4, 4)
    v.num_res_blocks = 2
    v.norm_groups = 32
    v.norm_eps = 1e-6
    v.scaling_factor = 0.3611
    v.shift_factor = 0.1159
    v.sample_posterior = True  # BAGEL encodes by sampling the posterior, not its mean
    return v


def data_source(paths: str, weight: float = 1.0, **plan_options) -> ml_collections.ConfigDict:
    """One entry of `config.data.datasets`: ArrayRecord shards, a mixture weight, plan options
    (`tfds_source` below reads a prepared TFDS dataset instead).

    Args:
      paths: a glob or comma-separated globs of `.array_record` shards (unijax.data.records).
      weight: relative sampling rate in the mixture.
      **plan_options: overrides of `unijax.data.plan.PlanOptions` (defaults below, BAGEL's).
    """
    d = ml_collections.ConfigDict()
    d.paths = paths
    d.weight = weight
    # Classifier-free guidance: drop conditions of generation targets (BAGEL 0.1 / 0.3 / 0.3).
    d.text_cond_dropout = 0.1
    d.vit_cond_dropout = 0.3
    d.vae_cond_dropout = 0.3
    d.context_text_loss = True  # CE loss on interleaved document text
    d.interleaved_images = "generate"  # generate (noisy VAE -> clean VAE -> ViT) | understand
    d.video_noise = "shared"  # shared: one flow time per clip | independent: per frame
    d.video_context_frames = 1  # leading frames given as clean VAE conditioning
    d.video_captions = True  # interleave per-frame captions of what changed
    d.video_caption_loss = False
    d.max_video_frames = 16
    d.video_frame_size = 0  # pixels, long side of a video frame (0: config.data.vae_image_size)
    d.ce_loss_reweighting = False  # CE weight 1/sqrt(n) per text of n loss tokens (BAGEL's flag)
    for key, value in plan_options.items():
        if key not in d:
            raise KeyError(f"data_source: unknown plan option {key!r}; known: {sorted(d)}")
        d[key] = value
    return d


def tfds_source(name: str, split: str = "train", data_dir: str = "", adapter: str = "caption",
                weight: float = 1.0, *, image_feature: str = "image",
                text_feature: str = "caption", question_feature: str = "question",
                answer_feature: str = "answer", **plan_options) -> ml_collections.ConfigDict:
    """One entry of `config.data.datasets` read from a TFDS dataset prepared in ArrayRecord
    format (`tfds.data_source` style: no TensorFlow, nothing downloaded).

    Args:
      name: the TFDS name, e.g. "coco_captions" or "my_set/config:1.0.0".
      split: a TFDS split, slices included ("train[:90%]").
      data_dir: where it was prepared ("": TFDS's default, ~/tensorflow_datasets).
      adapter: how an example becomes a record (unijax/data/tfds_sources.py): "caption"
        (image + text -> caption), "t2i" (text -> image) or "vqa" (image + question + answer).
      weight: relative sampling rate in the mixture.
      image_feature / text_feature / question_feature / answer_feature: the example's
        feature names the adapter reads.
      **plan_options: as for `data_source`.
    """
    d = data_source("", weight, **plan_options)
    d.tfds = ml_collections.ConfigDict()
    d.tfds.name = name
    d.tfds.split = split
    d.tfds.data_dir = data_dir
    d.tfds.adapter = adapter
    d.tfds.image_feature = image_feature
    d.tfds.text_feature = text_feature
    d.tfds.question_feature = question_feature
    d.tfds.answer_feature = answer_feature
    return d
