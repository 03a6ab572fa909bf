"""python -m unijax.sample as a user runs it: a subprocess from the repository root, on the
small trained checkpoint (the `trained` fixture)."""

import os
import re
import subprocess
import sys

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sample(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "unijax.sample", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def _png(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def test_generate_answer_edit_and_think_in_one_run(trained, tmp_path):
    # One process for every task: starting one (imports, loading, compiling) is most of the
    # cost. The input is off the latent cell (25 x 17), so the edit comes out resized.
    workdir, _ = trained
    source = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (25, 17, 3), np.uint8)).save(source)
    out = tmp_path / "out"
    result = _sample(f"--workdir={workdir}", "--prompt=a photo of a red circle",
                     "--num_images=2", "--steps=3", f"--out={out}", f"--image={source}",
                     "--question=what colour is the circle?", "--edit=make the circle green",
                     "--think", "--max_new_tokens=4")
    assert result.returncode == 0, result.stderr[-3000:]
    stdout = result.stdout
    assert re.search(r"^loaded step 3 \(ema weights\) from .*checkpoints/3$", stdout, re.M)
    assert "Q: what colour is the circle?\nA: " in stdout
    thought = re.search(r"^thought: (.*?)\nwrote ", stdout, re.M | re.S)
    assert thought, stdout
    # --max_new_tokens bounds the plan too: at most 4 bytes or special tokens (by name).
    assert len(re.sub(r"<\|\w+\|>", "t", thought.group(1))) <= 4, thought.group(1)
    written = sorted(os.listdir(out))  # --num_images samples of each task
    assert written == [f"{task}_step3_seed0_{i}.png" for task in
                       ("edit_make_the_circle_green", "t2i_a_photo_of_a_red_circle")
                       for i in range(2)], written
    for name in written:
        assert f"wrote {out / name}" in stdout
    images = [_png(out / name) for name in written]
    assert all(im.dtype == np.uint8 for im in images)
    assert [im.shape for im in images] == [(24, 16, 3)] * 2 + [(32, 32, 3)] * 2
    assert not np.array_equal(*images[:2]) and not np.array_equal(*images[2:])  # two noises


def test_without_a_task_it_fails_with_a_usage_message(trained):
    result = _sample(f"--workdir={trained[0]}")
    assert result.returncode != 0
    assert "give --prompt (text-to-image) or --image with --question/--edit" in result.stderr
    assert "loaded step" not in result.stdout


def test_int8_weights_on_a_mesh(trained, tmp_path):
    """--quantize=int8 with --mesh: the decoder kernels are int8 and sharded, and the tasks
    still answer and draw."""
    workdir, _ = trained
    source = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), np.uint8)).save(source)
    out = tmp_path / "out"
    result = _sample(f"--workdir={workdir}", "--quantize=int8", "--mesh=1,4,2",
                     "--prompt=a photo of a red circle", "--steps=2", f"--out={out}",
                     f"--image={source}", "--question=what colour is the circle?",
                     "--max_new_tokens=3")
    assert result.returncode == 0, result.stderr[-3000:]
    # two experts x seven projections and the LM head
    assert re.search(r"^int8 weight-only: 15 decoder kernels, [\d.]+ MiB with their scales$",
                     result.stdout, re.M), result.stdout
    assert "Q: what colour is the circle?\nA: " in result.stdout
    assert os.listdir(out) == ["t2i_a_photo_of_a_red_circle_step3_seed0_0.png"]
    assert _png(out / os.listdir(out)[0]).shape == (32, 32, 3)
