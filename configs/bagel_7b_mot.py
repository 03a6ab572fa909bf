r"""BAGEL-7B-MoT: the released shapes (Qwen2.5-7B LLM with two experts, SigLIP so400m/14, FLUX VAE).

Parameter count only (no allocation):

  python -m unijax.main --config=configs/bagel_7b_mot.py --workdir=/tmp/bagel \
      --config.dry_run=True

Shapes follow the official `llm_config.json` / `vit_config.json` of ByteDance-Seed/BAGEL-7B-MoT:
hidden 3584, 28 layers, 28 query / 4 KV heads of 128, SwiGLU 18944, vocab 152064, RoPE theta 1e6,
RMSNorm eps 1e-6, QK-norm on, untied LM head; 26 SigLIP layers are used (vit_select_layer=-2);
latent patch 2 over the 16-channel FLUX latent, max_latent_size 64 (1024 px).
`get_config("runlocal")` keeps the structure but shrinks everything to a CPU smoke test.

Fine-tuning the released model (converted first: `python -m unijax.convert.bagel --src=BAGEL
--dst=DIR`), BAGEL's fine-tune recipe (TRAIN.md: from the EMA, lr 2e-5, ~11.5k-token rows):

  python -m unijax.main --config=configs/bagel_7b_mot.py:finetune --workdir=RUN \
      --config.init.checkpoint=DIR [--config.init.checkpoint_weights=params]

and with LoRA adapters instead of full weights (rank 16 on the gen expert's attention and MLP;
only the adapters train and are saved, `--config.model.llm.lora_experts=und,gen` adapts both):

  python -m unijax.main --config=configs/bagel_7b_mot.py:lora --workdir=RUN \
      --config.init.checkpoint=DIR
"""

import ml_collections

from configs import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the BAGEL-7B-MoT config; `arg="runlocal"` gives a CPU-sized variant."""
    c = base.get_base_config()
    c.model.vit = base.siglip_so400m_vit()
    c.model.vae = base.flux_vae()
    c.model.llm.remat_policy = "full"
    c.attention.impl = "auto"
    # Rows of BAGEL's `max_num_tokens` (36,864), split by expert as the capacity planner
    # proposes for a BAGEL-like mixture (t2i : edit : VLM = 2 : 1 : 1 of ~768 px photos;
    # `python -m unijax.data.capacity`, benchmarks/RESULTS.md "Row fill"): und 93% and gen 96%
    # full, where the former even split (20,480 / 16,384) left und 42% full. A t2i-only run
    # fills its rows with und 1,536 / gen 35,328 / 15 VAE slots instead.
    c.data.batch_size = 256
    c.data.und_capacity = 13824
    c.data.gen_capacity = 23040
    c.data.max_vit_patches = 12288
    c.data.max_vae_images = 11
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    # KV-cache slots per conversation row: an edit of a 1024 px image (4,098 VAE + 4,902 ViT
    # tokens and the instruction) and the image it generates fit; the default, twice a
    # training row (73,728), would hold 3.9 GiB of bf16 keys and values per context.
    c.sample.capacity = 16384

    if arg in ("finetune", "lora"):
        c.init.required = True  # a fine-tune without config.init.checkpoint is a config error
        c.init.checkpoint_weights = "ema"  # BAGEL's finetune_from_ema
        c.train.lr = 2e-5
        c.train.warmup_steps = 500
        c.train.steps = 20_000
        # BAGEL's fine-tune rows (max_num_tokens 11,520), split as the capacity planner's
        # proportions for the full rows above (und 37.5%, gen 62.5%).
        c.data.und_capacity = 4352
        c.data.gen_capacity = 7168
        c.data.max_vit_patches = 4096
        c.data.max_vae_images = 4
        c.data.batch_size = 64
    if arg == "lora":
        c.model.llm.lora_rank = 16
        c.model.llm.lora_alpha = 16.0
        c.model.llm.lora_experts = ("gen",)
        c.train.lr = 1e-4  # adapters start at zero and take a larger step than full weights
        c.train.ema_decay = 0.999
    if arg not in (None, "", "runlocal", "finetune", "lora"):
        raise ValueError(f"configs/bagel_7b_mot.py: unknown variant {arg!r} (runlocal, "
                         "finetune, lora)")

    if arg == "runlocal":
        llm = c.model.llm
        llm.hidden_size, llm.num_layers, llm.num_heads, llm.num_kv_heads = 64, 2, 4, 2
        llm.head_dim, llm.intermediate_size, llm.vocab_size = 16, 128, 512
        c.model.vit.hidden_size, c.model.vit.num_layers = 32, 2
        c.model.vit.num_heads, c.model.vit.intermediate_size = 2, 64
        c.model.vae.base_channels, c.model.vae.channel_mult = 32, (1, 2, 2, 2)
        c.model.vae.norm_groups = 8
        c.data.batch_size, c.data.und_capacity, c.data.gen_capacity = 8, 512, 256
        c.data.max_vit_patches, c.data.vit_image_size, c.data.vae_image_size = 256, 224, 256
        c.train.steps = 2
    return c
