"""A first stage trained from the cache: CLIP4Clip-style pooling of the frozen frame embeddings.

Read top to bottom:

1. ``FirstStageConfig``: pooling ``transformer`` (a small temporal transformer over the frame
   embeddings, CLIP4Clip's "seqTransf") or ``mean``; a text-side projection over the cached
   caption embedding (or none).
2. ``FirstStage``:
   - videos: frame embeddings + position → transformer → minus the position (a residual
     update of each frame) → mean over valid frames → L2-normalised;
   - texts: the caption embedding plus a linear update → L2-normalised;
   - a learned logit scale for the symmetric InfoNCE loss (``contrastive_loss``).
   The transformer's output projections and the text update start at zero, so an untrained first
   stage *is* the zero-shot one (the mean of the frame embeddings, the caption embedding):
   training can only move away from it where the loss says so.

Shapes: B videos, T frames, E embedding width, M captions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from tvrerank.config import check_fields
from tvrerank.errors import InputError

POOLINGS = ("transformer", "mean")
TEXT_SIDES = ("projection", "none")


@dataclass(frozen=True)
class FirstStageConfig:
    embed_dim: int = 512  # E, from the cache
    frames: int = 12  # T, from the cache
    pooling: str = "transformer"  # transformer | mean
    layers: int = 2
    heads: int = 4
    dropout: float = 0.1
    text: str = "projection"  # projection | none
    logit_scale_init: float = 50.0  # below the clamp at 100 (CLIP's), so it can move both ways

    def __post_init__(self):
        check_fields(self, "first-stage model", integers={"embed_dim": 1, "frames": 1, "layers": 1, "heads": 1},
                     numbers={"dropout": (0.0, 0.9), "logit_scale_init": (1.0, 100.0)},
                     choices={"pooling": POOLINGS, "text": TEXT_SIDES})
        if self.embed_dim % self.heads:
            raise InputError(f"first-stage model option 'heads' ({self.heads}) must divide the embedding width "
                             f"({self.embed_dim})")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x (B, T, E), mask (B, T) True = valid → (B, E)."""
    keep = mask.unsqueeze(-1).to(x.dtype)
    return (x * keep).sum(1) / keep.sum(1).clamp(min=1)


class FirstStage(nn.Module):
    def __init__(self, *, config: FirstStageConfig):
        super().__init__()
        c = self.config = config
        self.temporal = None
        if c.pooling == "transformer":
            self.position = nn.Parameter(torch.zeros(c.frames, c.embed_dim))
            layer = nn.TransformerEncoderLayer(c.embed_dim, c.heads, dim_feedforward=2 * c.embed_dim,
                                               dropout=c.dropout, batch_first=True, norm_first=True)
            self.temporal = nn.TransformerEncoder(layer, c.layers, enable_nested_tensor=False)
            for block in self.temporal.layers:  # each block starts as the identity
                for linear in (block.self_attn.out_proj, block.linear2):
                    nn.init.zeros_(linear.weight)
                    nn.init.zeros_(linear.bias)
            nn.init.normal_(self.position, std=0.01)
        self.text_update = nn.Linear(c.embed_dim, c.embed_dim) if c.text == "projection" else None
        if self.text_update is not None:
            nn.init.zeros_(self.text_update.weight)
            nn.init.zeros_(self.text_update.bias)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(c.logit_scale_init)))

    def videos(self, frame_emb: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        # frame_emb (B, T, E), frame_mask (B, T) bool → (B, E) unit length
        x = frame_emb.float()
        if self.temporal is not None:
            position = self.position[: x.shape[1]]
            x = self.temporal(x + position, src_key_padding_mask=~frame_mask) - position
        return F.normalize(masked_mean(x, frame_mask), dim=-1)

    def texts(self, text_emb: torch.Tensor) -> torch.Tensor:
        # text_emb (M, E) → (M, E) unit length
        x = text_emb.float()
        if self.text_update is not None:
            x = x + self.text_update(x)
        return F.normalize(x, dim=-1)

    def forward(self, frame_emb: torch.Tensor, frame_mask: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """The training loss of B (video, caption) pairs: (B, T, E), (B, T), (B, E) → ()."""
        return self.contrastive_loss(self.texts(text_emb), self.videos(frame_emb, frame_mask))

    def contrastive_loss(self, text: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE over in-batch pairs: text (B, E) and video (B, E), pair i matches i."""
        logits = self.logit_scale.clamp(max=math.log(100.0)).exp() * text @ video.T  # (B, B)
        target = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
