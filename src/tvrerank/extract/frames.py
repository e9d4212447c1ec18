"""Frame sampling with PyAV: T frames uniformly over a video's duration, decoding only what is needed.

The sampler works in timestamps, not frame counts, so variable frame rate works: a target time
``t`` takes the frame on screen at ``t`` (the decoded frame with the largest pts <= t). It first
reads the packet index (demuxing only, no decoding) to learn where the keyframes are; for each
target it then either decodes forward from where the decoder already is, or seeks to the
keyframe just before the target when that keyframe lies ahead of the decoder. That is exact
for closed-GOP streams and decodes a small fraction of a long video's frames.

A chosen frame becomes the encoder's input in one of two ways (``RESIZE_METHODS``, recorded in
the cache as ``SamplingConfig.resize``); the display rotation stored in the container is applied
and the centre crop is an array slice in both. ``decode_all_reference`` is the brute-force
reference (decode every frame, pick by the same rule) used by the tests and
``benchmarks/bench_decode.py``.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from tvrerank.errors import InputError, TvrerankError

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


def resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(w, h) that scales the shorter side to ``short_side``, keeping the aspect ratio."""
    scale = short_side / min(width, height)
    return max(short_side, round(width * scale)), max(short_side, round(height * scale))


def center_crop(images: np.ndarray, size: int) -> np.ndarray:
    """Central (size, size) window of (..., H, W, C) images with H, W >= size."""
    h, w = images.shape[-3:-1]
    top, left = (h - size) // 2, (w - size) // 2
    return images[..., top : top + size, left : left + size, :]


#: How a chosen frame becomes the encoder's (S, S) input, with the encoder's interpolation
#: (open_clip's name → the resizer's):
#:
#: * ``torchvision`` (what ``extract`` uses): libswscale converts the frame to RGB at its decoded
#:   size, then torch resizes a video's frames in one call with torchvision's antialiased resize and
#:   open_clip's eval geometry (``input_geometry``): open_clip's own preprocessing of the RGB frame,
#:   whose PIL resize it matches to within 1 grey level on all but ~1e-4 of the values (mean
#:   difference ~0.1). Cheaper than one libswscale call at every size measured, since libswscale's
#:   scaling RGB output path is slow (``benchmarks/bench_decode.py``; 12 frames: 176x144 2.7 ->
#:   1.3 ms, 320x240 6.2 -> 1.6 ms, 1280x720 15.8 -> 12.3 ms).
#: * ``libswscale``: resize and convert in one libswscale call per frame, short side to S rounded,
#:   central crop floored (caches made before the cache recorded the method, which is why it is
#:   ``SamplingConfig.resize``'s default; ``extract --resize libswscale`` continues such work).
RESIZE_METHODS = {
    "torchvision": {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest"},
    "libswscale": {"bicubic": "BICUBIC", "bilinear": "BILINEAR", "nearest": "POINT", "area": "AREA",
                   "lanczos": "LANCZOS"},
}
DEFAULT_RESIZE = "torchvision"
#: open_clip's eval ``resize_mode``: ``shortest`` (short side to S, central crop), ``squash`` (to S x S,
#: aspect not kept; SigLIP, PE, AIMv2), ``longest`` (long side to S, padded with ``fill``).
RESIZE_MODES = ("shortest", "squash", "longest")
#: RGB frames converted and resized at a time: a video's 12 4K frames are ~300 MB as RGB.
RESIZE_CHUNK_BYTES = 64 << 20


def _interpolation(name: str) -> str:
    """open_clip's interpolation name, lower case; its ``random`` means bicubic at inference."""
    name = name.lower()
    return "bicubic" if name == "random" else name


def check_resize(resize: str, interpolation: str, resize_mode: str = "shortest") -> None:
    """Refuse, with InputError, a resize method, interpolation or resize mode the sampler cannot do."""
    if resize not in RESIZE_METHODS:
        raise InputError(f"frames resized with {resize!r}, which this version cannot do; "
                         f"supported: {', '.join(RESIZE_METHODS)}")
    if _interpolation(interpolation) not in RESIZE_METHODS[resize]:
        raise InputError(f"the encoder resizes with {interpolation!r}, which the frame sampler cannot do "
                         f"with {resize}; supported: {', '.join(RESIZE_METHODS[resize])}")
    modes = RESIZE_MODES if resize == "torchvision" else ("shortest",)
    if resize_mode not in modes:
        raise InputError(f"the encoder's resize mode is {resize_mode!r}, which the frame sampler cannot do "
                         f"with {resize}; supported: {', '.join(modes)}")


def resize_options(encoder, sampling) -> dict:
    """``sample_frames``'s options that make a cache's frames: its encoder's (``EncoderConfig``) input
    size, interpolation, resize mode and fill, and its sampling's (``SamplingConfig``) resize method.
    Refuses (``check_resize``) what the sampler cannot do, so callers find out once, not per video."""
    check_resize(sampling.resize, encoder.interpolation, encoder.resize_mode)
    return {"image_size": encoder.image_size, "interpolation": encoder.interpolation, "resize": sampling.resize,
            "resize_mode": encoder.resize_mode, "fill": encoder.fill_color}


def input_geometry(height: int, width: int, image_size: int, mode: str = "shortest") -> tuple[int, int, int, int]:
    """open_clip's eval geometry for an (height, width) image and input size S: the resized (h, w)
    and where the (S, S) window starts in it (top, left; negative: padding), as torchvision's
    ``Resize(S)`` + ``CenterCrop(S)`` (``shortest``: long side truncated, offsets rounded), ``Resize((S,
    S))`` (``squash``) or open_clip's ``ResizeKeepRatio(longest=1)`` + ``CenterCropOrPad``."""
    size = image_size
    if mode == "squash":
        return size, size, 0, 0
    if mode == "longest":
        ratio = max(height / size, width / size)
        h, w = round(height / ratio), round(width / ratio)
        return h, w, -((size - h) // 2), -((size - w) // 2)
    if width <= height:
        w, h = size, int(size * height / width)
    else:
        h, w = size, int(size * width / height)
    return h, w, int(round((h - size) / 2.0)), int(round((w - size) / 2.0))


def _window(images: np.ndarray, top: int, left: int, size: int, fill: int) -> np.ndarray:
    """The (size, size) window of (B, h, w, 3) images starting at (top, left); outside them, ``fill``."""
    if top >= 0 and left >= 0:
        return images[:, top : top + size, left : left + size]
    out = np.full((len(images), size, size, 3), fill, dtype=np.uint8)
    inside = images[:, max(top, 0) : max(top, 0) + size, max(left, 0) : max(left, 0) + size]
    out[:, max(-top, 0) : max(-top, 0) + inside.shape[1], max(-left, 0) : max(-left, 0) + inside.shape[2]] = inside
    return out


def _quarter_turns(frame) -> int:
    """The display rotation, a multiple of 90 degrees counter-clockwise as FFmpeg reports it."""
    return round((frame.rotation or 0) / 90) % 4


def frame_to_rgb(frame, reformatter) -> np.ndarray:
    """Decoded ``av.VideoFrame`` → (H, W, 3) uint8 RGB as displayed, at its decoded size.

    ``reformatter``: one ``av.video.reformatter.VideoReformatter`` shared by a video's frames, so
    libswscale's context is built once per video instead of once per frame. (RGBA would resize
    ~0.1 ms faster for 12 small frames, but dropping its fourth channel afterwards costs 1-2 ms.)
    """
    try:  # one thread: libswscale's automatic threads cost 5x more than they give on these sizes
        rgb = reformatter.reformat(frame, format="rgb24", threads=1)
    except TypeError:  # an older PyAV without the option (it converts on one thread)
        rgb = reformatter.reformat(frame, format="rgb24")
    image = rgb.to_ndarray()
    quarter_turns = _quarter_turns(frame)
    return np.rot90(image, k=quarter_turns) if quarter_turns else image


def resize_to_input(images: list[np.ndarray], image_size: int, interpolation: str = "bicubic",
                    resize_mode: str = "shortest", fill: int = 0, out: np.ndarray | None = None) -> np.ndarray:
    """RGB images (H_i, W_i, 3) uint8 → (N, S, S, 3) uint8, open_clip's eval preprocessing: resized
    by torchvision's antialiased resize with ``input_geometry``, then the (S, S) window. Images of
    one shape are resized in one call. ``out``: an (N, S, S, 3) array to write into."""
    import torch

    # torchvision.transforms.v2's resize of a uint8 CPU image is this call (tested equal); calling it
    # directly spares decoding workers torchvision's import (~1.2 s). v1's resize goes through float: 20x slower.
    mode = RESIZE_METHODS["torchvision"][_interpolation(interpolation)]
    if out is None:
        out = np.empty((len(images), image_size, image_size, 3), dtype=np.uint8)
    rows_by_shape: dict[tuple, list[int]] = {}
    for row, image in enumerate(images):
        rows_by_shape.setdefault(image.shape, []).append(row)
    for (height, width, _), rows in rows_by_shape.items():
        out_h, out_w, top, left = input_geometry(height, width, image_size, resize_mode)
        batch = torch.from_numpy(np.stack([images[row] for row in rows])).permute(0, 3, 1, 2)  # (B, 3, H, W)
        scaled = batch if (out_h, out_w) == (height, width) else _interpolate_uint8(batch, (out_h, out_w), mode)
        out[rows] = _window(scaled.permute(0, 2, 3, 1).numpy(), top, left, image_size, fill)  # (B, S, S, 3)
    return out


def _interpolate_uint8(batch, size: tuple[int, int], mode: str):
    """(B, 3, H, W) uint8 → (B, 3, h, w) uint8 as torchvision.transforms.v2's resize (antialiased): torch's
    native uint8 kernel, except bilinear on x86 without AVX2, which torchvision computes in float."""
    import platform

    import torch

    native = mode != "bilinear" or torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or \
        platform.machine() in ("aarch64", "arm64")
    if native:
        return torch.nn.functional.interpolate(batch, size=size, mode=mode, antialias=mode != "nearest")
    scaled = torch.nn.functional.interpolate(batch.float(), size=size, mode=mode, antialias=True)
    return scaled.round_().to(torch.uint8)


def frame_to_array(frame, image_size: int, interpolation: str = "BICUBIC", reformatter=None) -> np.ndarray:
    """Decoded ``av.VideoFrame`` → (S, S, 3) uint8 RGB as displayed, by the ``libswscale`` method:
    resized and converted in one libswscale call (``interpolation`` in its names), rotated, cropped."""
    quarter_turns = _quarter_turns(frame)
    width, height = frame.width, frame.height
    if quarter_turns % 2:  # displayed sideways: the short side is measured after rotation
        disp_w, disp_h = resized_size(height, width, image_size)
        out_w, out_h = disp_h, disp_w
    else:
        out_w, out_h = resized_size(width, height, image_size)
    if reformatter is None:
        rgb = frame.reformat(width=out_w, height=out_h, format="rgb24", interpolation=interpolation)
    else:
        rgb = reformatter.reformat(frame, width=out_w, height=out_h, format="rgb24", interpolation=interpolation)
    image = rgb.to_ndarray()
    if quarter_turns:
        image = np.rot90(image, k=quarter_turns)
    return np.ascontiguousarray(center_crop(image, image_size))


def frames_to_arrays(frames: list, image_size: int, interpolation: str = "bicubic", resize: str = DEFAULT_RESIZE,
                     resize_mode: str = "shortest", fill: int = 0, out: np.ndarray | None = None) -> np.ndarray:
    """Decoded frames of one video → (N, S, S, 3) uint8, the encoder's input, by ``resize`` (written
    into ``out`` when given); at most ``RESIZE_CHUNK_BYTES`` of RGB frames exist at a time."""
    from av.video.reformatter import VideoReformatter

    check_resize(resize, interpolation, resize_mode)
    reformatter = VideoReformatter()
    if out is None:
        out = np.empty((len(frames), image_size, image_size, 3), dtype=np.uint8)
    if resize == "libswscale":
        name = RESIZE_METHODS[resize][_interpolation(interpolation)]
        for row, frame in enumerate(frames):
            out[row] = frame_to_array(frame, image_size, name, reformatter)
        return out
    start = 0
    while start < len(frames):
        images: list[np.ndarray] = []
        while start + len(images) < len(frames) and sum(i.nbytes for i in images) < RESIZE_CHUNK_BYTES:
            images.append(frame_to_rgb(frames[start + len(images)], reformatter))
        resize_to_input(images, image_size, interpolation, resize_mode, fill, out[start : start + len(images)])
        start += len(images)
    return out


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
#: flushes the decoder (and its frame threads) and re-reads: measured median ms with 0 / 4 / 32
#: here: 1280x720 GOP 60 5 s 223 / 163 / 160, 320x240 GOP 60 15 s 45 / 42 / 45, 176x144 GOP 12
#: 10.6 / 9.1 / 8.8, 320x240 GOP 250 60 s 88 / 87 / 91 (frames identical in every case).
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
        keyframe right after would throw that one away; 1-10 fewer packets per clip in
        benchmarks/bench_decode.py).
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
#: flushes often, and FFmpeg's frame threads then cost more than they give (measured in
#: benchmarks/bench_decode.py: 320x240 clips 61 -> 54 ms, 176x144 18 -> 16 ms; 1280x720 equal).
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

    Returns frames resized (short side) and centre-cropped to ``image_size``; a video with
    fewer distinct frames than targets fills the first slots and masks the rest. Raises
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
