"""The re-ranker: token selectors + multi-grained cross attention (docs/design.md, "The re-ranker").

Read top to bottom:

1. ``perturbed_top_k``: differentiable top-k (perturbed maximum, as in TS2-Net) for training;
   hard top-k at inference.
2. ``FrameTokenSelector``: per frame, keep the frame's global token + the M patch tokens an MLP
   scores highest given the token and the frame's global embedding.
3. ``VideoTokenSelector``: across the clip, keep the N_v most salient frame-level tokens, with
   temporal position embeddings.
4. ``CrossBlock``: queries attend to visual tokens, then to each other, then an MLP.
5. ``Reranker``: learnable query tokens + caption tokens go through the same blocks twice per
   layer — first over frame-level tokens (spatial detail), then over video-level tokens (order,
   motion) — and a head turns the pooled queries into one score per (caption, video) pair. A
   token-wise similarity (each caption token's best match among the frame-level tokens, as in
   X-CLIP/TS2-Net) is added with a learned weight: a direct path that makes token matching
   quick to learn, while the attention blocks carry order and context.

The selectors depend on the video only: ``select(...)`` runs once per video (and can be
precomputed for a gallery); ``score(...)`` pairs captions with selected videos by index.

Shapes: B videos, T frames, P patch tokens, D token width, E embedding width, L caption tokens,
Dt caption token width, d model width, M kept tokens per frame, Nv video-level tokens,
Q learnable queries, C (caption, video) pairs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class RerankerConfig:
    # input layout (from the cache)
    frames: int = 12
    tokens_per_frame: int = 49
    token_dim: int = 512
    embed_dim: int = 512
    text_token_dim: int = 512
    text_tokens: int = 32
    # model
    width: int = 256
    heads: int = 4
    layers: int = 2
    queries: int = 8
    frame_keep: int = 4  # M
    video_keep: int = 16  # Nv
    dropout: float = 0.1
    # differentiable selection (training only)
    perturb_samples: int = 32
    perturb_sigma: float = 0.05


# --------------------------------------------------------------------------- 1. top-k
class _PerturbedTopK(torch.autograd.Function):
    """E[one-hot top-k(x + σZ)] with the perturbed-optimizer gradient (Berthet et al. 2020)."""

    @staticmethod
    def forward(ctx, scores, k: int, samples: int, sigma: float):
        n, p = scores.shape  # (N, P)
        noise = torch.randn(n, samples, p, device=scores.device, dtype=scores.dtype)  # (N, S, P)
        perturbed = scores.unsqueeze(1) + sigma * noise
        indices = perturbed.topk(k, dim=-1).indices.sort(dim=-1).values  # (N, S, k), in token order
        one_hot = F.one_hot(indices, p).to(scores.dtype)  # (N, S, k, P)
        ctx.save_for_backward(noise, indices)
        ctx.sigma, ctx.p = sigma, p
        return one_hot.mean(dim=1)  # (N, k, P)

    @staticmethod
    def backward(ctx, grad):  # grad (N, k, P)
        noise, indices = ctx.saved_tensors
        # d/dx E[onehot] = E[onehot ⊗ Z] / σ; contract with grad without building (N, k, P, P)
        picked = torch.gather(grad.unsqueeze(1).expand(-1, indices.shape[1], -1, -1), 3,
                              indices.unsqueeze(-1)).squeeze(-1).sum(-1)  # (N, S)
        grad_scores = torch.einsum("ns,nsp->np", picked, noise) / (noise.shape[1] * ctx.sigma)
        return grad_scores, None, None, None


def top_k_weights(scores: torch.Tensor, k: int, *, training: bool, samples: int, sigma: float) -> torch.Tensor:
    """(N, P) scores → (N, k, P) selection weights: one-hot rows at inference, soft in training.

    Padded positions must carry -inf scores; they are never selected while k <= valid count.
    """
    if training:
        finite = torch.where(torch.isfinite(scores), scores, torch.full_like(scores, -1e4))
        return _PerturbedTopK.apply(finite, k, samples, sigma)
    indices = scores.topk(k, dim=-1).indices.sort(dim=-1).values  # (N, k)
    return F.one_hot(indices, scores.shape[-1]).to(scores.dtype)


def _scorer(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(2 * width, width // 2), nn.GELU(), nn.Linear(width // 2, 1))


def selection_weights(scorer: nn.Module, features: torch.Tensor, k: int, *, training: bool, samples: int,
                      sigma: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """features (N, P, 2d) → (N, k, P) float32 selection weights; scores and top-k always in float32.

    Under bf16 autocast the scores would carry ~3 significant digits and the sigma = 0.05
    perturbation of the perturbed top-k would round away, so autocast is off here.
    """
    with torch.autocast(device_type=features.device.type, enabled=False):
        scores = scorer(features.float()).squeeze(-1)  # (N, P)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return top_k_weights(scores, k, training=training, samples=samples, sigma=sigma)


# --------------------------------------------------------------------------- 2. frame selector
class FrameTokenSelector(nn.Module):
    """Keeps ``keep`` of a frame's ``tokens`` patch tokens; with nothing to choose (keep >= tokens) it has no
    scorer and passes every token through."""

    def __init__(self, *, width: int, keep: int, tokens: int, samples: int, sigma: float):
        super().__init__()
        self.keep, self.samples, self.sigma = keep, samples, sigma
        self.score = _scorer(width) if keep < tokens else None

    def forward(self, tokens: torch.Tensor, frame_global: torch.Tensor) -> torch.Tensor:
        # tokens (B, T, P, d), frame_global (B, T, d) → (B, T, 1 + M, d), the global token first
        b, t, p, d = tokens.shape
        if self.score is None or self.keep >= p:  # nothing to choose: keep every token
            return torch.cat([frame_global.unsqueeze(2), tokens], dim=2)
        context = frame_global.unsqueeze(2).expand(-1, -1, p, -1)
        features = torch.cat([tokens, context], dim=-1).reshape(b * t, p, 2 * d)
        weights = selection_weights(self.score, features, self.keep, training=self.training,
                                    samples=self.samples, sigma=self.sigma)  # (B·T, M, P) float32
        kept = torch.bmm(weights.to(tokens.dtype), tokens.reshape(b * t, p, d)).reshape(b, t, self.keep, d)
        return torch.cat([frame_global.unsqueeze(2), kept], dim=2)


# --------------------------------------------------------------------------- 3. video selector
class VideoTokenSelector(nn.Module):
    """Keeps ``keep`` of a clip's ``tokens`` frame-level tokens (no scorer when keep >= tokens)."""

    def __init__(self, *, width: int, keep: int, tokens: int, samples: int, sigma: float):
        super().__init__()
        self.keep, self.samples, self.sigma = keep, samples, sigma
        self.score = _scorer(width) if keep < tokens else None

    def forward(self, frame_tokens: torch.Tensor, frame_mask: torch.Tensor):
        # frame_tokens (B, T, K, d) with temporal embeddings, frame_mask (B, T) → (B, Nv, d), (B, Nv)
        b, t, k, d = frame_tokens.shape
        tokens = frame_tokens.reshape(b, t * k, d)
        mask = frame_mask.unsqueeze(-1).expand(-1, -1, k).reshape(b, t * k)
        if self.score is None or self.keep >= t * k:  # nothing to choose: keep every token, in order
            return tokens, mask
        keep = self.keep
        denominator = mask.sum(1, keepdim=True).clamp(min=1).unsqueeze(-1)
        clip = (tokens * mask.unsqueeze(-1)).sum(1, keepdim=True) / denominator  # (B, 1, d)
        features = torch.cat([tokens, clip.expand(-1, t * k, -1)], dim=-1)  # (B, T·K, 2d)
        weights = selection_weights(self.score, features, keep, training=self.training, samples=self.samples,
                                    sigma=self.sigma, mask=mask)  # (B, Nv, T·K) float32
        selected = torch.bmm(weights.to(tokens.dtype), tokens)  # (B, Nv, d)
        selected_mask = torch.bmm(weights, mask.unsqueeze(-1).to(weights.dtype)).squeeze(-1) > 0.5
        return selected, selected_mask


# --------------------------------------------------------------------------- 4. cross block
class CrossBlock(nn.Module):
    """Queries attend to visual tokens, then to each other, then an MLP (pre-norm, residual).

    The visual keys/values depend on the video only: ``keys_values`` runs once per video and
    the pairs gather them, so a video scored against many captions is projected once.
    """

    def __init__(self, *, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm_q, self.norm_kv = nn.LayerNorm(width), nn.LayerNorm(width)
        self.q_proj, self.kv_proj, self.out_proj = nn.Linear(width, width), nn.Linear(width, 2 * width), \
            nn.Linear(width, width)
        self.norm_self = nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(4 * width, width))

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # (N, L, d) → (N, h, L, d/h)
        n, length, d = x.shape
        return x.view(n, length, self.heads, d // self.heads).transpose(1, 2)

    def keys_values(self, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # visual (B, Lv, d) → keys, values (B, h, Lv, d/h)
        keys, values = self.kv_proj(self.norm_kv(visual)).chunk(2, dim=-1)
        return self._split(keys), self._split(values)

    def forward(self, queries, query_pad, keys, values, visual_pad, *, rows: int | None = None):
        # queries (C, Lq, d), query_pad (C, Lq) True = padding; keys/values (C, h, Lv, d/h), visual_pad (C, Lv)
        # → (C, Lq, d), or (C, rows, d): only the first ``rows`` outputs, when nothing reads the others
        # (every row is still a self-attention key; the self-attention queries and the MLP skip the rest)
        c, lq, d = queries.shape
        q = self._split(self.q_proj(self.norm_q(queries)))
        attended = F.scaled_dot_product_attention(q, keys, values, attn_mask=~visual_pad[:, None, None, :],
                                                  dropout_p=self.dropout if self.training else 0.0)
        queries = queries + self.out_proj(attended.transpose(1, 2).reshape(c, lq, d))
        x = self.norm_self(queries)
        if rows is not None:
            queries = queries[:, :rows]
        queries = queries + self.self_attn(x[:, : queries.shape[1]], x, x, key_padding_mask=query_pad,
                                           need_weights=False)[0]
        return queries + self.mlp(self.norm_mlp(queries))


def per_pair(x: torch.Tensor, pair_video: torch.Tensor | None) -> torch.Tensor:
    """(B, ...) per video → (C, ...) per pair; ``pair_video`` None: the pairs are the B videos in order."""
    return x if pair_video is None else x[pair_video]


def token_match(text, text_pad, visual, visual_pad, pair_video) -> torch.Tensor:
    """Mean over real caption tokens of their best cosine match among the pair's visual tokens.

    text (C, L, d), text_pad (C, L); visual (B, Lv, d), visual_pad (B, Lv); pair_video (C,) or None → (C,)
    """
    similarity = torch.einsum("cld,cvd->clv", F.normalize(text, dim=-1),
                              per_pair(F.normalize(visual, dim=-1), pair_video))  # (C, L, Lv)
    similarity = similarity.masked_fill(per_pair(visual_pad, pair_video)[:, None, :], -1.0)
    best = similarity.max(dim=-1).values.masked_fill(text_pad, 0.0)  # (C, L)
    return best.sum(-1) / (~text_pad).sum(-1).clamp(min=1)


# --------------------------------------------------------------------------- 5. the re-ranker
@dataclass
class SelectedVideos:
    """What the selectors keep of each video; depends on the video only (precomputable)."""

    frame_tokens: torch.Tensor  # (B, T·(1+M), d) frame-level tokens with temporal embeddings
    frame_pad: torch.Tensor  # (B, T·(1+M)) True where the frame is padding
    video_tokens: torch.Tensor  # (B, Nv, d)
    video_pad: torch.Tensor  # (B, Nv)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(field.name for field in dataclasses.fields(cls))

    def fields(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, name) for name in self.names())

    @classmethod
    def concatenate(cls, parts: "list[SelectedVideos]") -> "SelectedVideos":
        return cls(*(torch.cat(field) for field in zip(*(part.fields() for part in parts))))

    def to(self, device) -> "SelectedVideos":
        return SelectedVideos(*(t.to(device) for t in self.fields()))


class Reranker(nn.Module):
    def __init__(self, *, config: RerankerConfig):
        super().__init__()
        c = self.config = config
        self.token_in = nn.Sequential(nn.LayerNorm(c.token_dim), nn.Linear(c.token_dim, c.width))
        self.global_in = nn.Sequential(nn.LayerNorm(c.embed_dim), nn.Linear(c.embed_dim, c.width))
        self.text_in = nn.Sequential(nn.LayerNorm(c.text_token_dim), nn.Linear(c.text_token_dim, c.width))
        if c.text_token_dim == c.token_dim:  # one space (the joint CLIP space): start with one projection
            self.text_in.load_state_dict(self.token_in.state_dict())
        self.text_position = nn.Parameter(torch.zeros(c.text_tokens, c.width))
        self.frame_selector = FrameTokenSelector(width=c.width, keep=c.frame_keep, tokens=c.tokens_per_frame,
                                                 samples=c.perturb_samples, sigma=c.perturb_sigma)
        frame_level = c.frames * (1 + min(c.frame_keep, c.tokens_per_frame))  # the video selector's input
        self.temporal = nn.Parameter(torch.zeros(c.frames, c.width))  # frame position in the clip
        self.video_selector = VideoTokenSelector(width=c.width, keep=c.video_keep, tokens=frame_level,
                                                 samples=c.perturb_samples, sigma=c.perturb_sigma)
        self.queries = nn.Parameter(torch.zeros(c.queries, c.width))
        self.blocks = nn.ModuleList(CrossBlock(width=c.width, heads=c.heads, dropout=c.dropout)
                                    for _ in range(c.layers))
        self.head = nn.Sequential(nn.LayerNorm(c.width), nn.Linear(c.width, c.width), nn.GELU(),
                                  nn.Linear(c.width, 1))
        self.token_match_scale = nn.Parameter(torch.tensor(5.0))
        nn.init.normal_(self.queries, std=0.02)
        nn.init.normal_(self.temporal, std=0.02)
        nn.init.normal_(self.text_position, std=0.02)

    def select(self, tokens: torch.Tensor, frame_emb: torch.Tensor, frame_mask: torch.Tensor) -> SelectedVideos:
        # tokens (B, T, P, D), frame_emb (B, T, E), frame_mask (B, T) bool
        frame_global = self.global_in(frame_emb)  # (B, T, d)
        patch = self.token_in(tokens)  # (B, T, P, d)
        frame_level = self.frame_selector(patch, frame_global)  # (B, T, 1+M, d)
        frame_level = frame_level + self.temporal[: frame_level.shape[1], None, :]
        video_tokens, video_mask = self.video_selector(frame_level, frame_mask)
        b, t, k, d = frame_level.shape
        frame_pad = ~frame_mask.unsqueeze(-1).expand(-1, -1, k).reshape(b, t * k)
        return SelectedVideos(frame_level.reshape(b, t * k, d), frame_pad, video_tokens, ~video_mask)

    def score(self, text_tokens: torch.Tensor, text_length: torch.Tensor, videos: SelectedVideos,
              pair_video: torch.Tensor | None, *, pair_text: torch.Tensor | None = None) -> torch.Tensor:
        # text_tokens (U, L, Dt), text_length (U,); videos: B selected videos; pair_video (C,) into the B
        # videos (None: C = B, pair i is video i), pair_text (C,) into the U captions (None: U = C) → scores (C,)
        length = int(text_length.max())  # drop padding columns the whole batch shares
        text = self.text_in(text_tokens[:, :length]) + self.text_position[:length]  # (U, L, d), once per caption
        text_pad = torch.arange(length, device=text.device)[None, :] >= text_length[:, None]  # (U, L)
        if pair_text is not None:
            text, text_pad = text[pair_text], text_pad[pair_text]  # (C, L, d), (C, L)
        c = text.shape[0]
        queries = torch.cat([self.queries.expand(c, -1, -1), text], dim=1)  # (C, Q+L, d)
        query_pad = torch.cat([torch.zeros(c, self.config.queries, dtype=torch.bool, device=text.device),
                               text_pad], dim=1)
        frame_pad, video_pad = per_pair(videos.frame_pad, pair_video), per_pair(videos.video_pad, pair_video)
        levels = ((videos.frame_tokens, frame_pad), (videos.video_tokens, video_pad))
        for i, block in enumerate(self.blocks):  # hierarchical: frame level, then video level, same weights
            for j, (tokens, pad) in enumerate(levels):
                keys, values = block.keys_values(tokens)  # once per video
                last = i == len(self.blocks) - 1 and j == len(levels) - 1  # only the learnable queries are read
                queries = block(queries, query_pad, per_pair(keys, pair_video), per_pair(values, pair_video), pad,
                                rows=self.config.queries if last else None)
        pooled = queries[:, : self.config.queries].mean(dim=1)  # (C, d)
        matching = token_match(text, text_pad, videos.frame_tokens, videos.frame_pad, pair_video)
        return self.head(pooled).squeeze(-1) + self.token_match_scale * matching

    def forward(self, text_tokens, text_length, tokens, frame_emb, frame_mask, pair_video, pair_text=None):
        # pair_video (C,) into the B videos, pair_text (C,) into the captions (see score) → scores (C,)
        return self.score(text_tokens, text_length, self.select(tokens, frame_emb, frame_mask), pair_video,
                          pair_text=pair_text)
