r"""Row fill of BAGEL-sized rows: the capacity planner on a BAGEL-like mixture of photo records.

  PYTHONPATH=. python benchmarks/capacity.py --out=/tmp/capacity --date=YYYY-MM-DD \
      --device="CPU (this machine), 2 cores"

Writes --num records per kind as ArrayRecord shards (photo-like JPEGs, long side uniform in
[512, 1024] px, mean 768, aspect ratios 1:1 to 16:9 either way), then runs
`unijax.data.capacity.plan` with configs/bagel_7b_mot.py for two mixtures:

  t2i    text-to-image only (caption -> noisy VAE image);
  mixed  t2i : edit : VLM = 2 : 1 : 1 (edit: clean VAE + ViT of the source, instruction, noisy
         VAE target; VLM: ViT image, question, answer with loss).

Text lengths are drawn as Qwen2.5 token counts (caption 20-200, instruction 8-60, question 8-64,
answer 16-256, uniform) and written as that many ASCII bytes, so the config's byte-level
tokenizer sees the same counts a Qwen2.5 tokenizer would give real text of those lengths. Rows
are BAGEL's `max_num_tokens` (36,864 und + gen tokens); the global batch of 256 rows is split
over --hosts hosts (8 rows per host at 32); budgets are multiples of --multiple (512: the TPU
kernels' tiles). Prints markdown rows for benchmarks/RESULTS.md: the
config's budgets and the planner's proposal, with the fill of each budget.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

KINDS = ("t2i", "edit", "vlm")
ASPECTS = (1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3, 16 / 9, 9 / 16)


def _photo_jpeg(rng) -> bytes:
    from unijax.data import images

    long = int(rng.integers(512, 1025))
    aspect = ASPECTS[int(rng.integers(len(ASPECTS)))]
    h, w = (long, int(long / aspect)) if aspect < 1 else (int(long / aspect), long)
    low = rng.uniform(0, 255, (h // 32 + 1, w // 32 + 1, 3)).astype(np.float32)
    field = np.kron(low, np.ones((32, 32, 1), np.float32))[:h, :w]
    pixels = np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
    return images.encode_image(pixels, "image/jpeg", 90)


def _text(rng, lo: int, hi: int) -> str:
    n = int(rng.integers(lo, hi + 1))
    return "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz    "), n))


def write_records(out: str, kind: str, n: int, seed: int) -> str:
    """`n` records of one kind in out/kind.array_record (kept when it exists)."""
    from unijax.data import records

    path = os.path.join(out, f"{kind}.array_record")
    if os.path.exists(path):
        return path
    rng = np.random.default_rng([seed, KINDS.index(kind)])
    t, i = records.text_segment, records.image_segment

    def generate():
        for k in range(n):
            if kind == "t2i":
                segs = [t(_text(rng, 20, 200), "prompt"), i(_photo_jpeg(rng), "image/jpeg",
                                                            "target")]
            elif kind == "edit":
                src = _photo_jpeg(rng)
                segs = [i(src, "image/jpeg", "source"), t(_text(rng, 8, 60), "prompt"),
                        i(src, "image/jpeg", "target")]  # same size as its source
            else:
                segs = [i(_photo_jpeg(rng), "image/jpeg", "input"),
                        t(_text(rng, 8, 64), "prompt"), t(_text(rng, 16, 256), "response")]
            yield records.make_record("vqa" if kind == "vlm" else kind, f"{kind}-{k}",
                                      "bench", segs)

    records.write_records(path, generate())
    return path


def mixture_config(paths: dict[str, str], weights: dict[str, float]):
    """configs/bagel_7b_mot.py reading `weights`' kinds from `paths`."""
    from configs import bagel_7b_mot, base

    config = bagel_7b_mot.get_config()
    config.data.datasets = {k: base.data_source(paths[k], weight=w) for k, w in weights.items()}
    return config


def main(argv=None) -> None:
    from unijax.data import capacity

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory for the records")
    parser.add_argument("--num", type=int, default=2000, help="records per kind")
    parser.add_argument("--sample", type=int, default=2000, help="documents the planner reads")
    parser.add_argument("--hosts", type=int, default=32)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--multiple", type=int, default=512,
                        help="budgets are multiples of this (512: the TPU kernels' tiles)")
    parser.add_argument("--date", default="")
    parser.add_argument("--device", default="CPU")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    paths = {k: write_records(args.out, k, args.num, 0) for k in KINDS}
    command = (f"`PYTHONPATH=. python benchmarks/capacity.py --out={args.out} "
               f"--hosts={args.hosts} --multiple={args.multiple}`")
    print("| device | date | mixture | budgets (und / gen / ViT / VAE, rows per host) | und fill "
          "| gen fill | ViT fill | VAE fill | docs/row | command |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, weights in (("t2i", {"t2i": 1.0}), ("mixed", {"t2i": 2.0, "edit": 1.0,
                                                            "vlm": 1.0})):
        result = capacity.plan(mixture_config(paths, weights), sample=args.sample,
                               hosts=args.hosts, multiple=args.multiple,
                               num_batches=args.batches)
        print(capacity.format_plan(result), flush=True)
        for which in ("current", "proposal"):
            entry = result[which]
            b, f = entry["budgets"], entry["fill"]
            label = "configs/bagel_7b_mot.py" if which == "current" else "planner's proposal"
            print(f"| {args.device} | {args.date} | {name} | {label}: {b['und']} / {b['gen']} / "
                  f"{b['vit']} / {b['vae']}, {b['rows']} | {f['und']:.1%} | {f['gen']:.1%} | "
                  f"{f['vit']:.1%} | {f['vae']:.1%} | {entry['docs_per_row']:.1f} | {command} |",
                  flush=True)


if __name__ == "__main__":
    main()
