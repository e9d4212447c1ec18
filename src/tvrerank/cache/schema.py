"""The HDF5 cache schema ``tvrerank.cache/1`` (docs/design.md, "The cache").

N videos, M captions, T frames, P tokens per frame, D token width, E embedding width,
L text tokens, Dt text token width. Root attributes hold JSON of the encoder, the sampling,
the token layout and the dataset, plus the schema name, tool version and creation time.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Callable

import h5py
import numpy as np

from tvrerank import __version__
from tvrerank.cache.encoding import STORED_DTYPE, TOKEN_DTYPES, has_scale
from tvrerank.config import EncoderConfig, SamplingConfig, TokenLayout, from_dict, to_dict

SCHEMA = "tvrerank.cache/1"
PENDING, OK, FAILED = 0, 1, 2
STR = h5py.string_dtype("utf-8")


@dataclass(frozen=True)
class CacheHeader:
    """Everything in the root attributes: what made the cache and what its arrays hold."""

    encoder: EncoderConfig
    sampling: SamplingConfig
    layout: TokenLayout
    dataset: dict  # annotations, format, videos root, shard
    created: str = ""
    tool_version: str = __version__

    def to_attrs(self) -> dict[str, str]:
        return {
            "schema": SCHEMA,
            "tool_version": self.tool_version,
            "created": self.created,
            "encoder": json.dumps(to_dict(self.encoder), sort_keys=True),
            "sampling": json.dumps(to_dict(self.sampling), sort_keys=True),
            "token_layout": json.dumps(to_dict(self.layout), sort_keys=True),
            "dataset": json.dumps(self.dataset, sort_keys=True),
        }

    @classmethod
    def from_attrs(cls, attrs: Any, where: str = "cache") -> "CacheHeader":
        schema = attrs.get("schema")
        if schema != SCHEMA:
            raise ValueError(f"{where}: schema is {schema!r}, expected {SCHEMA!r} (not a tvrerank cache?)")
        return cls(
            encoder=from_dict(EncoderConfig, json.loads(attrs["encoder"])),
            sampling=from_dict(SamplingConfig, json.loads(attrs["sampling"])),
            layout=from_dict(TokenLayout, json.loads(attrs["token_layout"])),
            dataset=json.loads(attrs["dataset"]),
            created=str(attrs.get("created", "")),
            tool_version=str(attrs.get("tool_version", "")),
        )

    def fingerprint(self) -> dict[str, Any]:
        """What two caches must share for their tokens and embeddings to be interchangeable."""
        return {
            "encoder": self.encoder.identity(),
            "sampling": to_dict(self.sampling),
            "layout": to_dict(self.layout),
        }


def _integer(low: int, high: int | None = None) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high):
            return None
        return f"an integer >= {low}" + (f" and <= {high}" if high is not None else "")
    return check


def _text(choices: tuple[str, ...] = (), *, optional: bool = False) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if (value is None and optional) or (isinstance(value, str) and value and (not choices or value in choices)):
            return None
        return (f"one of {', '.join(choices)}" if choices else "a non-empty string") + (" or null" if optional else "")
    return check


def _numbers(count: int, *, positive: bool = False) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if isinstance(value, list) and len(value) == count and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and (v > 0 or not positive) for v in value):
            return None
        return f"a list of {count} {'positive ' if positive else ''}numbers"
    return check


def _pair_of_positive_integers(value: Any) -> str | None:
    if isinstance(value, list) and len(value) == 2 and all(_integer(1)(v) is None for v in value):
        return None
    return "a list of two integers >= 1"


def _mapping(value: Any) -> str | None:
    return None if isinstance(value, dict) else "a JSON object"


#: the root attributes holding JSON → (the dataclass they build, or None for free-form, {field: check}).
#: A check returns None when the value is fine, else what it should be.
HEADER_FIELDS: dict[str, tuple[type | None, dict[str, Callable[[Any], str | None]]]] = {
    "encoder": (EncoderConfig, {
        "model": _text(), "model_config": _mapping, "pretrained": _text(optional=True),
        "pretrained_sha256": _text(optional=True), "image_size": _integer(1), "mean": _numbers(3),
        "std": _numbers(3, positive=True), "interpolation": _text(), "precision": _text(("fp32", "fp16", "bf16")),
        "resize_mode": _text(), "fill_color": _integer(0, 255)}),
    "sampling": (SamplingConfig, {"frames": _integer(1), "strategy": _text(), "resize": _text()}),
    "token_layout": (TokenLayout, {
        "space": _text(("joint", "raw")), "pool": _text(("none", "2x2")), "token_dtype": _text(TOKEN_DTYPES),
        "text_tokens": _integer(1), "grid": _pair_of_positive_integers, "tokens_per_frame": _integer(1),
        "token_dim": _integer(1), "text_token_dim": _integer(1), "embed_dim": _integer(1)}),
    "dataset": (None, {}),
}


def check_header(attrs: Any) -> list[str]:
    """Every problem of a cache's root attributes (empty when sound): the schema name, and each JSON
    attribute's fields by type and range ("token_layout.token_dim: 32.0 is not an integer >= 1").
    Fields a cache written before they existed lacks take their defaults; unknown fields are ignored."""
    problems = []
    if attrs.get("schema") != SCHEMA:
        return [f"schema is {attrs.get('schema')!r}, expected {SCHEMA!r} (not a tvrerank cache?)"]
    for name in ("tool_version", "created"):
        if name in attrs and not isinstance(attrs[name], str):
            problems.append(f"{name}: {attrs[name]!r} is not a string")
    for name, (cls, checks) in HEADER_FIELDS.items():
        if name not in attrs:
            problems.append(f"attribute {name} is missing")
            continue
        try:
            data = json.loads(attrs[name])
        except (TypeError, ValueError):
            problems.append(f"{name}: not JSON")
            continue
        if not isinstance(data, dict):
            problems.append(f"{name}: {data!r} is not a JSON object")
            continue
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING} if cls is not None else set()
        problems += [f"{name}.{field}: missing" for field in sorted(required - set(data))]
        for field, check in checks.items():
            if field in data and (expected := check(data[field])) is not None:
                problems.append(f"{name}.{field}: {data[field]!r} is not {expected}")
    return problems


def dataset_specs(n: int, m: int, layout: TokenLayout, frames: int) -> dict[str, tuple[tuple, Any]]:
    """name → (shape, dtype) of every dataset of a cache with n videos and m captions (the tokens in the
    layout's encoding, with a scale per token for the 8-bit ones: ``cache.encoding``)."""
    t, p, d, e = frames, layout.tokens_per_frame, layout.token_dim, layout.embed_dim
    l, token = layout.text_tokens, STORED_DTYPE[layout.token_dtype]
    specs = {
        "videos/id": ((n,), STR),
        "videos/path": ((n,), STR),
        "videos/status": ((n,), np.uint8),
        "videos/error": ((n,), STR),
        "videos/frame_mask": ((n, t), np.bool_),
        "videos/frame_emb": ((n, t, e), np.float16),
        "videos/video_emb": ((n, e), np.float16),
        "videos/tokens": ((n, t, p, d), token),
        "texts/caption": ((m,), STR),
        "texts/video": ((m,), np.int32),
        "texts/emb": ((m, e), np.float16),
        "texts/tokens": ((m, l, layout.text_token_dim), token),
        "texts/length": ((m,), np.int16),
    }
    if has_scale(layout.token_dtype):
        specs["videos/token_scale"] = ((n, t, p), np.float16)
        specs["texts/token_scale"] = ((m, l), np.float16)
    return specs


#: Datasets written per video / per caption as extraction goes (the rest is known up front), and the
#: scales beside the tokens of the 8-bit encodings.
VIDEO_ARRAYS = ("status", "error", "frame_mask", "frame_emb", "video_emb", "tokens")
TEXT_ARRAYS = ("emb", "tokens", "length")
SCALE_ARRAY = "token_scale"
#: Large arrays that a shard merge maps with virtual datasets instead of copying.
VIRTUAL_ARRAYS = ("videos/frame_emb", "videos/video_emb", "videos/tokens", "videos/token_scale", "texts/emb",
                  "texts/tokens", "texts/token_scale")


def part_arrays(layout: TokenLayout) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(video arrays, text arrays) a part of a cache with this layout holds."""
    scale = (SCALE_ARRAY,) if has_scale(layout.token_dtype) else ()
    return VIDEO_ARRAYS + scale, TEXT_ARRAYS + scale


def spec_bytes(shape: tuple, dtype) -> int:
    """Bytes of a numeric dataset of this (shape, dtype) (``dataset_specs``' entries)."""
    return int(np.prod(shape)) * np.dtype(dtype).itemsize


#: 8-bit caption tokens are stored with zeros past each caption's length (``cache.encoding.without_padding``)
#: and compressed (lzf, fast): the padding then costs next to nothing on disk
COMPRESSED_ARRAYS = ("texts/tokens",)


def storage_for(name: str, shape: tuple, dtype) -> dict:
    """h5py ``create_dataset`` options of a cache (or part) dataset: ``chunks_for``'s chunks with a fletcher32
    checksum each (numeric, non-empty), lzf compression for the 8-bit caption tokens; {} for strings."""
    chunks = None if dtype is STR else chunks_for(name, shape, dtype)
    if chunks is None:
        return {}
    options = {"chunks": chunks, "fletcher32": True}
    if name in COMPRESSED_ARRAYS and np.dtype(dtype).itemsize == 1:
        options["compression"] = "lzf"
    return options


def chunks_for(name: str, shape: tuple, dtype) -> tuple | None:
    """One video (or ~1 MiB of rows) per chunk, so a reader touches only what it needs; every non-empty
    numeric dataset is chunked, so that each chunk carries a checksum (cache/checksums.py)."""
    if not shape or shape[0] == 0:
        return None
    if name in ("videos/tokens", "videos/token_scale"):
        return (1,) + tuple(shape[1:])
    if len(shape) > 1:
        rows = max(1, min(shape[0], (1 << 20) // max(1, spec_bytes(shape[1:], dtype))))
        return (rows,) + tuple(shape[1:])
    return (min(shape[0], 1 << 16),)
