"""The re-ranker: token selectors + multi-grained cross attention (docs/design.md, "The re-ranker").

Read top to bottom:

1. ``perturbed_top_k``: differentiable top-k (perturbed maximum, as in TS2-Net) for training;
   hard top-k at inference (or soft, to measure the gap).
2. ``FrameTokenSelector``: per frame, keep the frame's global token + the M patch tokens an MLP
   scores highest (tanh-bounded) given the token and the frame's global embedding.
3. ``VideoTokenSelector``: across the clip, keep the N_v most salient frame-level tokens.
4. ``CrossBlock``: queries attend to visual tokens, then to each other, then an MLP; and
   ``CrossBlock.per_frame``, the same weights used frame by frame.
5. ``Reranker``: the queries are N_Q learnable tokens + the caption's tokens.
   - Frame level: per frame t, the caption-conditioned learnable queries attend to frame t's
     kept tokens; the frame's result X(t) is the mean of their outputs (spatial detail).
   - Video level: the queries attend to the video-level tokens *and* X(1..T) (the hierarchy:
     frame results feed the video level; order and motion). Both levels use the same block
     (weight sharing) unless the config says otherwise.
   - A head turns the mean of the learnable queries' outputs into one score per pair.
   The config's switches (``frame_level``, ``video_level``, ``combine``, ``share_weights``,
   ``frame_tokens``, ``video_selector``) turn each part off for the ablation table in
   docs/ablation.md; ``combine = "sum"`` adds a frame-level and a video-level score instead of
   feeding one into the other. Variants that are not the method (``combine = "joint"``, the earlier
   design, and the word-to-patch term ``token_match``) live beside it in ``variants.py``.

The selectors depend on the video only: ``select(...)`` runs once per video (and can be
precomputed for a gallery); ``score(...)`` pairs captions with selected videos by index.

Shapes: B videos, T frames, P patch tokens, D token width, E embedding width, L caption tokens,
Dt caption token width, d model width, F tokens kept per frame (1 + M, 1 + P or 1), Nv
video-level tokens, Q learnable queries, U captions, C (caption, video) pairs, h heads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from tvrerank.config import check_fields
from tvrerank.errors import InputError

COMBINE = ("hierarchical", "sum", "joint")
#: the softmax temperature of the frame scorer's tanh-bounded scores in ``Reranker.selector_distillation``
DISTILL_TEMPERATURE = 0.1
FRAME_TOKENS = ("top_m", "all", "global", "random")
SELECTIONS = ("perturbed", "straight_through")


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
    layers: int = 2  # video-level blocks (the frame level is one block, applied per frame)
    queries: int = 8  # N_Q
    frame_keep: int = 4  # M
    video_keep: int = 16  # Nv
    dropout: float = 0.1
    # parts (each can be switched off for the ablation table)
    frame_level: bool = True  # per-frame cross attention
    video_level: bool = True  # attention over the video-level tokens
    combine: str = "hierarchical"  # hierarchical | sum | joint
    share_weights: bool = True  # the frame level uses the first video-level block's weights
    # per frame: global + top-M patches | global + all patches | global only | global + M patches drawn at
    # random (what the frame selector must beat)
    frame_tokens: str = "top_m"
    video_selector: bool = True  # False: the video level sees every frame-level token
    token_match: bool = False  # word-to-patch similarity term (not in the method), with a learned scale
    token_match_init: float = 0.0  # its scale at initialisation (0: it cannot dominate the attention path)
    # differentiable selection (training only)
    perturb_samples: int = 128
    perturb_sigma: float = 0.05
    # True: the frame scorer's score adds each patch's temporal novelty (``temporal_novelty``: how far its
    # cached token is from the same patch's median over the clip, standardised per frame) times a learned
    # gain that starts at 1 (beyond the paper: change saliency, text-agnostic, so still precomputable)
    novelty_prior: bool = False
    # True: sigma is a fraction of each row's score spread (the std of its scores, not differentiated), so the
    # perturbation means the same early in training, when the scorer's outputs are all near 0, as later
    perturb_sigma_relative: bool = False
    # perturbed: training sees the perturbed mean of the top-k (blended tokens, TS2-Net);
    # straight_through: training sees the hard top-k too, with the perturbed gradient
    selection: str = "perturbed"

    def __post_init__(self):
        positive = ("frames", "tokens_per_frame", "token_dim", "embed_dim", "text_token_dim", "text_tokens",
                    "width", "heads", "layers", "queries", "frame_keep", "video_keep", "perturb_samples")
        check_fields(self, "model", integers=dict.fromkeys(positive, 1))
        if self.width % self.heads:
            raise InputError(f"model option 'width' ({self.width}) must be a multiple of 'heads' ({self.heads})")
        check_fields(self, "model",
                     numbers={"dropout": (0.0, 0.9), "perturb_sigma": (1e-6, 10.0), "token_match_init": (-100, 100)},
                     flags=("frame_level", "video_level", "share_weights", "video_selector", "token_match",
                            "perturb_sigma_relative", "novelty_prior"),
                     choices={"combine": COMBINE, "selection": SELECTIONS, "frame_tokens": FRAME_TOKENS})
        if not (self.frame_level or self.video_level):
            raise InputError("model options 'frame_level' and 'video_level' cannot both be false")

    @property
    def kept_per_frame(self) -> int:
        """F: tokens per frame after the frame selector, the frame's global token first."""
        kept = min(self.frame_keep, self.tokens_per_frame)
        return {"top_m": 1 + kept, "random": 1 + kept, "all": 1 + self.tokens_per_frame, "global": 1}[self.frame_tokens]


# --------------------------------------------------------------------------- 1. top-k
class _PerturbedTopK(torch.autograd.Function):
    """E[one-hot top-k(x + σZ)] with the perturbed-optimizer gradient (Berthet et al. 2020)."""

    @staticmethod
    def forward(ctx, scores, k: int, samples: int, sigma):
        n, p = scores.shape  # (N, P); sigma a float or (N, 1), one per row
        sigma = sigma.unsqueeze(1) if torch.is_tensor(sigma) else sigma  # (N, 1, 1)
        noise = torch.randn(n, samples, p, device=scores.device, dtype=scores.dtype)  # (N, S, P)
        perturbed = scores.unsqueeze(1) + sigma * noise
        indices = perturbed.topk(k, dim=-1).indices.sort(dim=-1).values  # (N, S, k), in token order
        # the mean one-hot over samples, counted without building (N, S, k, P)
        slots = indices.transpose(1, 2)  # (N, k, S)
        weights = torch.zeros(n, k, p, device=scores.device, dtype=scores.dtype)
        weights.scatter_add_(2, slots, torch.full(slots.shape, 1.0 / samples, device=scores.device,
                                                  dtype=scores.dtype))
        ctx.save_for_backward(noise, indices)
        ctx.sigma = sigma
        return weights  # (N, k, P)

    @staticmethod
    def backward(ctx, grad):  # grad (N, k, P)
        noise, indices = ctx.saved_tensors
        # d/dx E[onehot] = E[onehot ⊗ Z] / σ; contract with grad without building (N, k, P, P)
        picked = torch.gather(grad.unsqueeze(1).expand(-1, indices.shape[1], -1, -1), 3,
                              indices.unsqueeze(-1)).squeeze(-1).sum(-1)  # (N, S)
        sigma = ctx.sigma.squeeze(1) if torch.is_tensor(ctx.sigma) else ctx.sigma  # (N, 1) or a float
        grad_scores = torch.einsum("ns,nsp->np", picked, noise) / (noise.shape[1] * sigma)
        return grad_scores, None, None, None


def top_k_weights(scores: torch.Tensor, k: int, *, soft: bool, samples: int, sigma: float,
                  straight_through: bool = False, relative: bool = False) -> torch.Tensor:
    """(N, P) scores → (N, k, P) selection weights: one-hot rows (hard), or the perturbed mean (soft);
    ``straight_through`` (with soft): the hard one-hot forward, the perturbed mean's gradient;
    ``relative``: the noise is ``sigma`` times each row's score std (over its real positions; not differentiated).

    Padded positions must carry -inf scores; they are never selected while k <= valid count.
    """
    if not soft:
        return _hard_top_k(scores, k)
    real = torch.isfinite(scores)
    finite = torch.where(real, scores, torch.full_like(scores, -1e4))
    if relative:
        sigma = sigma * row_spread(scores.detach(), real)  # (N, 1)
    perturbed = _PerturbedTopK.apply(finite, k, samples, sigma)
    return _hard_top_k(scores, k) + perturbed - perturbed.detach() if straight_through else perturbed


def row_spread(scores: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """(N, P) scores, (N, P) bool real positions → (N, 1) the std of each row's real scores (at least 1e-6)."""
    count = real.sum(-1, keepdim=True).clamp(min=1)
    zeroed = torch.where(real, scores, torch.zeros_like(scores))
    mean = zeroed.sum(-1, keepdim=True) / count
    variance = (torch.where(real, scores - mean, torch.zeros_like(scores)) ** 2).sum(-1, keepdim=True) / count
    return variance.sqrt().clamp(min=1e-6)


def top_k_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(N, P) → (N, k) positions of the k highest scores, in token order (what hard selection keeps)."""
    return scores.topk(k, dim=-1).indices.sort(dim=-1).values


def _hard_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(N, P) → (N, k, P) one-hot rows of the k highest scores, in token order."""
    return F.one_hot(top_k_indices(scores, k), scores.shape[-1]).to(scores.dtype)


def _scorer(width: int) -> nn.Module:
    """Token saliency in [-1, 1] (tanh, as TS2-Net), so the perturbation sigma keeps its meaning."""
    return nn.Sequential(nn.Linear(2 * width, width // 2), nn.GELU(), nn.Linear(width // 2, 1), nn.Tanh())


def saliency(scorer: nn.Module, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """features (N, P, 2d) → (N, P) float32 scores, -inf where ``mask`` (N, P) is False.

    Always float32: under bf16 autocast the scores would carry ~3 significant digits and the
    sigma = 0.05 perturbation of the perturbed top-k would round away, so autocast is off here.
    """
    with torch.autocast(device_type=features.device.type, enabled=False):
        scores = scorer(features.float()).squeeze(-1)  # (N, P)
        return scores if mask is None else scores.masked_fill(~mask, float("-inf"))


@dataclass(frozen=True)
class Perturbation:
    """How a selector's top-k is made differentiable while training (the config's ``perturb_*`` and
    ``selection`` fields)."""

    samples: int = 128
    sigma: float = 0.05
    straight_through: bool = False
    relative: bool = False  # sigma times each row's score std

    @classmethod
    def of(cls, config: "RerankerConfig") -> "Perturbation":
        return cls(samples=config.perturb_samples, sigma=config.perturb_sigma,
                   straight_through=config.selection == "straight_through", relative=config.perturb_sigma_relative)


def selection_weights(scores: torch.Tensor, k: int, *, soft: bool, how: Perturbation) -> torch.Tensor:
    """(N, P) float32 scores → (N, k, P) float32 selection weights (the top-k in float32, outside autocast)."""
    with torch.autocast(device_type=scores.device.type, enabled=False):
        return top_k_weights(scores, k, soft=soft, samples=how.samples, sigma=how.sigma,
                             straight_through=how.straight_through, relative=how.relative)


def temporal_novelty(tokens: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
    """How much each patch differs from the same patch elsewhere in the clip: tokens (B, T, P, D), frame_mask
    (B, T) bool → (B, T, P) float32, the distance of each token from its patch's median over the real frames,
    standardised over each frame's patches (0 on padded frames). A patch that shows something only some
    frames show (a glyph that flashes, an object that appears or moves) scores high, a static background low."""
    tokens = tokens.float()
    real = frame_mask[:, :, None, None]
    median = torch.where(real, tokens, torch.full_like(tokens, float("nan"))).nanmedian(dim=1, keepdim=True).values
    distance = (tokens - median.nan_to_num(0.0)).norm(dim=-1)  # (B, T, P)
    standard = (distance - distance.mean(-1, keepdim=True)) / distance.std(-1, keepdim=True).clamp(min=1e-6)
    return torch.where(frame_mask[:, :, None], standard, torch.zeros_like(standard))


# --------------------------------------------------------------------------- 2. frame selector
class FrameTokenSelector(nn.Module):
    """Keeps the frame's global token and ``keep`` of its ``tokens`` patch tokens: keep = 0 keeps the
    global token only; with nothing to choose (keep >= tokens) it has no scorer and keeps every token.

    ``random``: no scorer; the kept patches are drawn at random per frame, afresh at every training step
    and from a fixed seed when evaluating (the same draw for the same batch shape): the baseline a
    learned selector must beat.

    ``reads_all`` (not a parameter; the trainer's ``selector_warmup`` sets it for its first steps): keep
    every patch, so the attention reads them all while the scorer is distilled toward it.

    ``prior`` (B, T, P) (``novelty_prior``: ``temporal_novelty``) is added to the scorer's scores times the
    learned ``prior_gain``."""

    def __init__(self, *, width: int, keep: int, tokens: int, how: Perturbation = Perturbation(),
                 random: bool = False, prior: bool = False):
        super().__init__()
        self.keep, self.how = keep, how
        self.random = random and 0 < keep < tokens
        self.score = _scorer(width) if 0 < keep < tokens and not random else None
        self.reads_all = False
        self.prior_gain = nn.Parameter(torch.ones(())) if prior and self.score is not None else None

    def random_scores(self, b: int, t: int, p: int, device) -> torch.Tensor:
        """(B·T, P) uniform scores whose top ``keep`` are the random draw."""
        generator = None if self.training else torch.Generator().manual_seed(0)
        return torch.rand(b * t, p, generator=generator).to(device)

    def forward(self, tokens: torch.Tensor, frame_global: torch.Tensor, *, soft: bool,
                prior: torch.Tensor | None = None) -> torch.Tensor:
        # tokens (B, T, P, d), frame_global (B, T, d), prior (B, T, P) or None → (B, T, F, d), the global token first
        b, t, p, d = tokens.shape
        if self.keep == 0:
            return frame_global.unsqueeze(2)
        if self.random:
            weights = _hard_top_k(self.random_scores(b, t, p, tokens.device), self.keep)  # (B·T, M, P)
        elif self.score is None or self.reads_all:  # nothing to choose (or the warm-up): keep every token
            return torch.cat([frame_global.unsqueeze(2), tokens], dim=2)
        else:
            weights = selection_weights(self.saliency(tokens, frame_global, prior).flatten(0, 1), self.keep,
                                        soft=soft, how=self.how)  # (B·T, M, P) float32
        kept = torch.bmm(weights.to(tokens.dtype), tokens.reshape(b * t, p, d)).reshape(b, t, self.keep, d)
        return torch.cat([frame_global.unsqueeze(2), kept], dim=2)

    @staticmethod
    def features(tokens: torch.Tensor, frame_global: torch.Tensor) -> torch.Tensor:
        """What the scorer reads, each patch beside its frame's global token: → (B·T, P, 2d)."""
        b, t, p, d = tokens.shape
        context = frame_global.unsqueeze(2).expand(-1, -1, p, -1)
        return torch.cat([tokens, context], dim=-1).reshape(b * t, p, 2 * d)

    def saliency(self, tokens: torch.Tensor, frame_global: torch.Tensor,
                 prior: torch.Tensor | None = None) -> torch.Tensor:
        """The score of every patch: (B, T, P, d), (B, T, d), prior (B, T, P) or None → (B, T, P) float32."""
        scores = saliency(self.score, self.features(tokens, frame_global)).view(tokens.shape[:3])
        if self.prior_gain is not None and prior is not None:
            scores = scores + self.prior_gain * prior.float()
        return scores

    def kept_patches(self, tokens: torch.Tensor, frame_global: torch.Tensor,
                     prior: torch.Tensor | None = None) -> torch.Tensor:
        """The patches hard selection keeps: (B, T, P, d), (B, T, d), prior → (B, T, M) patch indices, in order."""
        b, t, p, _ = tokens.shape
        if self.keep == 0:
            return torch.zeros(b, t, 0, dtype=torch.long, device=tokens.device)
        if self.random:
            return top_k_indices(self.random_scores(b, t, p, tokens.device), self.keep).reshape(b, t, -1)
        if self.score is None:
            return torch.arange(p, device=tokens.device).expand(b, t, p)
        return top_k_indices(self.saliency(tokens, frame_global, prior).flatten(0, 1), self.keep).reshape(b, t, -1)


# --------------------------------------------------------------------------- 3. video selector
class VideoTokenSelector(nn.Module):
    """Keeps ``keep`` of a clip's ``tokens`` frame-level tokens (no scorer when keep >= tokens)."""

    def __init__(self, *, width: int, keep: int, tokens: int, how: Perturbation = Perturbation()):
        super().__init__()
        self.keep, self.how = keep, how
        self.score = _scorer(width) if keep < tokens else None

    def forward(self, frame_tokens: torch.Tensor, frame_mask: torch.Tensor, *, soft: bool):
        # frame_tokens (B, T, F, d) with temporal embeddings, frame_mask (B, T) → (B, Nv, d), (B, Nv)
        tokens, mask = self.flatten(frame_tokens, frame_mask)
        if not self.chooses(tokens.shape[1]):  # nothing to choose: keep every token, in order
            return tokens, mask
        weights = selection_weights(saliency(self.score, self.features(tokens, mask), mask), self.keep, soft=soft,
                                    how=self.how)  # (B, Nv, T·F) float32
        selected = torch.bmm(weights.to(tokens.dtype), tokens)  # (B, Nv, d)
        selected_mask = torch.bmm(weights, mask.unsqueeze(-1).to(weights.dtype)).squeeze(-1) > 0.5
        return selected, selected_mask

    def chooses(self, tokens: int) -> bool:
        return self.score is not None and self.keep < tokens

    @staticmethod
    def flatten(frame_tokens: torch.Tensor, frame_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, F, d), (B, T) → the clip's tokens in one row (B, T·F, d) and their mask (B, T·F)."""
        b, t, k, d = frame_tokens.shape
        return frame_tokens.reshape(b, t * k, d), frame_mask.unsqueeze(-1).expand(-1, -1, k).reshape(b, t * k)

    @staticmethod
    def features(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Each token beside the mean of the clip's real tokens: (B, L, d), (B, L) → (B, L, 2d)."""
        denominator = mask.sum(1, keepdim=True).clamp(min=1).unsqueeze(-1)
        clip = (tokens * mask.unsqueeze(-1)).sum(1, keepdim=True) / denominator  # (B, 1, d)
        return torch.cat([tokens, clip.expand(-1, tokens.shape[1], -1)], dim=-1)

    def picks(self, frame_tokens: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """What hard selection keeps: (B, T, F, d), (B, T) → (B, Nv) indices into the T·F tokens, in order."""
        tokens, mask = self.flatten(frame_tokens, frame_mask)
        if not self.chooses(tokens.shape[1]):
            return torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
        return top_k_indices(saliency(self.score, self.features(tokens, mask), mask), self.keep)


# --------------------------------------------------------------------------- 4. cross block
def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., L, d) → (..., h, L, d/h)."""
    return x.unflatten(-1, (heads, x.shape[-1] // heads)).transpose(-3, -2)


class SelfAttention(nn.Module):
    """Multi-head attention of a sequence's first rows over all of its rows (the queries' self-attention).

    Its parameters have ``nn.MultiheadAttention``'s names, layout and initialisation (``in_proj_weight``
    (3d, d) = q, k, v stacked; ``out_proj``), so checkpoints load either way; it computes only the
    queries that are read and goes straight to the fused kernel: 21 operator calls where
    MultiheadAttention makes 35 (a query's re-rank is bound by such calls on a GPU).
    """

    def __init__(self, *, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)  # made first, as MultiheadAttention does: same random draws
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, pad: torch.Tensor, *, rows: int) -> torch.Tensor:
        # x (C, L, d), pad (C, L) True = padding → (C, rows, d): rows 0..rows-1 attend to every real row
        c, _, d = x.shape
        q = F.linear(x[:, :rows], self.in_proj_weight[:d], self.in_proj_bias[:d])
        keys, values = F.linear(x, self.in_proj_weight[d:], self.in_proj_bias[d:]).chunk(2, dim=-1)
        split = [split_heads(t, self.heads) for t in (q, keys, values)]
        attended = F.scaled_dot_product_attention(*split, attn_mask=~pad[:, None, None, :],
                                                  dropout_p=self.dropout if self.training else 0.0)  # (C, h, rows, d/h)
        return self.out_proj(attended.transpose(1, 2).reshape(c, rows, d))


class CrossBlock(nn.Module):
    """Queries attend to visual tokens, then to each other, then an MLP (pre-norm, residual).

    The visual keys/values depend on the video only: ``keys_values`` runs once per video and
    the pairs gather them, so a video scored against many captions is projected once.
    ``condition`` + ``per_frame`` are the frame level with the same weights.
    """

    def __init__(self, *, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm_q, self.norm_kv = nn.LayerNorm(width), nn.LayerNorm(width)
        self.q_proj, self.kv_proj, self.out_proj = nn.Linear(width, width), nn.Linear(width, 2 * width), \
            nn.Linear(width, width)
        self.norm_self = nn.LayerNorm(width)
        self.self_attn = SelfAttention(width=width, heads=heads, dropout=dropout)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(4 * width, width))

    def keys_values(self, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # visual (..., Lv, d) → keys, values (..., h, Lv, d/h)
        keys, values = self.kv_proj(self.norm_kv(visual)).chunk(2, dim=-1)
        return split_heads(keys, self.heads), split_heads(values, self.heads)

    def attention(self, queries: torch.Tensor, keys: torch.Tensor, visual_pad: torch.Tensor) -> torch.Tensor:
        """The cross-attention weights ``forward`` applies (for the explain view; forward uses the fused
        kernel): queries (C, Lq, d), keys (C, h, Lv, d/h), visual_pad (C, Lv) → (C, h, Lq, Lv)."""
        q = split_heads(self.q_proj(self.norm_q(queries)), self.heads)  # (C, h, Lq, d/h)
        logits = (q @ keys.transpose(-1, -2)) * q.shape[-1] ** -0.5
        return logits.masked_fill(visual_pad[:, None, None, :], float("-inf")).softmax(dim=-1)

    def forward(self, queries, query_pad, keys, values, visual_pad, *, rows: int | None = None):
        # queries (C, Lq, d), query_pad (C, Lq) True = padding; keys/values (C, h, Lv, d/h), visual_pad (C, Lv)
        # → (C, Lq, d), or (C, rows, d): only the first ``rows`` outputs, when nothing reads the others
        # (every row is still a self-attention key; the self-attention queries and the MLP skip the rest)
        c, lq, d = queries.shape
        q = split_heads(self.q_proj(self.norm_q(queries)), self.heads)
        attended = F.scaled_dot_product_attention(q, keys, values, attn_mask=~visual_pad[:, None, None, :],
                                                  dropout_p=self.dropout if self.training else 0.0)
        queries = queries + self.out_proj(attended.transpose(1, 2).reshape(c, lq, d))
        rows = lq if rows is None else rows
        queries = queries[:, :rows] + self.self_attn(self.norm_self(queries), query_pad, rows=rows)
        return queries + self.mlp(self.norm_mlp(queries))

    def condition(self, queries: torch.Tensor, query_pad: torch.Tensor, *, rows: int) -> torch.Tensor:
        """The first ``rows`` queries (the learnable ones) read the caption: (U, Q+L, d) → (U, Q, d).

        Depends on the caption only, so it runs once per caption, not once per (pair, frame).
        """
        return queries[:, :rows] + self.self_attn(self.norm_self(queries), query_pad, rows=rows)

    def per_frame(self, conditioned: torch.Tensor, frame_keys: torch.Tensor, frame_values: torch.Tensor):
        """Each frame on its own: the conditioned queries attend to that frame's tokens; the frame's
        result is the mean of their outputs (then the MLP).

        conditioned (C, Q, d); frame_keys/values (C, T, h, F, d/h) → results (C, T, d) and the
        attention weights (C, T, h, Q, F) (what the explain view draws).
        """
        c, _, d = conditioned.shape
        q = split_heads(self.q_proj(self.norm_q(conditioned)), self.heads)  # (C, h, Q, d/h)
        logits = torch.einsum("chqe,cthfe->cthqf", q, frame_keys) * q.shape[-1] ** -0.5
        attention = logits.softmax(dim=-1)  # (C, T, h, Q, F)
        weights = F.dropout(attention, self.dropout, self.training)
        attended = torch.einsum("cthqf,cthfe->cthqe", weights, frame_values).mean(dim=3)  # (C, T, h, d/h)
        # mean over the queries of (query + out_proj(attended)) = mean query + out_proj(mean attended)
        results = conditioned.mean(dim=1, keepdim=True) + self.out_proj(attended.flatten(2))  # (C, T, d)
        return results + self.mlp(self.norm_mlp(results)), attention


def per_pair(x: torch.Tensor, pair_video: torch.Tensor | None) -> torch.Tensor:
    """(B, ...) per video → (C, ...) per pair; ``pair_video`` None: the pairs are the B videos in order."""
    return x if pair_video is None else x[pair_video]


def masked_mean(x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """x (C, L, d), pad (C, L) True = padding → (C, d), the mean over the real rows."""
    keep = (~pad).unsqueeze(-1).to(x.dtype)
    return (x * keep).sum(1) / keep.sum(1).clamp(min=1)


# --------------------------------------------------------------------------- 5. the re-ranker
@dataclass
class SelectedVideos:
    """What the selectors keep of each video; depends on the video only (precomputable)."""

    frame_tokens: torch.Tensor  # (B, T, F, d) kept tokens per frame, with temporal embeddings
    frame_pad: torch.Tensor  # (B, T) True where the frame is padding
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

    def flat_frame_tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All frames' tokens in one row: (B, T·F, d) and its padding (B, T·F)."""
        b, t, f, d = self.frame_tokens.shape
        return self.frame_tokens.reshape(b, t * f, d), self.frame_pad.unsqueeze(-1).expand(-1, -1, f).reshape(b, t * f)


class Reranker(nn.Module):
    """The method. Variants that are not the method (``combine = "joint"``, the word-to-patch term) are
    ``rerank.variants.VariantReranker``; ``rerank.variants.build_reranker(config)`` builds either."""

    #: the config switches a subclass handles beyond the method (see rerank/variants.py)
    variants: tuple[str, ...] = ()

    def __init__(self, *, config: RerankerConfig):
        super().__init__()
        c = self.config = config
        asked = tuple(name for name, on in (("joint", c.combine == "joint"), ("token_match", c.token_match)) if on)
        if set(asked) - set(self.variants):
            raise InputError(f"model options {list(asked)} are variants beside the method: build the model with "
                             "tvrerank.rerank.variants.build_reranker(config)")
        # patch tokens are not read at all when each frame keeps its global token only
        self.token_in = nn.Sequential(nn.LayerNorm(c.token_dim), nn.Linear(c.token_dim, c.width)) \
            if c.frame_tokens != "global" else None
        self.global_in = nn.Sequential(nn.LayerNorm(c.embed_dim), nn.Linear(c.embed_dim, c.width))
        self.text_in = nn.Sequential(nn.LayerNorm(c.text_token_dim), nn.Linear(c.text_token_dim, c.width))
        if c.text_token_dim == c.token_dim and self.token_in is not None:  # one space (the joint CLIP space): start with one projection
            self.text_in.load_state_dict(self.token_in.state_dict())
        self.text_position = nn.Parameter(torch.zeros(c.text_tokens, c.width))
        keep = {"top_m": c.frame_keep, "random": c.frame_keep, "all": c.tokens_per_frame, "global": 0}[c.frame_tokens]
        self.frame_selector = FrameTokenSelector(width=c.width, keep=keep, tokens=c.tokens_per_frame,
                                                 how=Perturbation.of(c), random=c.frame_tokens == "random",
                                                 prior=c.novelty_prior)
        frame_level = c.frames * c.kept_per_frame  # the video selector's input
        self.temporal = nn.Parameter(torch.zeros(c.frames, c.width))  # frame position in the clip
        video_keep = c.video_keep if c.video_selector and c.video_level else frame_level  # frame_level: no scorer
        self.video_selector = VideoTokenSelector(width=c.width, keep=video_keep, tokens=frame_level,
                                                 how=Perturbation.of(c))
        self.queries = nn.Parameter(torch.zeros(c.queries, c.width))

        def blocks(n: int) -> nn.ModuleList:
            return nn.ModuleList(CrossBlock(width=c.width, heads=c.heads, dropout=c.dropout) for _ in range(n))

        self.blocks = blocks(c.layers if c.video_level else 0)  # the video level
        # the frame level: the video level's blocks when shared, else its own
        own = c.frame_level and not (c.share_weights and c.video_level)
        self.frame_blocks = blocks(self.frame_block_count()) if own else None
        self.head = nn.Sequential(nn.LayerNorm(c.width), nn.Linear(c.width, c.width), nn.GELU(),
                                  nn.Linear(c.width, 1))
        nn.init.normal_(self.queries, std=0.02)
        nn.init.normal_(self.temporal, std=0.02)
        nn.init.normal_(self.text_position, std=0.02)

    def frame_block_count(self) -> int:
        """Blocks of the frame level's own (unshared) weights: one, applied to each frame."""
        return 1

    def frame_block(self, layer: int = 0) -> CrossBlock:
        return (self.frame_blocks if self.frame_blocks is not None else self.blocks)[layer]

    def select(self, tokens: torch.Tensor, frame_emb: torch.Tensor, frame_mask: torch.Tensor, *,
               soft: bool | None = None) -> SelectedVideos:
        # tokens (B, T, P, D), frame_emb (B, T, E), frame_mask (B, T) bool; soft None: soft while training
        soft = self.training if soft is None else soft
        frame_global = self.global_in(frame_emb)  # (B, T, d)
        if self.token_in is None:  # the global token only
            frame_level = frame_global.unsqueeze(2)  # (B, T, 1, d)
        else:
            # the cache's float16 tokens become float32 here, on the model's device
            frame_level = self.frame_selector(self.token_in(tokens.float()), frame_global, soft=soft,
                                              prior=self.patch_prior(tokens, frame_mask))  # (B, T, F, d)
        frame_level = frame_level + self.temporal[: frame_level.shape[1], None, :]
        video_tokens, video_mask = self.video_selector(frame_level, frame_mask, soft=soft)
        return SelectedVideos(frame_level, ~frame_mask, video_tokens, ~video_mask)

    def patch_prior(self, tokens: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor | None:
        """The frame scorer's prior (B, T, P) from the cached tokens (B, T, P, D), or None without one."""
        if self.frame_selector.prior_gain is None:
            return None
        return temporal_novelty(tokens, frame_mask)

    def kept_patches(self, tokens: torch.Tensor, frame_emb: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """The patches hard selection keeps of each frame: tokens (B, T, P, D), frame_emb (B, T, E), frame_mask
        (B, T) → (B, T, M) patch indices in order (M = 0 for global tokens only)."""
        if self.token_in is None:
            return torch.zeros(tokens.shape[:2] + (0,), dtype=torch.long, device=tokens.device)
        return self.frame_selector.kept_patches(self.token_in(tokens.float()), self.global_in(frame_emb),
                                                self.patch_prior(tokens, frame_mask))

    def frame_results(self, queries, query_pad, videos: SelectedVideos, pair_video, pair_text):
        """The frame level: X(t) per pair and frame (C, T, d), and its attention (C, T, h, Q, F)."""
        block, q = self.frame_block(), self.config.queries
        conditioned = block.condition(queries, query_pad, rows=q)  # (U, Q, d), once per caption
        keys, values = block.keys_values(videos.frame_tokens)  # (B, T, h, F, d/h), once per video
        results, attention = block.per_frame(per_pair(conditioned, pair_text), per_pair(keys, pair_video),
                                             per_pair(values, pair_video))
        return results + self.temporal[: results.shape[1]], attention

    def score(self, text_tokens: torch.Tensor, text_length: torch.Tensor, videos: SelectedVideos,
              pair_video: torch.Tensor | None, *, pair_text: torch.Tensor | None = None,
              trace: dict | None = None, columns: int | None = None) -> torch.Tensor:
        # text_tokens (U, L, Dt), text_length (U,); videos: B selected videos; pair_video (C,) into the B
        # videos (None: C = B, pair i is video i), pair_text (C,) into the U captions (None: U = C) → scores (C,)
        # trace: a dict that receives the attention weights, "frame" (C, T, h, Q, F) and "video" (one
        # (C, h, Q+L, Lv) per video-level block), for rerank/explain.py
        # columns: the caption columns read (padding beyond text_length is masked, so any columns >= the
        # longest caption give the same scores); None: the longest caption's, found with one host sync
        text, text_pad = self.caption(text_tokens, text_length, columns)
        queries, query_pad = self.query_tokens(text, text_pad)
        return self._levels(queries, query_pad, videos, pair_video, pair_text, trace)

    def caption(self, text_tokens: torch.Tensor, text_length: torch.Tensor, columns: int | None):
        """The caption's tokens in the model's width, once per caption: (U, L, Dt), (U,) → (U, L, d), pad (U, L)."""
        length = int(text_length.max()) if columns is None else columns
        text = self.text_in(text_tokens[:, :length]) + self.text_position[:length]  # (U, L, d)
        return text, torch.arange(length, device=text.device)[None, :] >= text_length[:, None]

    def query_tokens(self, text: torch.Tensor, text_pad: torch.Tensor):
        """The queries: N_Q learnable tokens + the caption's tokens → (U, Q+L, d) and their padding (U, Q+L)."""
        u, q = text.shape[0], self.config.queries
        queries = torch.cat([self.queries.expand(u, -1, -1), text], dim=1)
        return queries, torch.cat([torch.zeros(u, q, dtype=torch.bool, device=text.device), text_pad], dim=1)

    def _levels(self, queries, query_pad, videos: SelectedVideos, pair_video, pair_text, trace=None) -> torch.Tensor:
        """Frame level → video level ("hierarchical"), or the two levels' scores added ("sum")."""
        c, q = self.config, self.config.queries
        frame_pad = per_pair(videos.frame_pad, pair_video)  # (C, T)
        frames = None
        if c.frame_level:
            frames, attention = self.frame_results(queries, query_pad, videos, pair_video, pair_text)  # (C, T, d)
            if trace is not None:
                trace["frame"] = attention
        score = 0.0
        if c.video_level:
            x, x_pad = per_pair(queries, pair_text), per_pair(query_pad, pair_text)  # (C, Q+L, d)
            video_pad = per_pair(videos.video_pad, pair_video)
            feed = frames is not None and c.combine == "hierarchical"
            pad = torch.cat([video_pad, frame_pad], dim=1) if feed else video_pad  # (C, Nv [+ T])
            for i, block in enumerate(self.blocks):
                keys, values = (per_pair(t, pair_video) for t in block.keys_values(videos.video_tokens))
                if feed:  # the frame results are keys too: per pair, so projected per pair
                    frame_keys, frame_values = block.keys_values(frames)
                    keys, values = torch.cat([keys, frame_keys], dim=2), torch.cat([values, frame_values], dim=2)
                if trace is not None:
                    trace.setdefault("video", []).append(block.attention(x, keys, pad))
                x = block(x, x_pad, keys, values, pad, rows=q if i == len(self.blocks) - 1 else None)
            score = self.head(x[:, :q].mean(dim=1)).squeeze(-1)
            if feed:
                return score
        if frames is not None:  # "sum", or the frame level alone
            score = score + self.head(masked_mean(frames, frame_pad)).squeeze(-1)
        return score

    def forward(self, text_tokens, text_length, tokens, frame_emb, frame_mask, pair_video, pair_text=None, *,
                distill_pairs: torch.Tensor | None = None):
        # pair_video (C,) into the B videos, pair_text (C,) into the captions (see score) → scores (C,);
        # distill_pairs (c,) into the C pairs (training): → scores and the frame selector's distillation loss on them
        scores = self.score(text_tokens, text_length, self.select(tokens, frame_emb, frame_mask), pair_video,
                            pair_text=pair_text)
        if distill_pairs is None:
            return scores
        pair_text = distill_pairs if pair_text is None else pair_text[distill_pairs]
        return scores, self.selector_distillation(text_tokens[pair_text], text_length[pair_text],
                                                  tokens[pair_video[distill_pairs]], frame_emb[pair_video[distill_pairs]],
                                                  frame_mask[pair_video[distill_pairs]])

    def patch_attention(self, text_tokens, text_length, patches: torch.Tensor, frame_global: torch.Tensor):
        """The frame level's attention over EVERY patch of each pair's video, whatever the selector keeps:
        text_tokens (C, L, Dt), text_length (C,), patches (C, T, P, d) and frame_global (C, T, d) in the
        model's width → (C, T, P), the mean over heads and learnable queries of the attention each frame's
        1 + P tokens would get, renormalised over the patches (what the frame selector is distilled toward)."""
        block, q = self.frame_block(), self.config.queries
        c, t, p, d = patches.shape
        text, text_pad = self.caption(text_tokens, text_length, None)
        conditioned = block.condition(*self.query_tokens(text, text_pad), rows=q)  # (C, Q, d)
        every = torch.cat([frame_global.unsqueeze(2), patches], dim=2) + self.temporal[:t, None, :]  # (C, T, 1+P, d)
        keys, _ = block.keys_values(every.flatten(0, 1))  # (C·T, h, 1+P, d/h)
        attention = block.attention(conditioned.repeat_interleave(t, dim=0), keys,
                                    torch.zeros(c * t, p + 1, dtype=torch.bool, device=patches.device))
        on_patches = attention.mean(dim=(1, 2))[:, 1:].view(c, t, p)  # (C, T, P)
        return on_patches / on_patches.sum(-1, keepdim=True).clamp(min=1e-12)

    def selector_distillation(self, text_tokens, text_length, tokens, frame_emb, frame_mask) -> torch.Tensor:
        """The frame selector scored against what the attention reads: per (caption, its video) pair and real
        frame, the cross-entropy of the softmax of the scorer's patch scores (temperature
        ``DISTILL_TEMPERATURE``) against ``patch_attention`` (not differentiated) → a scalar; 0 without a scorer.

        text_tokens (C, L, Dt), text_length (C,), tokens (C, T, P, D), frame_emb (C, T, E), frame_mask (C, T)."""
        if self.frame_selector.score is None:
            return tokens.new_zeros((), dtype=torch.float32)
        patches, frame_global = self.token_in(tokens.float()), self.global_in(frame_emb)
        scores = self.frame_selector.saliency(patches, frame_global, self.patch_prior(tokens, frame_mask))  # (C, T, P)
        with torch.no_grad():
            target = self.patch_attention(text_tokens, text_length, patches, frame_global).float()
        loss = -(target * F.log_softmax(scores / DISTILL_TEMPERATURE, dim=-1)).sum(-1)  # (C, T)
        real = frame_mask.to(loss.dtype)
        return (loss * real).sum() / real.sum().clamp(min=1)
