"""Evals on the embedded worlds: judges that read generated images back, and VQA scoring.

  shapes_judge.py  shapes-world images -> objects (colour segmentation, components, shape
                   classes) -> GenEval-category scores
  digits_judge.py  a digit classifier fitted on the real digits' training split
  vqa.py           exact-match answer scoring after normalisation
  run.py           `evaluate(generate_fn, answer_fn, ...)`: per-category accuracy to JSON and
                   TensorBoard; baselines (`python -m unijax.evals.run --baseline=oracle`)
"""
