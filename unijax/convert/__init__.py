"""Checkpoint conversion between public PyTorch/HF formats and unijax parameters.

  qwen2.py   HF Qwen2 / Qwen3 / BAGEL-MoT language-model weights <-> `MoTDecoder` params
  vision.py  SigLIP ViT and FLUX / diffusers VAE weights -> unijax vision modules
  placement.py  converted arrays -> the dtype and sharding of the target parameters
"""
