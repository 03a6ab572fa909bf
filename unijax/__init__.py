"""unijax: pretraining unified multimodal (understanding + generation) models in JAX.

Layers, top to bottom (imports point downwards): `main` and `training/` know everything;
`models/` never imports `data/` or `training/`; `kernels/` imports nothing of unijax but the
`batch` metadata types.
"""
