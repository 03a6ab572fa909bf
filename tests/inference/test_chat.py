"""chat.py on a trained checkpoint: every task's output shapes, seeds and guidance contexts.

Compiling dominates these tests, so they share shapes where they can: texts of one row fit one
chunk bucket (at most 30 bytes), and the batch-1 images are 24 latent tokens (edit, next frame,
the size override).
"""

import numpy as np
import pytest

from unijax.data import images as images_lib
from unijax.inference.chat import THINK_PROMPT, Chat

PROMPTS = ["a photo of a red circle", "a photo of two blue squares"]


@pytest.fixture(scope="module")
def chat(trained):
    chat = Chat.from_workdir(trained[0])
    # Three points of the time grid (two Euler steps): these tests check what goes where,
    # not image quality, and every sampling call would otherwise take the config's 50.
    chat.config.sample.steps = 3
    return chat


def _pixels(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _check_images(images, shape) -> None:
    for im in images:
        assert im.dtype == np.uint8 and im.shape == shape, (im.dtype, im.shape)


def test_answer_mixes_image_sizes_and_text_only_questions(chat):
    images = [_pixels(32, 32, 0), _pixels(24, 40, 1), None]
    questions = ["what colour is the circle?", "how many squares are there?", "hello"]
    answers = chat.answer(images, questions, max_new_tokens=8)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    assert chat.answer(images, questions, max_new_tokens=8) == answers  # greedy
    with pytest.raises(ValueError, match="2 images for 3 questions"):
        chat.answer(images[:2], questions)


def test_generate_per_prompt_images_and_seeds(chat):
    assert chat.config.data.vae_image_size == 32
    out = chat.generate(PROMPTS, num_images=2, seed=0)
    assert [len(row) for row in out] == [2, 2]
    flat = [im for row in out for im in row]
    _check_images(flat, (32, 32, 3))
    for i in range(len(flat)):  # every row has its own noise: four different images
        for j in range(i):
            assert not np.array_equal(flat[i], flat[j]), (i, j)
    again = chat.generate(PROMPTS, num_images=2, seed=0)
    np.testing.assert_array_equal(np.stack([im for row in again for im in row]), np.stack(flat))
    other = chat.generate(PROMPTS, num_images=2, seed=1)
    assert not any(np.array_equal(a, b) for a, b in zip([im for row in other for im in row],
                                                        flat))


def test_generate_size_and_bad_sizes(chat, monkeypatch):
    [[image]] = chat.generate(PROMPTS[:1], size=(16, 24))
    _check_images([image], (16, 24, 3))
    # A bad size is named before anything is prefilled.
    monkeypatch.setattr(chat, "conversation", lambda *a: pytest.fail("prefilled a bad size"))
    with pytest.raises(ValueError, match=r"image size \(15, 24\): sides must be multiples of "
                                         r"4 pixels and at most 64"):
        chat.generate(PROMPTS[:1], size=(15, 24))
    with pytest.raises(ValueError, match=r"image size \(128, 32\)"):
        chat.generate(PROMPTS[:1], size=(128, 32), think=True)


@pytest.mark.parametrize("mode", ["t2i", "edit"])
def test_edit_keeps_the_resized_inputs_size(chat, mode):
    source = _pixels(25, 17, 2)  # sides rounded to the 4-pixel latent cell
    _, _, h, w = images_lib.target_size(25, 17, chat.settings.vae)
    assert (h, w) == images_lib.resize_uint8(source, chat.settings.vae).shape[:2] == (24, 16)
    (edited,) = chat.edit([source], ["make the circle green"], guidance=chat.guidance(mode))
    _check_images([edited], (h, w, 3))


def test_edit_rejects_a_batch_of_two_grids(chat):
    with pytest.raises(ValueError, match=r"one latent grid, got \[\(6, 4\), \(8, 8\)\]"):
        chat.edit([_pixels(32, 32, 0), _pixels(25, 17, 1)], ["a", "b"])
    with pytest.raises(ValueError, match="2 images for 1 instructions"):
        chat.edit([_pixels(32, 32, 0)] * 2, ["a"])


def test_think_puts_the_thought_into_cond_only(chat):
    images = chat.generate(PROMPTS, num_images=2, think=True, max_think_tokens=8, seed=3)
    thoughts = chat.thoughts
    assert len(thoughts) == 2 and all(isinstance(t, str) for t in thoughts)
    _check_images([im for row in images for im in row], (32, 32, 3))

    # The same by hand: the contexts generate() sampled from.
    conv = chat.conversation(2)
    conv.add_text([THINK_PROMPT] * 2)
    after_instruction = conv.cond
    conv.add_text(PROMPTS)
    before = dict(cond=conv.cond, text_uncond=conv.text_uncond, image_uncond=conv.image_uncond)
    assert conv.text_uncond is after_instruction  # the baseline lacks the prompt
    assert conv.image_uncond.length == conv.cond.length  # text only so far: same tokens
    assert conv.generate_text(max_new_tokens=8) == thoughts
    # The thought was fed: <|im_start|>, at most 8 tokens and maybe <|im_end|>.
    assert before["cond"].length < conv.cond.length <= before["cond"].length + 9
    assert conv.text_uncond is before["text_uncond"]
    assert conv.image_uncond is before["image_uncond"]
    assert conv.text_uncond.length == after_instruction.length

    guidance, grid = chat.guidance("t2i"), chat.default_grid()
    by_hand = conv.repeat(2).generate_image(grid, guidance=guidance, seed=3)
    np.testing.assert_array_equal(np.stack([im for row in images for im in row]), by_hand)
    # Without the thought in cond the images change: the sampler reads it.
    conv.cond = before["cond"]
    unthought = conv.repeat(2).generate_image(grid, guidance=guidance, seed=3)
    assert not np.array_equal(unthought, by_hand)


def test_next_frame_has_the_frames_size(chat, monkeypatch):
    frames = [_pixels(24, 16, 4), _pixels(24, 16, 5)]
    _, _, h, w = images_lib.target_size(24, 16, chat.settings.video)
    captions = ["a circle", "it moves right", "then it moves down a bit"]
    (frame,) = chat.next_frame(["a red circle moves right"], [frames], [captions])
    _check_images([frame], (h, w, 3))
    monkeypatch.setattr(chat, "conversation", lambda *a: pytest.fail("prefilled a bad clip"))
    with pytest.raises(ValueError, match="clip 0 has 2 frames and 2 captions"):
        chat.next_frame(["a circle moves"], [frames], [captions[:2]])
    with pytest.raises(ValueError, match=r"one latent grid, got \[\(6, 4\), \(8, 8\)\]"):
        chat.next_frame(["a circle moves"], [[frames[0], _pixels(32, 32, 6)]])
    with pytest.raises(ValueError, match="1 clips for 2 prompts"):
        chat.next_frame(PROMPTS, [frames])


def test_conversation_guidance_contexts_after_an_image_and_a_text(chat):
    question = ["what is in the image?"]
    conv = chat.conversation(1).add_image([_pixels(25, 17, 7)], vae=True)
    after_image = conv.cond
    assert after_image.length > 0 and conv.text_uncond is after_image
    assert conv.image_uncond.length == 0  # no image there
    conv.add_text(question)
    assert conv.text_uncond is after_image
    text_only = chat.conversation(1).add_text(question)
    assert conv.image_uncond.length == text_only.cond.length
    np.testing.assert_array_equal(conv.image_uncond.next_position, text_only.cond.next_position)
    assert conv.cond.length > conv.image_uncond.length
    with pytest.raises(ValueError, match="vit=False and vae=False add nothing"):
        conv.add_image([_pixels(25, 17, 7)], vit=False)
