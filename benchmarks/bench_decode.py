"""Frame sampling speed: our keyframe-aware sampler vs. decoding every frame and picking.

Writes a 3-minute 30 fps H.264 video (640x360, a keyframe every 250 frames, a static
textured background with moving objects) and samples 12 frames three ways:

- ``sampler``: ``sample_frames`` (packet index, seek to the keyframe before a target when it is
  ahead of the decoder, drop non-reference frames that are not targets);
- ``decode everything``: decode every frame and turn each into an image array, then pick by
  timestamp (what ``torchvision.io.read_video``-style loaders do);
- ``decode only``: decode every frame but convert only the picked ones (the lean brute-force
  reference, ``decode_all_reference``).

Frames must be pixel-identical across all three at the same timestamps. The last line is
``decode_speedup=<x>`` against "decode everything" (target >= 5); the ratio against "decode
only" is printed above it.

    python benchmarks/bench_decode.py [--seconds 180] [--repeats 3]
"""

from __future__ import annotations

import argparse
import bisect
import tempfile
import time
from pathlib import Path

import numpy as np

from tvrerank.extract.frames import (
    SampledFrames,
    decode_all_reference,
    frame_to_array,
    read_packet_index,
    sample_frames,
    target_times,
)
from tvrerank.toy.videos import write_video


def moving_frames(num: int, width: int, height: int, seed: int = 0):
    """A static textured background with two moving objects: cheap P/B frames, costly I frames."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    background = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) * 128 // (width + height)], -1)
    background = np.clip(background + rng.integers(-20, 20, background.shape), 0, 255).astype(np.uint8)
    for i in range(num):
        frame = background.copy()
        x, y = (i * 3) % (width - 60), int((height - 60) * (0.5 + 0.4 * np.sin(i / 40)))
        frame[y : y + 60, x : x + 60] = (255, (i * 3) % 256, 0)
        x2 = (width - 80) - (i * 2) % (width - 80)
        frame[50:130, x2 : x2 + 80] = (0, 0, 255)
        yield frame


def decode_everything(path: Path, num_frames: int, image_size: int) -> SampledFrames:
    """Decode every frame into an image array, then pick the frame on screen at each target."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        index = read_packet_index(container, stream)
        container.seek(0)
        decoded = [(f.time, frame_to_array(f, image_size)) for f in container.decode(stream)]
    times = [t for t, _ in decoded]
    frames = np.zeros((num_frames, image_size, image_size, 3), np.uint8)
    stamps = np.zeros(num_frames)
    for i, t in enumerate(target_times(index.start, index.end, num_frames)):
        j = max(bisect.bisect_right(times, t) - 1, 0)
        stamps[i], frames[i] = decoded[j]
    return SampledFrames(frames=frames, mask=np.ones(num_frames, bool), timestamps=stamps)


def best_time(fn, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="seconds-long check that the script runs (a 4 s video)")
    args = parser.parse_args()
    if args.smoke:
        args.seconds, args.repeats = 4, 1

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "long.mp4"
        n = int(args.seconds * 30)
        start = time.perf_counter()
        write_video(path, moving_frames(n, 640, 360), fps=30, keyframe_interval=250)
        print(f"wrote {n} frames ({path.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - start:.1f}s")

        kwargs = dict(num_frames=args.frames, image_size=args.image_size)
        t_ours, ours = best_time(lambda: sample_frames(path, **kwargs), args.repeats)
        t_lean, lean = best_time(lambda: decode_all_reference(path, **kwargs), args.repeats)
        t_all, everything = best_time(
            lambda: decode_everything(path, args.frames, args.image_size), min(args.repeats, 2)
        )
        identical = all(
            np.array_equal(ours.frames, other.frames) and np.array_equal(ours.timestamps, other.timestamps)
            for other in (lean, everything)
        )
        print(f"sampler (seek + decode forward):          {t_ours * 1000:8.0f} ms")
        print(f"decode only, convert picked frames:       {t_lean * 1000:8.0f} ms")
        print(f"decode everything into arrays, then pick: {t_all * 1000:8.0f} ms")
        print(f"pixel_identical={identical}")
        print(f"decode_speedup_vs_decode_only={t_lean / t_ours:.2f}")
        print(f"decode_speedup={t_all / t_ours:.2f}")
        if not identical:
            raise SystemExit("frames differ from the decode-everything reference")


if __name__ == "__main__":
    main()
