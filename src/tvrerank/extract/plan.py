"""``tvrerank plan``: the size of a cache on disk, from the model's config alone (no weights built).

An open_clip ViT's config gives its token grid and widths directly (``layout_from_config``); any
other tower (timm, ResNet, Hugging Face text) is built on PyTorch's ``meta`` device, which holds
shapes but no memory or weights, and one meta forward measures it. The sizes are the cache's arrays
as the schema specifies them (``cache.schema.dataset_specs``) for each token encoding and pool.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass

from tvrerank.cache.encoding import POOLS, TOKEN_DTYPES, has_scale, pooled_grid
from tvrerank.cache.rows import held_fields
from tvrerank.cache.schema import dataset_specs, spec_bytes
from tvrerank.config import TokenLayout


@dataclass(frozen=True)
class CachePlan:
    model: str
    videos: int
    captions: int
    frames: int
    grid: tuple[int, int]
    tokens_per_frame: int
    token_dim: int
    embed_dim: int
    text_tokens: int
    text_token_dim: int
    bytes_tokens: int  # patch tokens (and their scales, 8-bit encodings)
    bytes_embeddings: int
    bytes_text: int  # caption embeddings, tokens (and scales), lengths
    bytes_in_memory: int  # what training holds in memory (``train --in-memory``: cache.rows.held_fields)
    token_dtype: str = "float16"
    pool: str = "none"

    @property
    def bytes_total(self) -> int:
        return self.bytes_tokens + self.bytes_embeddings + self.bytes_text

    @property
    def bytes_per_frame(self) -> int:
        return self.bytes_tokens // max(1, self.videos * self.frames)


def layout_from_config(config: dict, token_space: str = "joint") -> dict | None:
    """Grid, token width, embedding width and text token width of an open_clip ViT from its model config
    (``vision_cfg``: image_size, patch_size, width); None for towers the config alone does not describe
    (timm or Hugging Face towers, ResNets), which ``measure_layout`` measures instead."""
    vision, text = config.get("vision_cfg", {}), config.get("text_cfg", {})
    plain_vit = (isinstance(vision.get("layers"), int) and vision.get("patch_size") and "width" in vision
                 and not vision.get("timm_model_name") and "width" in text and not text.get("hf_model_name"))
    if not plain_vit:
        return None
    size = vision.get("image_size", 224)
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    grid = (size[0] // vision["patch_size"], size[1] // vision["patch_size"])
    joint = token_space == "joint"
    embed_dim = config["embed_dim"]
    return {"grid": grid, "tokens_per_frame": grid[0] * grid[1], "token_dim": embed_dim if joint else vision["width"],
            "embed_dim": embed_dim, "text_token_dim": embed_dim if joint else text["width"]}


@contextmanager
def _quiet_random_weights():
    """open_clip warns that a model built without weights is initialised randomly: true, and beside the
    point for a meta-device model that only measures shapes."""
    def drop(record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def measure_layout(model: str, token_space: str = "joint", token_pool: str = "none") -> dict:
    """Grid, token width, embedding width and text widths of ``model`` (pooled by ``token_pool``): from its
    config when it is an open_clip ViT, else via a meta-device forward (shapes only, no weights)."""
    from tvrerank.extract.models import resolve_model_config

    _, config = resolve_model_config(model)
    dims = layout_from_config(config, token_space) or _meta_layout(model, token_space)
    grid = pooled_grid(dims["grid"], token_pool)
    return dict(dims, grid=grid, tokens_per_frame=grid[0] * grid[1])


def _meta_layout(model: str, token_space: str) -> dict:
    import torch

    from tvrerank.extract.models import build_meta_model

    with _quiet_random_weights():
        clip = build_meta_model(model)
    size = clip.visual.image_size
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    with torch.no_grad():
        out = clip.visual.forward_intermediates(
            torch.zeros(1, 3, *size, device="meta"), indices=1, output_fmt="NCHW"
        )
        grid_tokens = out["image_intermediates"][-1]  # (1, C, H, W)
        text_width = clip.forward_intermediates(
            text=torch.zeros(1, clip.context_length, dtype=torch.long, device="meta"), text_indices=1
        )["text_intermediates"][-1].shape[-1]
    embed_dim = out["image_features"].shape[-1]
    joint = token_space == "joint"
    return {
        "grid": tuple(grid_tokens.shape[-2:]),
        "tokens_per_frame": grid_tokens.shape[-2] * grid_tokens.shape[-1],
        "token_dim": embed_dim if joint else grid_tokens.shape[1],
        "embed_dim": embed_dim,
        "text_token_dim": embed_dim if joint else text_width,
    }


def plan_cache(
    model: str,
    videos: int,
    *,
    captions: int | None = None,
    frames: int = 12,
    token_space: str = "joint",
    token_pool: str = "none",
    token_dtype: str = "float16",
    text_tokens: int = 32,
    caption_tokens: float | None = None,
    dims: dict | None = None,
) -> CachePlan:
    """Estimated bytes of a cache: its arrays as the schema specifies them (``cache.schema.dataset_specs``;
    strings and HDF5 overhead aside). ``dims``: ``measure_layout``'s result, when already measured.

    ``caption_tokens``: the captions' mean real tokens; 8-bit caches hold their padding as compressed
    zeros (``cache.schema.COMPRESSED_ARRAYS``), so their caption tokens take that share of the array
    (None: all ``text_tokens``, an upper bound). float16 caches store every position."""
    dims = dims or measure_layout(model, token_space, token_pool)
    captions = videos if captions is None else captions
    layout = TokenLayout(space=token_space, pool=token_pool, token_dtype=token_dtype, text_tokens=text_tokens, **dims)
    specs = dataset_specs(videos, captions, layout, frames)

    def total(*names: str) -> int:
        return sum(spec_bytes(*specs[name]) for name in names if name in specs)

    text_tokens_bytes = total("texts/tokens")
    if has_scale(token_dtype) and caption_tokens is not None:
        text_tokens_bytes = int(text_tokens_bytes * min(1.0, caption_tokens / text_tokens))

    held = [f"{group}/{name}" for group, names in held_fields("videos/token_scale" in specs).items() for name in names]
    return CachePlan(
        model=model,
        videos=videos,
        captions=captions,
        frames=frames,
        text_tokens=text_tokens,
        token_dtype=token_dtype,
        pool=token_pool,
        bytes_tokens=total("videos/tokens", "videos/token_scale"),
        bytes_embeddings=total("videos/frame_emb", "videos/video_emb", "videos/frame_mask"),
        bytes_text=total("texts/emb", "texts/token_scale", "texts/length", "texts/video") + text_tokens_bytes,
        bytes_in_memory=total(*held),
        **{k: dims[k] for k in ("grid", "tokens_per_frame", "token_dim", "embed_dim", "text_token_dim")},
    )


def plan_every_option(model: str, videos: int, **options) -> list[CachePlan]:
    """``plan_cache`` for every token encoding and pool (float16, int8, float8 × pool none, 2x2), the model
    measured once per pool."""
    options = {k: v for k, v in options.items() if k not in ("token_dtype", "token_pool", "dims")}
    plans = []
    for pool in POOLS:
        dims = measure_layout(model, options.get("token_space", "joint"), pool)
        plans += [plan_cache(model, videos, token_pool=pool, token_dtype=dtype, dims=dims, **options)
                  for dtype in TOKEN_DTYPES]
    return plans
