"""Fusion of the two stages' scores and the one ranking rule (pure numpy).

Every place that orders or ranks re-ranked candidates — ``eval --reranker``, training's
validation, the demo and ``retrieve`` — goes through this module, so evaluation equals serving.

**The ranking rule.** For one caption with top-K stage-1 candidates (a list, best first):

1. Inside the top K, candidates are ordered by the fused score, highest first. Equal fused
   scores keep stage-1 order: the higher stage-1 score first, then the earlier list position.
2. Beyond K, videos keep their stage-1 order, after every top-K candidate.
3. Ranking a known true video (evaluation), every tie counts against it: its rank is
   ``1 + #{other candidates with (fused, stage1) >= its (fused, stage1)}`` (compared as pairs,
   fused first). So a tie never lifts the true video above a candidate that stage 1 put first,
   and a constant re-ranker reproduces the stage-1 ranks exactly. Serving, which knows no true
   video, breaks the remaining exact ties by list position; the two agree whenever no two
   candidates tie on both scores.
4. A re-ranker score that is NaN or infinite is an error (:class:`NonFiniteScores`), never a 0.

**Fusion.** ``alpha * z(stage1) + (1 - alpha) * z(rerank)``, where ``z`` standardises each
row over its present candidates (zero mean, unit spread), so ``alpha`` is scale-free. A row
with no spread (a constant scorer) standardises to zeros, and rule 1 then falls back to stage 1.
:func:`plain_sum` is the untuned alternative (the raw sum of the two scores, the method's own
fusion); :func:`tune_alpha` picks ``alpha`` on a validation split. A run says which one it
uses (``fusion``: ``tuned`` or ``sum``) and :func:`fused_scores` applies it.

Shapes: M captions, K candidates; ``present`` (M, K) is False where a list is shorter than K
(approximate indexes, tiny galleries).
"""

from __future__ import annotations

import numpy as np

from tvrerank.errors import NonFiniteScores
from tvrerank.metrics import retrieval_metrics, selection_key

FUSIONS = ("tuned", "sum")
ALPHA_GRID = tuple(np.round(np.linspace(0, 1, 21), 2))
FLAT = 1e-6  # a row whose spread is below FLAT x its largest magnitude counts as constant


def check_finite(scores: np.ndarray, present: np.ndarray, what: str = "the re-ranker") -> None:
    """Raise NonFiniteScores when any present score is NaN or infinite."""
    bad = present & ~np.isfinite(scores)
    if bad.any():
        raise NonFiniteScores(
            f"{what} produced {int(bad.sum())} NaN/inf scores (first at caption {int(np.argwhere(bad)[0, 0])}); "
            "the model diverged or the checkpoint is damaged: retrain it (lower lr) or use another run")


def standardise(scores: np.ndarray, present: np.ndarray | None = None) -> np.ndarray:
    """(M, K) → per-row zero mean, unit standard deviation over the present entries (float64).

    A row with no spread (constant up to float rounding) becomes 0; absent entries become 0.
    """
    scores = np.asarray(scores, dtype=np.float64)
    present = np.ones(scores.shape, dtype=bool) if present is None else present
    count = np.maximum(present.sum(axis=1, keepdims=True), 1)
    values = np.where(present, scores, 0.0)
    mean = values.sum(axis=1, keepdims=True) / count
    centred = np.where(present, scores - mean, 0.0)
    spread = np.sqrt((centred**2).sum(axis=1, keepdims=True) / count)
    scale = np.abs(values).max(axis=1, keepdims=True)
    flat = spread <= FLAT * np.maximum(scale, 1e-30)
    return np.divide(centred, spread, out=np.zeros_like(centred), where=~flat)


def fuse(stage1: np.ndarray, rerank: np.ndarray, alpha: float, present: np.ndarray | None = None) -> np.ndarray:
    """(M, K), (M, K) → fused (M, K) float64; -inf where a candidate is absent."""
    present = np.ones(np.shape(stage1), dtype=bool) if present is None else present
    check_finite(rerank, present)
    fused = alpha * standardise(stage1, present) + (1 - alpha) * standardise(rerank, present)
    return np.where(present, fused, -np.inf)


def plain_sum(stage1: np.ndarray, rerank: np.ndarray, present: np.ndarray | None = None) -> np.ndarray:
    """The untuned fusion: stage-1 score + re-ranker score, (M, K) float64; -inf where absent."""
    present = np.ones(np.shape(stage1), dtype=bool) if present is None else present
    check_finite(rerank, present)
    return np.where(present, np.asarray(stage1, np.float64) + np.asarray(rerank, np.float64), -np.inf)


def fused_scores(stage1: np.ndarray, rerank: np.ndarray, *, fusion: str, alpha: float | None,
                 present: np.ndarray | None = None) -> np.ndarray:
    """A run's fusion: ``tuned`` (:func:`fuse` with ``alpha``) or ``sum`` (:func:`plain_sum`); (M, K) float64."""
    if fusion == "sum":
        return plain_sum(stage1, rerank, present)
    if fusion == "tuned":
        return fuse(stage1, rerank, alpha, present)
    raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")


def order_candidates(fused: np.ndarray, stage1: np.ndarray) -> np.ndarray:
    """Serving order (rules 1 and 3 without a true video): (M, K), (M, K) → (M, K) slot indices, best first."""
    slots = np.broadcast_to(np.arange(fused.shape[1]), fused.shape)
    return np.lexsort((slots, -np.asarray(stage1, np.float64), -np.asarray(fused, np.float64)), axis=-1)


def reranked_ranks(fused: np.ndarray, stage1: np.ndarray, candidate_video: np.ndarray, true_video: np.ndarray,
                   true_rank: np.ndarray) -> np.ndarray:
    """Ranks under the ranking rule: the top K re-ordered by ``fused``, beyond K the stage-1 rank stays.

    fused (M, K) (-inf where absent), stage1 (M, K) stage-1 scores, candidate_video (M, K) video rows
    (-1 absent), true_video (M,), true_rank (M,) stage-1 ranks (-1: not in the gallery, kept) → (M,) int64.
    """
    ranks = np.asarray(true_rank).astype(np.int64).copy()
    hit = candidate_video == true_video[:, None]  # (M, K)
    inside = np.flatnonzero(hit.any(axis=1))
    slot = hit[inside].argmax(axis=1)
    f, s = np.asarray(fused)[inside], np.asarray(stage1, np.float64)[inside]
    true_f, true_s = f[np.arange(len(inside)), slot][:, None], s[np.arange(len(inside)), slot][:, None]
    ahead = (f > true_f) | ((f == true_f) & (s >= true_s))  # (m, K), the true slot itself included
    ranks[inside] = ahead.sum(axis=1)  # = 1 + #others ahead or tied
    return ranks


def tune_alpha(stage1: np.ndarray, rerank: np.ndarray, candidate_video: np.ndarray, true_video: np.ndarray,
               true_rank: np.ndarray, present: np.ndarray | None = None,
               grid=ALPHA_GRID) -> tuple[float, dict[float, dict[str, float]]]:
    """The alpha of ``grid`` with the best R@1 (then R@5, then lower MnR) on these captions; on a tie
    the largest alpha (closest to stage 1)."""
    valid = true_rank > 0
    table = {}
    for alpha in grid:
        ranks = reranked_ranks(fuse(stage1, rerank, alpha, present), stage1, candidate_video, true_video, true_rank)
        table[float(alpha)] = retrieval_metrics(ranks[valid])
    best = max(table, key=lambda a: (selection_key(table[a]), a))
    return best, table
