"""Embedded worlds: datasets generated on the spot, so training and evals need no downloads.

  scene.py      the shapes world's scene model: palette, shapes, rendering, spatial relations
  geneval.py    text-to-image prompts in GenEval's six categories and their structured targets
  questions.py  VQA questions with exact answers (and their inverse parser)
  edits.py      edits with exact targets, and short videos built from small changes
  shapes.py     shapes-world records of every kind (`shapes_record`, `generate`)
  digits.py     scikit-learn's real handwritten digits as caption / VQA / t2i records, with a
                fixed held-out split
  __main__.py   `python -m unijax.data.worlds --out=DIR`: ArrayRecord shards of both worlds

The judges that read these images back live in `unijax.evals`.
"""
