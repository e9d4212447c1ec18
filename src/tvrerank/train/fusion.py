"""Score fusion for the K candidates and the re-ranked ranks (pure numpy).

The final score of a candidate mixes the stage-1 score and the re-ranker's score after
standardising each within the caption's K candidates (zero mean, unit spread), so the weight
``alpha`` is scale-free: ``alpha * z(stage1) + (1 - alpha) * z(rerank)``. Videos below K keep
their stage-1 order, so a caption whose true video is beyond K keeps its stage-1 rank.
Shapes: M captions, K candidates.
"""

from __future__ import annotations

import numpy as np

from tvrerank.metrics import retrieval_metrics

ALPHA_GRID = tuple(np.round(np.linspace(0, 1, 21), 2))


def standardise(scores: np.ndarray) -> np.ndarray:
    """(M, K) → per-row zero mean, unit standard deviation (rows with no spread become 0)."""
    centred = scores - scores.mean(axis=1, keepdims=True)
    spread = scores.std(axis=1, keepdims=True)
    return np.divide(centred, spread, out=np.zeros_like(centred, dtype=np.float64), where=spread > 1e-12)


def fuse(stage1: np.ndarray, rerank: np.ndarray, alpha: float) -> np.ndarray:
    """(M, K), (M, K) → fused (M, K)."""
    return alpha * standardise(stage1) + (1 - alpha) * standardise(rerank)


def reranked_ranks(fused: np.ndarray, candidate_video: np.ndarray, true_video: np.ndarray,
                   true_rank: np.ndarray) -> np.ndarray:
    """Ranks after re-ordering the top K by ``fused``; beyond K the stage-1 rank stays.

    fused (M, K), candidate_video (M, K) video rows, true_video (M,), true_rank (M,) stage-1 ranks
    (-1: not in the gallery, kept as -1) → (M,). Ties never help: 1 + #strictly higher.
    """
    ranks = true_rank.astype(np.int64).copy()
    hit = candidate_video == true_video[:, None]  # (M, K)
    inside = hit.any(axis=1)
    position = hit.argmax(axis=1)
    true_fused = fused[np.arange(len(fused)), position]
    ranks[inside] = 1 + (fused[inside] > true_fused[inside, None]).sum(axis=1)
    return ranks


def tune_alpha(stage1: np.ndarray, rerank: np.ndarray, candidate_video: np.ndarray, true_video: np.ndarray,
               true_rank: np.ndarray, grid=ALPHA_GRID) -> tuple[float, dict[float, dict[str, float]]]:
    """The alpha of ``grid`` with the best R@1 (then R@5, then lower MnR) on these captions."""
    valid = true_rank > 0
    table = {}
    for alpha in grid:
        ranks = reranked_ranks(fuse(stage1, rerank, alpha), candidate_video, true_video, true_rank)
        table[float(alpha)] = retrieval_metrics(ranks[valid])
    best = max(table, key=lambda a: (table[a]["R1"], table[a]["R5"], -table[a]["MnR"]))
    return best, table
