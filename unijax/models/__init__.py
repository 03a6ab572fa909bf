"""Models of unijax (Flax NNX): the pieces of a unified understanding + generation transformer.

  layers.py       shared building blocks: RMSNorm, rotary position embedding (RoPE), dense
                  projections with logical axis names, SwiGLU MLP, token embedding
  mot.py          the Mixture-of-Transformer-Experts decoder (Qwen2-style; und and gen experts,
                  one shared attention over the packed row)
  flops.py        analytic forward FLOPs of the decoder (for MFU and cost checks)
  param_count.py  exact parameter counts and per-module breakdowns from abstract state
  vit.py          SigLIP-style NaViT encoder (understanding tower)
  vae.py          FLUX-style autoencoder (generation latents)
  embeddings.py   position / timestep embeddings that place ViT and VAE tokens in LLM space
  unified.py      the unified model: places text / ViT / VAE embeddings into the packed sequence

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, ...) that
`unijax.training.sharding.LOGICAL_RULES` maps to mesh axes. Modules never import `data/` or
`training/`.
"""
