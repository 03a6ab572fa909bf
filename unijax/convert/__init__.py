"""Checkpoint conversion between public PyTorch/HF formats and unijax parameters.

  qwen2.py   HF Qwen2 / Qwen3 / BAGEL-MoT language-model weights <-> `MoTDecoder` params
  vision.py  SigLIP ViT and FLUX / diffusers VAE weights -> unijax vision modules
  placement.py  converted arrays -> the dtype and sharding of the target parameters
  safetensors_io.py  safetensors files and sharded saves read without torch (bf16 included),
                     and written tensor by tensor
  released.py  HF Qwen2 / SigLIP / FLUX VAE saves -> a train state's weights, checked and sharded
  bagel.py   the released BAGEL-7B-MoT directory <-> unijax (`load`, the command line);
             bagel_layout.py its names, layouts and config, bagel_export.py unijax -> BAGEL
"""
