"""Writing small videos with PyAV (H.264 in mp4), for the toy world, tests and benchmarks."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Iterable

import numpy as np


def write_video(
    path: str | Path,
    frames: Iterable[np.ndarray],
    *,
    fps: float = 10,
    codec: str = "libx264",
    keyframe_interval: int | None = None,
    pix_fmt: str = "yuv420p",
    crf: int = 23,
    frame_times: Iterable[float] | None = None,
) -> Path:
    """Encode (H, W, 3) uint8 RGB frames into a video file.

    keyframe_interval: GOP size in frames (None: the encoder's default). frame_times: presentation
    times in seconds for a variable frame rate (default: ``i / fps``). yuv420p needs even sizes;
    odd sizes are written with ``pix_fmt="yuv444p"``. H.264 output is the same bytes for the same
    frames in any process, whatever the load or what was imported before (tests/test_toy.py).
    """
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    time_base = Fraction(1, 1000) if frame_times is not None else Fraction(1, int(round(fps)))
    times = iter(frame_times) if frame_times is not None else None
    with av.open(str(path), "w") as container:
        stream = None
        for i, image in enumerate(frames):
            if stream is None:
                height, width = image.shape[:2]
                stream = container.add_stream(codec, rate=int(round(fps)))
                stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
                stream.time_base = time_base
                stream.codec_context.time_base = time_base
                options = {"crf": str(crf)}
                if keyframe_interval:
                    options.update(g=str(keyframe_interval), keyint_min=str(keyframe_interval),
                                   sc_threshold="0")
                if codec == "libx264":
                    # the same bytes in every process: one thread (threaded x264 output moved with the machine's
                    # load), and none of the float-heavy psychovisual tools (their output moved when torch was
                    # imported first, which changes the floating-point environment)
                    options.update(threads="1", **{"x264-params": "mbtree=0:psy=0:aq-mode=0"})
                stream.options = options
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            t = next(times) if times is not None else i / fps
            frame.pts = int(round(t / float(time_base)))
            frame.time_base = time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        if stream is not None:
            for packet in stream.encode():
                container.mux(packet)
    return path
