"""How a decoded frame becomes the encoder's (S, S) input: open_clip's eval preprocessing geometry.

Two methods (``RESIZE_METHODS``, recorded in the cache as ``SamplingConfig.resize``); the display
rotation stored in the container is applied in both, and the window (centre crop or padding) is an
array slice:

* ``torchvision`` (what ``extract`` writes): libswscale converts the frame to RGB at its decoded
  size, then torch resizes a video's frames in one call with torchvision's antialiased resize and
  open_clip's eval geometry (``input_geometry``: ``shortest`` crops the short side's square,
  ``squash`` resizes to S x S, ``longest`` pads with ``fill``), which is open_clip's own
  preprocessing of the RGB frame;
* ``libswscale``: one libswscale call per frame resizes (short side to S) and converts, then the
  centre crop: the caches made before the cache recorded the method.

Only arrays in, arrays out; the sampler (``frames.py``) decides which frames. Speed figures of both
methods are in benchmarks/README.md (``benchmarks/bench_decode.py``).
"""

from __future__ import annotations

import numpy as np

from tvrerank.errors import InputError


def resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(w, h) that scales the shorter side to ``short_side``, keeping the aspect ratio."""
    scale = short_side / min(width, height)
    return max(short_side, round(width * scale)), max(short_side, round(height * scale))


def center_crop(images: np.ndarray, size: int) -> np.ndarray:
    """Central (size, size) window of (..., H, W, C) images with H, W >= size."""
    h, w = images.shape[-3:-1]
    top, left = (h - size) // 2, (w - size) // 2
    return images[..., top : top + size, left : left + size, :]


#: The methods, each with the encoder's interpolations it can do (open_clip's name → the resizer's):
#:
#: * ``torchvision`` (what ``extract`` uses): matches open_clip's PIL resize to within 1 grey level on
#:   all but ~1e-4 of the values (mean difference ~0.1), and costs less than one libswscale call at
#:   every size measured (libswscale's scaling RGB output path is slow; benchmarks/README.md).
#: * ``libswscale``: short side to S rounded, central crop floored (caches made before the cache
#:   recorded the method, which is why it is ``SamplingConfig.resize``'s default; ``extract --resize
#:   libswscale`` continues such work).
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
    libswscale's context is built once per video instead of once per frame. (RGB24, not RGBA: RGBA
    converts faster, but dropping its fourth channel costs more; benchmarks/README.md.)
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

