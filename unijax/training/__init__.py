"""Training: the sharded train step (CE + rectified flow), its state, checkpoints and the loop.

  sharding.py    the device mesh and the logical-axis -> mesh-axis rules
  flow.py        rectified flow: time shift, noising, the velocity target and its loss
  losses.py      the training objective (chunked CE + flow MSE, global normalisation)
  optim.py       AdamW, schedules, decay mask, freezing and lr multipliers by path, EMA
  state.py       the TrainState pytree, created under jit with sharded outputs
  checkpoint.py  Orbax saves and restores (state, data iterator, config), preemption
  evaluate.py    held-out CE and flow MSE at fixed times with fixed noise
  metrics.py     progress bar, metrics.jsonl + TensorBoard, parameter overview, report
  train.py       the update function and the loop (`train(config, workdir)`)
"""
