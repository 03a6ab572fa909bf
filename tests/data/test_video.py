"""PyAV frame sampling on clips written with PyAV."""

import numpy as np
import pytest

from unijax.data import video
from unijax.data.records import RecordError


def clip(n=16, h=32, w=48):
    """A box moving right one pixel per frame, on a grey background."""
    frames = []
    for k in range(n):
        f = np.full((h, w, 3), 96, np.uint8)
        f[8:24, k:k + 12] = (220, 40, 40)
        frames.append(f)
    return frames


def test_sample_frames_at_fps_from_path_and_bytes(tmp_path):
    path = tmp_path / "c.mp4"
    frames = clip()
    video.write_mp4(path, frames, fps=8)
    every, stamps = video.sample_frames(path)
    assert len(every) == 16 and every[0].shape == (32, 48, 3)
    np.testing.assert_allclose(stamps, np.arange(16) / 8, atol=1e-6)
    assert np.abs(every[5].astype(int) - frames[5]).mean() < 6  # lossy codec, close
    kept, kept_t = video.sample_frames(path.read_bytes(), fps=2.0)
    np.testing.assert_allclose(kept_t, [0.0, 0.5, 1.0, 1.5], atol=1e-6)
    _, first = video.sample_frames(path, fps=2.0, max_frames=2)
    assert len(first) == 2


def test_corrupt_video_is_a_record_error(tmp_path):
    path = tmp_path / "c.mp4"
    video.write_mp4(path, clip(4), fps=4)
    with pytest.raises(RecordError) as err:
        video.sample_frames(path.read_bytes()[:200])
    assert err.value.reason == "video_decode"
    with pytest.raises(RecordError):
        video.sample_frames(b"not a video at all")
