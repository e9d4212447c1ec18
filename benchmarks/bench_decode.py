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

Then the peers users already pick, when importable (benchmark-only extras, never dependencies):
torchcodec (``VideoDecoder(seek_mode="exact").get_frames_played_at``; needs FFmpeg's shared
libraries, e.g. Debian's ``ffmpeg``) and decord2 (``decord.VideoReader.get_batch`` at the indices
of the frames on screen at the same target times). Each clip below is written by the script;
each time is the median of ``--peer-repeats`` (default 11) runs of open + sample, one at a time,
the readers taking turns,
tvrerank's including the resize and crop to ``--image-size``, the peers' at full resolution
(what they return). The column ``libswscale`` is tvrerank with its earlier resize method (one
libswscale call per frame; ``extract.preprocess.RESIZE_METHODS``), the default ``torchvision`` before
it. The line ``short_clip_vs_best_peer=<x>`` is the largest, over the clips of
15 s or less, of tvrerank's time over the fastest peer's (goal <= 1.0).

    python benchmarks/bench_decode.py [--seconds 180] [--repeats 3] [--peer-repeats 11]
"""

from __future__ import annotations

import argparse
import bisect
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

from tvrerank.extract.frames import SampledFrames, decode_all_reference, read_packet_index, sample_frames, target_times
from tvrerank.extract.preprocess import frames_to_arrays
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
        decoded = [(f.time, frames_to_arrays([f], image_size)[0]) for f in container.decode(stream)]
    times = [t for t, _ in decoded]
    frames = np.zeros((num_frames, image_size, image_size, 3), np.uint8)
    stamps = np.zeros(num_frames)
    for i, t in enumerate(target_times(index.start, index.end, num_frames)):
        j = max(bisect.bisect_right(times, t) - 1, 0)
        stamps[i], frames[i] = decoded[j]
    return SampledFrames(frames=frames, mask=np.ones(num_frames, bool), timestamps=stamps)


#: (name, seconds, width, height, fps, keyframe interval in frames): MSR-VTT-like and other clips
CLIPS = [
    ("15 s 320x240, GOP 60 (MSR-VTT-like)", 15, 320, 240, 30, 60),
    ("10 s 640x272, GOP 250", 10, 640, 272, 24, 250),
    ("5 s 1280x720, GOP 60", 5, 1280, 720, 30, 60),
    ("4 s 176x144, GOP 12", 4, 176, 144, 15, 12),
]


def find_peers() -> dict:
    """name -> sample(path, targets) for each peer that imports and decodes here."""
    peers = {}
    try:
        from torchcodec.decoders import VideoDecoder

        def torchcodec_exact(path: Path, targets: np.ndarray):
            return VideoDecoder(str(path), seek_mode="exact").get_frames_played_at(seconds=targets.tolist()).data

        peers["torchcodec exact"] = torchcodec_exact
    except Exception as exc:  # noqa: BLE001 - a missing FFmpeg library fails at import
        print(f"peer torchcodec: not available ({type(exc).__name__}: {str(exc)[:80]})")
    try:
        import decord

        def decord2(path: Path, targets: np.ndarray):
            reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
            starts = reader.get_frame_timestamp(range(len(reader)))[:, 0]
            return reader.get_batch(np.maximum(np.searchsorted(starts, targets, side="right") - 1, 0)).asnumpy()

        peers["decord2"] = decord2
    except Exception as exc:  # noqa: BLE001
        print(f"peer decord2: not available ({type(exc).__name__}: {str(exc)[:80]})")
    return peers


def interleaved_median_times(readers: dict, repeats: int) -> dict[str, float]:
    """name -> median seconds of ``repeats`` calls, after one warm-up call each; the readers take
    turns (in a rotating order) so a slow moment of the machine does not fall on one of them."""
    names = list(readers)
    times: dict[str, list[float]] = {name: [] for name in names}
    for name in names:
        readers[name]()
    for round_ in range(repeats):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            start = time.perf_counter()
            readers[name]()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(seconds)) for name, seconds in times.items()}


def compare_with_peers(folder: Path, clips: list, frames: int, image_size: int, repeats: int,
                       long_path: Path, long_seconds: float) -> float | None:
    """Print tvrerank vs the peers on each clip; returns the worst short-clip ratio (None: no peer)."""
    import av

    peers = find_peers()
    print(f"peers found: {', '.join(peers) or 'none (pip install torchcodec decord2)'}")
    rows, worst = [], None
    for name, seconds, width, height, fps, gop in clips:
        path = folder / f"clip-{width}x{height}-{seconds}s.mp4"
        write_video(path, moving_frames(int(seconds * fps), width, height), fps=fps, keyframe_interval=gop)
        rows.append((name, seconds, path))
    rows.append((f"{long_seconds:g} s 640x360, GOP 250 (the long video above)", long_seconds, long_path))
    header = (f"{'clip':<48} {'tvrerank':>9} {'libswscale':>10}" + "".join(f" {p:>17}" for p in peers)
              + "   (ms, median)")
    print(header)
    for name, seconds, path in rows:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            index = read_packet_index(container, stream)
        targets = target_times(index.start, index.end, frames)
        readers = {
            "tvrerank": lambda: sample_frames(path, num_frames=frames, image_size=image_size),
            "libswscale": lambda: sample_frames(path, num_frames=frames, image_size=image_size, resize="libswscale"),
            **{peer: partial(sample, path, targets) for peer, sample in peers.items()},
        }
        times = interleaved_median_times(readers, repeats)
        ours, theirs = times["tvrerank"], {peer: times[peer] for peer in peers}
        print(f"{name:<48} {ours * 1000:>9.1f} {times['libswscale'] * 1000:>10.1f}"
              + "".join(f" {t * 1000:>17.1f}" for t in theirs.values()))
        if theirs and seconds <= 15:
            ratio = ours / min(theirs.values())
            worst = ratio if worst is None else max(worst, ratio)
    return worst


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
    parser.add_argument("--peer-repeats", type=int, default=11)
    parser.add_argument("--smoke", action="store_true", help="seconds-long check that the script runs (a 4 s video)")
    args = parser.parse_args()
    clips = CLIPS
    if args.smoke:
        args.seconds, args.repeats, args.peer_repeats = 4, 1, 1
        clips = [("2 s 176x144, GOP 12", 2, 176, 144, 15, 12)]

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
        if not identical:
            raise SystemExit("frames differ from the decode-everything reference")
        worst = compare_with_peers(Path(tmp), clips, args.frames, args.image_size, args.peer_repeats, path,
                                   args.seconds)
        if worst is not None:
            print(f"short_clip_vs_best_peer={worst:.2f}")
        print(f"decode_speedup_vs_decode_only={t_lean / t_ours:.2f}")
        print(f"decode_speedup={t_all / t_ours:.2f}")


if __name__ == "__main__":
    main()
