"""Re-ranker variants that are not the method, beside it (``model.py`` reads top to bottom as the method).

- ``combine = "joint"``: the earlier design. Per layer, the queries attend to all frames' kept tokens
  at once (one attention, no per-frame results), then to the video-level tokens; the frame level has
  a block of its own per layer unless its weights are shared.
- ``token_match``: a word-to-patch term (not in the method): each caption token's best cosine match
  among the pair's frame-level tokens, averaged, times a learned scale that starts at
  ``token_match_init`` (0 by default, so it cannot dominate the attention path at first).

Checkpoints written before these were switches (``checkpoint.LEGACY_MODEL``: joint + word-to-patch)
load as ``VariantReranker`` with the parameters, names and scores they had. ``build_reranker`` builds the
method's ``Reranker`` or, when a config asks for a variant, ``VariantReranker``.

Shapes as in ``model.py``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tvrerank.rerank.model import Reranker, RerankerConfig, SelectedVideos, per_pair


def build_reranker(config: RerankerConfig) -> Reranker:
    """The model a config describes: the method, or the method with the variants it asks for."""
    wants_variant = config.combine == "joint" or config.token_match
    return VariantReranker(config=config) if wants_variant else Reranker(config=config)


def token_match(text, text_pad, visual, visual_pad, pair_video) -> torch.Tensor:
    """Mean over real caption tokens of their best cosine match among the pair's visual tokens.

    text (C, L, d), text_pad (C, L); visual (B, Lv, d), visual_pad (B, Lv); pair_video (C,) or None → (C,)
    """
    similarity = torch.einsum("cld,cvd->clv", F.normalize(text, dim=-1),
                              per_pair(F.normalize(visual, dim=-1), pair_video))  # (C, L, Lv)
    similarity = similarity.masked_fill(per_pair(visual_pad, pair_video)[:, None, :], -1.0)
    best = similarity.max(dim=-1).values.masked_fill(text_pad, 0.0)  # (C, L)
    return best.sum(-1) / (~text_pad).sum(-1).clamp(min=1)


class VariantReranker(Reranker):
    """``Reranker`` with the joint design and the word-to-patch term as its config asks."""

    variants = ("joint", "token_match")

    def __init__(self, *, config: RerankerConfig):
        super().__init__(config=config)
        # registered last, as before these were variants: the same parameter order and random draws
        self.token_match_scale = nn.Parameter(torch.tensor(float(config.token_match_init))) \
            if config.token_match else None

    def frame_block_count(self) -> int:
        return self.config.layers if self.config.combine == "joint" else 1

    def score(self, text_tokens: torch.Tensor, text_length: torch.Tensor, videos: SelectedVideos,
              pair_video: torch.Tensor | None, *, pair_text: torch.Tensor | None = None,
              trace: dict | None = None, columns: int | None = None) -> torch.Tensor:
        # as Reranker.score; the joint design records no attention in ``trace``
        text, text_pad = self.caption(text_tokens, text_length, columns)
        queries, query_pad = self.query_tokens(text, text_pad)
        if self.config.combine == "joint":
            score = self._joint(per_pair(queries, pair_text), per_pair(query_pad, pair_text), videos, pair_video)
        else:
            score = self._levels(queries, query_pad, videos, pair_video, pair_text, trace)
        if self.token_match_scale is not None:
            frame_tokens, frame_pad = videos.flat_frame_tokens()
            score = score + self.token_match_scale * token_match(
                per_pair(text, pair_text), per_pair(text_pad, pair_text), frame_tokens, frame_pad, pair_video)
        return score

    def _joint(self, queries, query_pad, videos: SelectedVideos, pair_video) -> torch.Tensor:
        """Per layer, one attention over all frames' tokens, then the video tokens."""
        c, q = self.config, self.config.queries
        frame_tokens, frame_pad = videos.flat_frame_tokens()
        levels = []
        if c.frame_level:
            levels.append(("frame", frame_tokens, per_pair(frame_pad, pair_video)))
        if c.video_level:
            levels.append(("video", videos.video_tokens, per_pair(videos.video_pad, pair_video)))
        for i in range(c.layers):
            for j, (level, tokens, pad) in enumerate(levels):
                block = self.frame_block(i) if level == "frame" else self.blocks[i]
                keys, values = block.keys_values(tokens)  # once per video
                last = i == c.layers - 1 and j == len(levels) - 1  # only the learnable queries are read
                queries = block(queries, query_pad, per_pair(keys, pair_video), per_pair(values, pair_video), pad,
                                rows=q if last else None)
        return self.head(queries[:, :q].mean(dim=1)).squeeze(-1)
