"""Video decoding and frame sampling with PyAV (FFmpeg bundled in the wheel).

Training records hold clips as frames pre-sampled at data-preparation time (JPEG bytes plus
timestamps), so the input pipeline decodes images, not video. These helpers do that sampling
(`python -m unijax.data.write --format=video`) and write small mp4 clips for tests and
benchmarks. Decoding uses `thread_type="AUTO"` (frame + slice threads), markedly faster than
FFmpeg's default slice threading.

PyAV is the optional `video` extra (`pip install -e '.[video]'`): it is imported on first use,
so the rest of the data layer (and `python -m unijax.data.write` for images) works without it.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np

from unijax.data.records import RecordError

INSTALL_HINT = "pip install -e '.[video]'"


def require_av():
    """The PyAV module, or an ImportError that names the extra to install."""
    try:
        import av
    except ImportError as e:
        raise ImportError(f"video decoding and encoding need PyAV, the `video` extra of "
                          f"unijax: {INSTALL_HINT} ({e})") from e
    return av


def sample_frames(source: str | os.PathLike | bytes, fps: float | None = None,
                  max_frames: int | None = None) -> tuple[list[np.ndarray], list[float]]:
    """Decodes a video and keeps frames at `fps` (every frame when None).

    A frame is kept when its presentation time reaches the next sampling instant
    (0, 1/fps, 2/fps, ...), so the result follows wall-clock time whatever the clip's own rate.

    Args:
      source: a file path or the encoded file's bytes.
      fps: sampling rate in frames per second; None keeps every decoded frame.
      max_frames: stop after this many kept frames.

    Returns:
      (frames, timestamps): uint8 RGB [H, W, 3] arrays and their times in seconds.

    Raises:
      RecordError: reason "video_decode" when the file does not open or yields no frame.
    """
    if fps is not None and fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    av = require_av()  # outside the try: a missing extra is not a bad video
    handle = io.BytesIO(source) if isinstance(source, bytes | bytearray) else os.fspath(source)
    frames, stamps = [], []
    try:
        with av.open(handle) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            base = stream.time_base
            next_time = 0.0
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                t = float(frame.pts * base)
                if fps is not None and t + 1e-6 < next_time:
                    continue
                frames.append(frame.to_ndarray(format="rgb24"))
                stamps.append(t)
                if fps is not None:
                    next_time = max(next_time + 1.0 / fps, t + 0.5 / fps)
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except Exception as e:  # PyAV raises av.error.* (InvalidDataError, ...) and OSError
        raise RecordError(f"video does not decode ({type(e).__name__}: {e})",
                          "video_decode") from e
    if not frames:
        raise RecordError("video has no decodable frame", "video_decode")
    return frames, stamps


def write_mp4(path: str | os.PathLike, frames: Sequence[np.ndarray], fps: int = 8,
              codec: str = "libx264") -> None:
    """Encodes uint8 RGB frames [H, W, 3] (even H and W for yuv420p) into an mp4 file."""
    av = require_av()
    frames = [np.asarray(f, dtype=np.uint8) for f in frames]
    h, w = frames[0].shape[:2]
    with av.open(os.fspath(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
