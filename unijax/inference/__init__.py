"""Inference: a trained model loaded from its workdir, KV-cached decoding and image sampling.

  load.py   the config and the EMA (or trained) weights of a checkpoint, optionally sharded
"""
