"""Text→video and video→text retrieval metrics (R@1, R@5, R@10, median and mean rank).

The metrics are those of CLIP4Clip's ``compute_metrics``, with one explicit rank rule that
also covers ties and NaN scores:

    rank = 1 + #{other items scored HIGHER THAN OR EQUAL TO the true item}

* Ties count against the true item (the pessimistic rule): an item with the same score is
  taken to come first, so an all-equal row gives the worst rank, N. A model can never gain
  from ties — a constant scorer ranks every true item last. CLIP4Clip's formula agrees with
  this rule on tie-free rows.
* NaN: a NaN distractor score counts as -inf (it never beats the true item). A NaN true score
  gets the worst rank possible: N, the number of items in the row.

The re-ranked ranks (stage 2 over a caption's top K) follow the same rule; see
``tvrerank.rerank.ranking``.

Shapes: M queries (captions), N gallery items (videos), E embedding width. A similarity
matrix is (M captions, N videos), higher is better. Ranks are 1-based int64.

Only numpy: no I/O, no torch.
"""

from __future__ import annotations

import numpy as np

METRIC_KEYS = ("R1", "R5", "R10", "MdR", "MnR")
METRIC_LABELS = {"R1": "R@1", "R5": "R@5", "R10": "R@10", "MdR": "MdR", "MnR": "MnR"}
RECALL_CUTOFFS = {"R1": 1, "R5": 5, "R10": 10}


def _as_score_matrix(scores: np.ndarray, name: str = "scores") -> np.ndarray:
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"{name} must be 2-D (M, N), got shape {scores.shape}")
    if not (np.issubdtype(scores.dtype, np.floating) or np.issubdtype(scores.dtype, np.integer)):
        raise ValueError(f"{name} must hold real numbers, got dtype {scores.dtype}")
    return scores


def _as_index_vector(index: np.ndarray, length: int, name: str) -> np.ndarray:
    index = np.asarray(index)
    if index.ndim != 1 or index.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length},), got {index.shape}")
    if index.size and not np.issubdtype(index.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {index.dtype}")
    return index.astype(np.int64, copy=False)


def ranks_from_true_scores(other_scores: np.ndarray, true_scores: np.ndarray) -> np.ndarray:
    """1-based ranks when the true item's score is given apart from the other items' scores.

    other_scores (M, N) real — the row's items with the true item left out or set to NaN —,
    true_scores (M,) real → ranks (M,) int64:
    ``rank[i] = 1 + #{j: other_scores[i, j] >= true_scores[i]}``.

    Use it for a block of rows of a larger matrix, or whenever the true score comes from
    elsewhere. NaN entries of ``other_scores`` never count (NaN is -inf); a NaN true score
    gives rank N (the worst rank in an N-item row).
    """
    other_scores = _as_score_matrix(other_scores)
    num_rows, num_items = other_scores.shape
    true_scores = np.asarray(true_scores)
    if true_scores.shape != (num_rows,):
        raise ValueError(f"true_scores must have shape ({num_rows},), got {true_scores.shape}")
    # Comparisons with NaN are False, so NaN entries never count: -inf.
    num_ahead = np.count_nonzero(other_scores >= true_scores[:, np.newaxis], axis=1)
    ranks = 1 + num_ahead.astype(np.int64)
    if np.issubdtype(true_scores.dtype, np.floating):
        ranks[np.isnan(true_scores)] = num_items
    return ranks


def without_true_items(scores: np.ndarray, true_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """scores (M, N), true_index (M,) int in [0, N) → (a float copy with each row's true item set
    to NaN, the true scores (M,)): the inputs of :func:`ranks_from_true_scores`."""
    rows = np.arange(scores.shape[0])
    others = scores.astype(np.result_type(scores.dtype, np.float32), copy=True)
    true_scores = others[rows, true_index].copy()
    others[rows, true_index] = np.nan
    return others, true_scores


def ranks_from_scores(scores: np.ndarray, true_index: np.ndarray) -> np.ndarray:
    """1-based rank of each row's true column.

    scores (M, N) real, true_index (M,) int in [0, N) → ranks (M,) int64:
    ``rank[i] = 1 + #{j != true_index[i]: scores[i, j] >= scores[i, true_index[i]]}``.

    Ties count against the true item; NaN scores count as -inf; a NaN true score gives
    rank N (see the module docstring).
    """
    scores = _as_score_matrix(scores)
    num_rows, num_items = scores.shape
    true_index = _as_index_vector(true_index, num_rows, "true_index")
    if true_index.size and (true_index.min() < 0 or true_index.max() >= num_items):
        raise ValueError(f"true_index must lie in [0, {num_items}), got values in "
                         f"[{true_index.min()}, {true_index.max()}]")
    return ranks_from_true_scores(*without_true_items(scores, true_index))


def retrieval_metrics(ranks: np.ndarray) -> dict[str, float]:
    """Recall at 1/5/10 and median/mean rank from 1-based ranks.

    ranks (M,) int, all >= 1 → {"R1", "R5", "R10": percent of ranks <= k (0-100),
    "MdR": median rank, "MnR": mean rank}, keys in METRIC_KEYS order, python floats.

    Raises ValueError on empty input or on ranks < 1 (drop the -1 rows of
    :func:`exact_ranks` first).
    """
    ranks = np.asarray(ranks)
    if ranks.ndim != 1:
        raise ValueError(f"ranks must be 1-D (M,), got shape {ranks.shape}")
    if ranks.size == 0:
        raise ValueError("retrieval_metrics: no ranks given (empty input); need at least one query")
    if ranks.min() < 1:
        raise ValueError(f"retrieval_metrics: ranks are 1-based, got a rank of {ranks.min()} "
                         "(drop the -1 'not in gallery' rows first)")
    metrics = {key: 100.0 * float(np.count_nonzero(ranks <= k)) / ranks.size
               for key, k in RECALL_CUTOFFS.items()}
    metrics["MdR"] = float(np.median(ranks))
    metrics["MnR"] = float(np.mean(ranks))
    return {key: metrics[key] for key in METRIC_KEYS}


def text_to_video_ranks(similarity: np.ndarray, caption_video: np.ndarray) -> np.ndarray:
    """Text→video ranks: every caption is a query.

    similarity (M captions, N videos), caption_video (M,) int in [0, N), the true video
    column of each caption → ranks (M,) int64. With several captions per video, each
    caption is ranked on its own.
    """
    return ranks_from_scores(similarity, caption_video)


def video_to_text_ranks(similarity: np.ndarray,
                        caption_video: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Video→text ranks, scored by each video's best true caption.

    similarity (M captions, N videos), caption_video (M,) int in [0, N)
    → (ranks (V,) int64, video_columns (V,) int64), where video_columns are the sorted
    columns of the V videos that have at least one caption and ranks[k] is the rank of
    video video_columns[k]. Videos with no caption are skipped (they have no true item).

    ``rank = 1 + #{captions c not of v: similarity[c, v] >= best}``, where ``best`` is the highest
    score among v's own captions (the usual multi-caption convention: the video is retrieved as
    soon as its best caption is). Ties with other videos' captions count against v; NaN scores
    count as -inf; if all of v's captions score NaN, its rank is M, the worst.
    """
    similarity = _as_score_matrix(similarity, "similarity")
    num_captions, num_videos = similarity.shape
    caption_video = _as_index_vector(caption_video, num_captions, "caption_video")
    if caption_video.size and (caption_video.min() < 0 or caption_video.max() >= num_videos):
        raise ValueError(f"caption_video must lie in [0, {num_videos}), got values in "
                         f"[{caption_video.min()}, {caption_video.max()}]")
    video_columns = np.unique(caption_video)
    others, true_scores = without_true_items(similarity, caption_video)  # every own caption is NaN
    best_true = np.full(num_videos, -np.inf)
    np.fmax.at(best_true, caption_video, true_scores.astype(np.float64))  # fmax ignores NaN
    has_scored_caption = np.zeros(num_videos, dtype=bool)
    has_scored_caption[caption_video[~np.isnan(true_scores)]] = True
    best_true[~has_scored_caption] = np.nan  # every true caption is NaN: worst rank
    ranks = ranks_from_true_scores(others[:, video_columns].T, best_true[video_columns])
    return ranks, video_columns


def dual_softmax(similarity: np.ndarray, temperature: float = 100.0, axis: int = 0) -> np.ndarray:
    """Dual softmax (DSL / inverted softmax) re-weighting of a similarity matrix.

    similarity (M captions, N videos) → same shape:
    ``similarity * softmax(similarity * temperature, axis=axis)``.

    The inference form of CAMoE's dual softmax loss. With axis=0 (the default) the softmax
    runs over captions for each video, so a "hub" video that scores high with many captions
    is down-weighted for all but the captions it fits best; use it for text→video ranking.
    Numerically stable (max-subtracted) for any temperature > 0. NaN scores get weight 0
    in the softmax (as -inf) and stay NaN in the output.
    """
    similarity = np.asarray(similarity)
    if similarity.ndim != 2:
        raise ValueError(f"similarity must be 2-D (M, N), got shape {similarity.shape}")
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    dtype = np.result_type(similarity.dtype, np.float32)
    similarity = similarity.astype(dtype, copy=False)
    logits = similarity * dtype.type(temperature)
    logits = np.where(np.isnan(logits), -np.inf, logits)
    max_logit = np.max(logits, axis=axis, keepdims=True)
    max_logit = np.where(np.isfinite(max_logit), max_logit, 0)
    exp_logits = np.exp(logits - max_logit)
    total = np.sum(exp_logits, axis=axis, keepdims=True)
    weights = exp_logits / np.where(total > 0, total, 1)
    return similarity * weights


def exact_ranks(scores_of, num_queries: int, true_columns: np.ndarray,
                block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Exact ranks over a whole gallery without materialising the (M, N) score matrix.

    ``scores_of(window)`` → (b, N) scores of the queries in ``window`` (a slice) against every item, e.g.
    ``lambda w: query_emb[w] @ gallery_emb.T``; true_columns (M,) the true item's column in [0, N), or -1
    when it is not in the gallery → (ranks (M,) int32, -1 on those rows; true scores (M,) float32, NaN on
    those rows). ``block`` queries at a time, so peak extra memory is about block * N * 4 bytes; ties
    and NaN follow the module's rank rule (the ranks equal ``ranks_from_scores`` of the full matrix).
    """
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    true_columns = _as_index_vector(true_columns, num_queries, "true_columns")
    if true_columns.size and true_columns.min() < -1:
        raise ValueError(f"true_columns must be a gallery column or -1, got {true_columns.min()}")
    ranks = np.full(num_queries, -1, dtype=np.int32)
    true_score = np.full(num_queries, np.nan, dtype=np.float32)
    for start in range(0, num_queries, block):
        window = slice(start, min(start + block, num_queries))
        columns = true_columns[window]
        valid = np.flatnonzero(columns >= 0)
        if len(valid) == 0:
            continue
        scores = _as_score_matrix(scores_of(window))[valid]
        if columns[valid].max() >= scores.shape[1]:
            raise ValueError(f"true_columns must lie in [0, {scores.shape[1]}) or be -1, got {columns[valid].max()}")
        others, truth = without_true_items(scores, columns[valid])  # (b, N), (b,)
        ranks[start + valid] = ranks_from_true_scores(others, truth)
        true_score[start + valid] = truth
    return ranks, true_score


def selection_key(metrics: dict[str, float]) -> tuple[float, float, float]:
    """How two validations are compared (the fusion weight, the kept checkpoint of every trainer):
    higher R@1, then higher R@5, then lower mean rank."""
    return metrics["R1"], metrics["R5"], -metrics["MnR"]


def format_table(columns: dict[str, dict[str, float]]) -> str:
    """Side-by-side fixed-width table of metric dicts.

    columns {column name: retrieval_metrics(...) dict} → text with a header line and one
    line per metric in METRIC_KEYS order, labelled "R@1", "R@5", "R@10", "MdR", "MnR";
    every value with one decimal. No trailing newline.
    """
    if not columns:
        raise ValueError("format_table: no columns given")
    header = ["metric", *columns]
    rows = [header]
    for key in METRIC_KEYS:
        row = [METRIC_LABELS[key]]
        for name, metrics in columns.items():
            if key not in metrics:
                raise ValueError(f"format_table: column {name!r} has no {key!r} metric")
            row.append(f"{float(metrics[key]):.1f}")
        rows.append(row)
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    lines = ["  ".join([row[0].ljust(widths[0])]
                       + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])])
             for row in rows]
    return "\n".join(lines)


def recall_curve(ranks: np.ndarray, max_k: int) -> list[float]:
    """R@k in percent for k = 1..max_k: ranks (M,) 1-based → list of max_k floats."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        raise ValueError("recall_curve needs at least one rank")
    return [float((ranks <= k).mean() * 100) for k in range(1, max_k + 1)]
