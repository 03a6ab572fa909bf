"""The unijax input pipeline: records on disk -> sequence plans -> packed, fixed-shape rows.

  records.py    the on-disk schema (msgpack records in ArrayRecord shards), writer and reader
  write.py      `python -m unijax.data.write`: converters from caption folders, OBELICS parquet,
                MMC4 JSONL and mp4 clip folders
  tokenizer.py  the built-in byte-level tokenizer and HF tokenizers with BAGEL's special tokens
  images.py     decode, NaViT (ViT) resize, VAE resolution buckets, [-1, 1] normalisation
  video.py      PyAV decode and frame sampling (the optional `video` extra, imported on use)
  plan.py       record -> sequence plan (ViT / clean VAE / noisy VAE / text with or without loss)
  packing.py    sequence plans -> PackedBatch rows under per-row token budgets
  sources.py    random access over shards that survives bad storage (bad shards, bad chunks)
  tfds_sources.py  TFDS datasets prepared as ArrayRecord, mapped to records by adapters
  pipeline.py   Grain: sharding, shuffle, mixture, workers, checkpointable iterator
  stream.py     the pipeline's packing and host-batch stages, skip counters and limits
  worlds/       embedded datasets generated on the fly (shapes world, digits)
"""
