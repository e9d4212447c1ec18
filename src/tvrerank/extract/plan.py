"""``tvrerank plan``: the size of a cache on disk, from the model's config alone (no weights loaded).

The model is built on PyTorch's ``meta`` device and one meta forward gives the token grid and
widths, so any open_clip architecture (timm towers included) is measured the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvrerank.cache.schema import dataset_specs, spec_bytes
from tvrerank.config import TokenLayout
from tvrerank.extract.encoder import pool_grid


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
    bytes_tokens: int
    bytes_embeddings: int
    bytes_text: int

    @property
    def bytes_total(self) -> int:
        return self.bytes_tokens + self.bytes_embeddings + self.bytes_text

    @property
    def bytes_per_frame(self) -> int:
        return self.bytes_tokens // max(1, self.videos * self.frames)


def measure_layout(model: str, token_space: str = "joint", token_pool: str = "none") -> dict:
    """Grid, token width, embedding width and text widths of ``model`` via a meta-device forward."""
    import torch

    from tvrerank.extract.models import build_meta_model

    clip = build_meta_model(model)
    size = clip.visual.image_size
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    with torch.no_grad():
        out = clip.visual.forward_intermediates(
            torch.zeros(1, 3, *size, device="meta"), indices=1, output_fmt="NCHW"
        )
        grid_tokens = pool_grid(out["image_intermediates"][-1], token_pool)
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
    text_tokens: int = 32,
) -> CachePlan:
    """Estimated bytes of a cache: its arrays as the schema specifies them (``cache.schema.dataset_specs``;
    strings and HDF5 overhead aside)."""
    dims = measure_layout(model, token_space, token_pool)
    captions = videos if captions is None else captions
    layout = TokenLayout(space=token_space, pool=token_pool, text_tokens=text_tokens, **dims)
    specs = dataset_specs(videos, captions, layout, frames)

    def total(*names: str) -> int:
        return sum(spec_bytes(*specs[name]) for name in names)

    return CachePlan(
        model=model,
        videos=videos,
        captions=captions,
        frames=frames,
        text_tokens=text_tokens,
        bytes_tokens=total("videos/tokens"),
        bytes_embeddings=total("videos/frame_emb", "videos/video_emb", "videos/frame_mask"),
        bytes_text=total("texts/emb", "texts/tokens", "texts/length", "texts/video"),
        **{k: dims[k] for k in ("grid", "tokens_per_frame", "token_dim", "embed_dim", "text_token_dim")},
    )
