r"""configs/tiny.py shrunk so the trainer's tests compile fast: 2 layers of width 64, a 1-layer
ViT, small worlds (written on first use, as the main job does).

  python -m unijax.main --config=tests/training/small_config.py --workdir=DIR \
      --config.data.worlds.dir=WORLDS
"""

from configs import tiny


def get_config(arg: str | None = None):
    del arg
    c = tiny.get_config()
    llm = c.model.llm
    llm.hidden_size, llm.num_layers, llm.num_heads, llm.num_kv_heads = 64, 2, 4, 2
    llm.head_dim, llm.intermediate_size = 16, 128
    c.model.vit.hidden_size, c.model.vit.num_layers, c.model.vit.intermediate_size = 32, 1, 64
    c.data.read_threads = 2
    w = c.data.worlds
    w.shapes_train, w.shapes_eval, w.digits_train, w.digits_eval = 160, 40, 80, 40
    c.train.warmup_steps = 2
    c.train.eval_batches = 1
    c.train.eval_every = 0
    c.train.log_every = 1
    c.judges.enabled = False  # tests that want the judges turn them on
    # Adam's eps: BAGEL's 1e-15 turns the roundoff-level gradients of parameters the loss
    # cannot see (the key biases: softmax is invariant to them) into full-size updates, whose
    # sign then depends on the summation order; comparisons across meshes need a real eps.
    c.train.eps = 1e-6
    return c
