r"""Tiny unified model on the embedded worlds: the CPU default, trains in minutes on a laptop.

  python -m unijax.main --config=configs/tiny.py --workdir=/tmp/tiny

Two-expert MoT of 4 layers at width 128 with a 2-layer ViT on 32 px images; no VAE: images are
generated in pixel space as 4x4 RGB patches (48 features per token). The vocabulary is the
built-in byte-level tokenizer's (256 bytes + special tokens). The data are the embedded worlds
(shapes and digits), written into WORKDIR/worlds on the first run; held-out CE and flow MSE
are measured on their eval splits.
"""

import ml_collections

from configs import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the tiny CPU config (no variants yet; `arg` is accepted for uniformity)."""
    del arg
    c = base.get_base_config()
    c.model.dtype = "float32"

    llm = c.model.llm
    llm.vocab_size = 320
    llm.hidden_size = 128
    llm.num_layers = 4
    llm.num_heads = 4
    llm.num_kv_heads = 2
    llm.head_dim = 32
    llm.intermediate_size = 384
    llm.rope_theta = 10_000.0

    vit = c.model.vit = base.siglip_so400m_vit()
    vit.hidden_size, vit.num_layers, vit.num_heads, vit.intermediate_size = 64, 2, 4, 128
    vit.patch_size, vit.max_grid = 4, 16

    c.model.vae = None
    c.model.latent_channels = 3
    c.model.latent_patch_size = 4
    c.model.max_latent_size = 16

    c.attention.chunk_size = 128
    c.data.batch_size = 8
    c.data.und_capacity = 256
    c.data.gen_capacity = 128
    c.data.max_vit_patches = 128
    c.data.max_vae_images = 2
    c.data.vae_image_size = 32
    c.data.vit_image_size = 32
    c.data.vit_min_image_size = 16
    c.data.vae_min_image_size = 16

    # The embedded worlds (written into WORKDIR/worlds on the first run).
    c.data.datasets.shapes = base.data_source("{worlds}/shapes/train-*.array_record", weight=2.0)
    c.data.datasets.digits = base.data_source("{worlds}/digits/train-*.array_record", weight=1.0)
    c.data.eval_datasets.shapes = base.data_source("{worlds}/shapes/eval-*.array_record")
    c.data.eval_datasets.digits = base.data_source("{worlds}/digits/eval-*.array_record")

    # Chosen for what sampling needs, within ~15 minutes on 2 CPU cores (benchmarks/RESULTS.md,
    # "main job"): the held-out CE and flow MSE targets are met by step ~600 at BAGEL's
    # settings, but samples are then blobs, because layout is decided at high noise and a
    # logit-normal t rarely visits it. So: a timestep shift of 3 (BAGEL's sampling shift;
    # median training time 0.75), 2500 steps, a higher peak lr with a cosine decay, and an EMA
    # of about 200 steps.
    c.train.steps = 2500
    c.train.lr = 2e-3
    c.train.warmup_steps = 50
    c.train.schedule = "cosine"
    c.train.min_lr = 1e-4
    c.train.timestep_shift = 3.0
    c.train.ema_decay = 0.995
    c.train.log_every = 50
    c.train.eval_every = 1250
    c.checkpoint.every_steps = 500
    # 20,000 shapes records (written in ~15 s) instead of 2,000: with 2,000 the model sees each
    # record ~30 times and its VQA answers stay at chance; with 20,000 they rise well above it.
    c.data.worlds.shapes_train = 20_000
    # Text-to-image without guidance: this model's conditional prediction is too weak for
    # BAGEL's 4.0 (it amplifies "fewer objects" into empty canvases). Measured on the main
    # job's final EMA (benchmarks/RESULTS.md, "Guidance sweep"), 64 prompts per category: shapes
    # overall 0.01 with guidance 4.0 on (0.4, 1], 0.05 with 1.25 or 1.5, 0.06 without.
    c.sample.t2i.text_scale = 1.0
    # The judges score what the untrained and the final model draw and answer (report.json):
    # 192 shapes prompts (32 per GenEval category: one item is 0.03), 50 digit prompts,
    # 256 + 50 questions, sampled with 20 points of the time grid.
    c.judges.enabled = True
    c.judges.num_per_category = 32
    c.judges.num_digits = 50
    c.judges.steps = 20
    return c
