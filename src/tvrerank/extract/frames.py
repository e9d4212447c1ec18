"""Frame sampling with PyAV: T frames uniformly over a video's duration, decoding only what is needed.

The sampler works in timestamps, not frame counts, so variable frame rate works: a target time
``t`` takes the frame on screen at ``t`` (the decoded frame with the largest pts <= t). It first
reads the packet index (demuxing only, no decoding) to learn where the keyframes are; for each
target it then either decodes forward from where the decoder already is, or seeks to the
keyframe just before the target when that keyframe lies ahead of the decoder. That is exact
for closed-GOP streams and decodes a small fraction of a long video's frames.

How a chosen frame becomes the encoder's input (open_clip's eval preprocessing geometry) is
``preprocess.py``. ``decode_all_reference`` is the brute-force reference (decode every frame, pick
by the same rule) used by the tests and ``benchmarks/bench_decode.py``.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from tvrerank.errors import TvrerankError
from tvrerank.extract.preprocess import DEFAULT_RESIZE, check_resize, frames_to_arrays

log = logging.getLogger(__name__)


class VideoDecodeError(TvrerankError):
    """A video that cannot be sampled; the message says why (recorded in ``videos/error``)."""


@dataclass(frozen=True)
class SampledFrames:
    frames: np.ndarray  # (T, S, S, 3) uint8 RGB; padded slots are zero
    mask: np.ndarray  # (T,) bool, True for real frames (the first ``mask.sum()`` slots)
    timestamps: np.ndarray  # (T,) float64 seconds of the chosen frames; NaN for padding

    @property
    def num_valid(self) -> int:
        return int(self.mask.sum())


def target_times(start: float, end: float, num_frames: int) -> np.ndarray:
    """Centres of ``num_frames`` equal segments of [start, end). Shape (num_frames,)."""
    span = max(end - start, 0.0)
    return start + (np.arange(num_frames, dtype=np.float64) + 0.5) * span / num_frames


@dataclass(frozen=True)
class PacketIndex:
    """What demuxing (without decoding) tells about a video stream.

    ``pts`` holds every packet's presentation time in stream time-base units, sorted; it is
    empty when some packets carry no pts (then no frame-skipping is attempted).
    """

    start: float  # seconds
    end: float  # seconds
    keyframes: list[float]  # sorted presentation times of keyframes, seconds
    pts: np.ndarray  # (num_packets,) int64, sorted
    time_base: float

    def packets_between(self, start: float, end: float) -> int:
        """Packets with start < time < end (all of them when the pts are unknown)."""
        if not len(self.pts):
            return 1 << 30
        lo = np.searchsorted(self.pts, start / self.time_base + 1e-9, side="right") if np.isfinite(start) else 0
        return int(max(0, np.searchsorted(self.pts, end / self.time_base - 1e-9, side="left") - lo))

    def unique_pts_at(self, t: float) -> int | None:
        """``packet_pts_at(t)`` when exactly one packet has that pts (else None: two frames with one pts
        cannot be told apart by it)."""
        pts = self.packet_pts_at(t)
        if pts is None or np.searchsorted(self.pts, pts, side="right") - np.searchsorted(self.pts, pts) != 1:
            return None
        return pts

    def packet_pts_at(self, t: float) -> int | None:
        """pts of the frame on screen at time t (largest pts <= t), or None if unknown."""
        if not len(self.pts):
            return None
        i = int(np.searchsorted(self.pts, t / self.time_base + 1e-9, side="right")) - 1
        return int(self.pts[max(i, 0)])


#: Jump to a keyframe only past at least this many packets; fewer are decoded through. A seek
#: flushes the decoder (and its frame threads) and re-reads (the measurements behind 4 are in
#: benchmarks/README.md, "Figures behind constants").
SEEK_MIN_PACKETS = 4

#: PyAV up to 18 decodes metadata strictly unless told to ignore errors; 19 removed the option (it reads
#: metadata byte-exact, never failing on it), and passing it raises TypeError for every video.
OPEN_OPTIONS = {"metadata_errors": "ignore"} if int(__import__("av").__version__.split(".")[0]) < 19 else {}


def seconds_per_tick(stream) -> float:
    """A stream's time base in seconds: a ``fractions.Fraction`` up to PyAV 18, an ``av.AVRational``
    (numerator/denominator, maybe without ``__float__``) from 19."""
    time_base = stream.time_base
    try:
        return float(time_base)
    except TypeError:
        return time_base.numerator / time_base.denominator


def read_packet_index(container, stream) -> PacketIndex:
    """Demux every packet of ``stream`` (no decoding) to find its time span and keyframes.

    A stream that breaks off part-way (a truncated file) keeps the packets read before the
    break. Raises VideoDecodeError if there are no timed packets at all.
    """
    time_base = seconds_per_tick(stream)
    start, end, keyframes, all_pts, exact = None, None, [], [], True
    try:
        for packet in container.demux(stream):
            if packet.pts is None:
                exact = exact and packet.dts is None  # a flush packet has neither
            pts = packet.pts if packet.pts is not None else packet.dts
            if pts is None:
                continue
            all_pts.append(pts)
            t = pts * time_base
            t_end = (pts + max(packet.duration or 0, 0)) * time_base
            start = t if start is None else min(start, t)
            end = t_end if end is None else max(end, t_end)
            if packet.is_keyframe:
                keyframes.append(t)
    except Exception as exc:  # noqa: BLE001 - av raises several error types for broken files
        if start is None:
            raise VideoDecodeError(f"cannot read packets: {exc}") from exc
        log.warning("packets end early (%s); sampling the readable part", exc)
    if start is None:
        raise VideoDecodeError("the video stream has no packets")
    pts = np.sort(np.asarray(all_pts, dtype=np.int64)) if exact else np.zeros(0, np.int64)
    return PacketIndex(
        start=start, end=max(end, start), keyframes=sorted(keyframes) or [start],
        pts=pts, time_base=time_base,
    )


class _Decoder:
    """Forward frame iterator over one stream that can jump to a keyframe; one frame look-ahead.

    ``keep_pts``: when given, packets whose pts is not in it are decoded with
    ``skip_frame=NONREF``: non-reference frames (most B-frames) are dropped unless they are a
    target. Dropping a frame nothing refers to changes no other frame's pixels.
    """

    def __init__(self, container, stream, keep_pts: set[int] | None = None):
        self.container, self.stream = container, stream
        self.keep_pts = keep_pts
        self._packets: Iterator | None = None
        self._ready: list = []  # decoded frames not yet consumed, in presentation order
        self.last = None  # the frame handed out last since the last jump
        self.position = -np.inf  # its time
        self.exhausted = False

    def seek(self, t: float) -> None:
        offset = int(round(t / seconds_per_tick(self.stream)))
        self.container.seek(offset, stream=self.stream, backward=True, any_frame=False)
        self._packets, self._ready, self.exhausted = None, [], False
        self.last, self.position = None, -np.inf

    def _decode_more(self) -> None:
        if self._packets is None:
            self._packets = self.container.demux(self.stream)
        codec = self.stream.codec_context
        for packet in self._packets:
            if self.keep_pts is not None:
                skip = packet.pts is not None and packet.pts not in self.keep_pts
                codec.skip_frame = "NONREF" if skip else "DEFAULT"
            frames = self.stream.decode(packet)  # the flush packet (size 0) drains the decoder
            if frames:
                self._ready.extend(frames)
                return
        self.exhausted = True

    def next_frame(self):
        while not self._ready and not self.exhausted:
            self._decode_more()
        return self._ready.pop(0) if self._ready else None

    def push_back(self, frame) -> None:
        self._ready.insert(0, frame)

    def frame_at(self, t: float, pts: int | None = None):
        """The frame on screen at ``t``: the last one with time <= t (or the first one after).

        That may be the frame handed out for the previous target (variable frame rate: no new frame
        since), which is kept until the next jump. ``pts``: the frame's pts when the packet index
        knows it for sure (``PacketIndex.unique_pts_at``); the frame is then handed out as soon as it
        is decoded, without decoding the next one to see that it comes after ``t`` (a jump to a
        keyframe right after would throw that one away; benchmarks/README.md).
        """
        chosen = self.last
        while (frame := self.next_frame()) is not None:
            if frame.time is None:
                continue
            if frame.time > t:
                chosen = frame if chosen is None else chosen  # t before the first frame: take that one
                self.push_back(frame)
                break
            chosen = frame
            if pts is not None and frame.pts == pts:
                break
        if chosen is not None:
            self.last, self.position = chosen, chosen.time
        return chosen


def _pack(chosen: list, num_frames: int, image_size: int, **resize_options) -> SampledFrames:
    """Deduplicate chosen frames (short videos repeat) and pad to ``num_frames`` slots."""
    kept, last_time = [], None
    for frame in chosen:
        if frame is not None and frame.time != last_time:
            kept.append(frame)
            last_time = frame.time
    frames = np.zeros((num_frames, image_size, image_size, 3), dtype=np.uint8)
    frames_to_arrays(kept, image_size, out=frames[: len(kept)], **resize_options)
    mask = np.arange(num_frames) < len(kept)
    stamps = np.full(num_frames, np.nan)
    stamps[: len(kept)] = [frame.time for frame in kept]
    return SampledFrames(frames=frames, mask=mask, timestamps=stamps)


def _open_video(path: str | Path, threads: int):
    import av

    path = Path(path)
    if not path.exists():
        raise VideoDecodeError(f"file not found: {path}")
    if not path.is_file():  # a folder, a FIFO (opening one would block), a device
        raise VideoDecodeError(f"not a regular file: {path}")
    if path.stat().st_size == 0:
        raise VideoDecodeError(f"empty file (0 bytes): {path}")
    try:
        container = av.open(str(path), **OPEN_OPTIONS)
    except Exception as exc:  # noqa: BLE001
        raise VideoDecodeError(f"not a readable video ({type(exc).__name__}: {exc})") from exc
    demuxer = container.format.name
    if demuxer == "image2" or demuxer.endswith("_pipe"):  # FFmpeg's still-image demuxers
        container.close()
        raise VideoDecodeError(f"a still image ({demuxer}), not a video: {path}")
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        container.close()
        raise VideoDecodeError(f"no video stream (streams: {', '.join(kinds)})")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    stream.codec_context.thread_count = threads or decoding_threads(stream.codec_context.width,
                                                                    stream.codec_context.height)
    return container, stream


#: Up to this many pixels per frame (640x480), one decoding thread: sampling a short clip seeks and
#: flushes often, and FFmpeg's frame threads then cost more than they give (benchmarks/README.md,
#: "Figures behind constants").
SINGLE_THREAD_PIXELS = 640 * 480


def decoding_threads(width: int, height: int) -> int:
    """FFmpeg decoding threads for ``threads=0``: 1 for small frames, else 0 (FFmpeg's choice)."""
    return 1 if 0 < width * height <= SINGLE_THREAD_PIXELS else 0


def sample_frames(
    path: str | Path,
    *,
    num_frames: int,
    image_size: int,
    interpolation: str = "bicubic",
    resize: str = DEFAULT_RESIZE,
    resize_mode: str = "shortest",
    fill: int = 0,
    threads: int = 0,
) -> SampledFrames:
    """Sample ``num_frames`` frames uniformly over the video's duration.

    Returns frames at the encoder's ``image_size`` by open_clip's eval geometry (``resize_mode``: short
    side and centre crop, squashed, or padded; ``preprocess.py``); a video with fewer distinct frames
    than targets fills the first slots and masks the rest. Raises
    VideoDecodeError with a readable reason for anything that yields no frame.
    ``interpolation``, ``resize_mode``, ``fill``: open_clip's (``EncoderConfig``); ``resize``: one of
    ``RESIZE_METHODS`` (``resize_options`` gives all of them for a cache). ``threads=0``: one decoding
    thread for frames up to 640x480, else FFmpeg's choice.
    """
    check_resize(resize, interpolation, resize_mode)
    options = {"interpolation": interpolation, "resize": resize, "resize_mode": resize_mode, "fill": fill}
    container, stream = _open_video(path, threads)
    try:
        index = read_packet_index(container, stream)
        targets = target_times(index.start, index.end, num_frames)
        keep = {index.packet_pts_at(t) for t in targets} if len(index.pts) else None
        decoder = _Decoder(container, stream, keep_pts=keep)
        decoder.seek(index.start)
        chosen = []
        try:
            for t in targets:
                keyframe = index.keyframes[max(bisect.bisect_right(index.keyframes, t) - 1, 0)]
                if keyframe > decoder.position and not decoder.exhausted and \
                        index.packets_between(decoder.position, keyframe) >= SEEK_MIN_PACKETS:
                    decoder.seek(keyframe)
                chosen.append(decoder.frame_at(t, index.unique_pts_at(t)))
        except Exception as exc:  # noqa: BLE001
            if not any(c is not None for c in chosen):
                raise VideoDecodeError(f"decoding failed: {exc}") from exc
            log.warning("%s: decoding stopped early (%s); keeping %d frames", path, exc, len(chosen))
        if not any(c is not None for c in chosen):
            raise VideoDecodeError("no decodable frames")
        return _pack(chosen, num_frames, image_size, **options)
    finally:
        container.close()


def decode_all_reference(path: str | Path, *, num_frames: int, image_size: int, **resize_options) -> SampledFrames:
    """Brute-force reference for ``sample_frames``: decode every frame, pick by the same rule."""
    container, stream = _open_video(path, threads=0)
    try:
        index = read_packet_index(container, stream)
        container.seek(0)
        targets = target_times(index.start, index.end, num_frames)
        chosen: list = [None] * num_frames
        first = None
        for frame in container.decode(stream):
            if frame.time is None:
                continue
            if first is None:
                first = frame
            for i, t in enumerate(targets):
                if frame.time <= t:
                    chosen[i] = frame
        chosen = [c if c is not None else first for c in chosen]
        return _pack(chosen, num_frames, image_size, **resize_options)
    finally:
        container.close()


def sample_or_error(path: str | Path, **options) -> tuple[SampledFrames | None, str]:
    """``sample_frames`` that returns ``(None, reason)`` instead of raising; safe in worker processes."""
    try:
        return (
            sample_frames(path, **options),
            "",
        )
    except VideoDecodeError as exc:
        return None, str(exc)
    except Exception as exc:  # noqa: BLE001 - one broken video must never stop a run
        log.exception("unexpected error sampling %s", path)
        return None, f"{type(exc).__name__}: {exc}"
