"""Retrieval metrics against brute force and against CLIP4Clip's compute_metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tvrerank.metrics import (
    METRIC_KEYS,
    dual_softmax,
    exact_ranks,
    format_table,
    ranks_from_scores,
    ranks_from_true_scores,
    retrieval_metrics,
    text_to_video_ranks,
    video_to_text_ranks,
    without_true_items,
)


# --- brute-force references: the rank definition, one item at a time ---------------------

def brute_rank(row: np.ndarray, true_score: float, true_items) -> int:
    """1 + #{j not a true item: row[j] >= true_score}; NaN entries are -inf; a NaN true score → len(row)."""
    if math.isnan(true_score):
        return len(row)
    return 1 + sum(1 for j, value in enumerate(row)
                   if j not in true_items and not math.isnan(value) and value >= true_score)


def brute_ranks(scores: np.ndarray, true_index: np.ndarray) -> np.ndarray:
    num_rows, _ = scores.shape
    return np.array([brute_rank(scores[i], float(scores[i, true_index[i]]), {true_index[i]})
                     for i in range(num_rows)], dtype=np.int64)


def brute_video_to_text(similarity: np.ndarray, caption_video: np.ndarray):
    num_captions, num_videos = similarity.shape
    ranks, columns = [], []
    for video in range(num_videos):
        own = [float(similarity[c, video]) for c in range(num_captions) if caption_video[c] == video]
        if not own:
            continue
        scored = [value for value in own if not math.isnan(value)]
        best = max(scored) if scored else math.nan
        own_captions = {c for c in range(num_captions) if caption_video[c] == video}
        ranks.append(brute_rank(similarity[:, video], best, own_captions))
        columns.append(video)
    return np.array(ranks, dtype=np.int64), np.array(columns, dtype=np.int64)


def tied_scores(rng: np.random.Generator, shape, high: int = 4, nan_fraction: float = 0.0):
    """Integer scores in a small range (many ties), as float, with optional NaNs."""
    scores = rng.integers(0, high, size=shape).astype(np.float64)
    if nan_fraction:
        scores[rng.random(shape) < nan_fraction] = np.nan
    return scores


# --- ranks against brute force -----------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("nan_fraction", [0.0, 0.15])
def test_ranks_from_scores_matches_brute_force_with_ties(seed, nan_fraction):
    rng = np.random.default_rng(seed)
    scores = tied_scores(rng, (23, 17), nan_fraction=nan_fraction)
    true_index = rng.integers(0, 17, size=23)
    np.testing.assert_array_equal(ranks_from_scores(scores, true_index),
                                  brute_ranks(scores, true_index))


@pytest.mark.parametrize("seed", range(3))
def test_text_to_video_ranks_matches_brute_force_multi_caption(seed):
    rng = np.random.default_rng(100 + seed)
    num_videos, num_captions = 9, 40
    similarity = tied_scores(rng, (num_captions, num_videos), high=5, nan_fraction=0.05)
    caption_video = rng.integers(0, num_videos, size=num_captions)
    ranks = text_to_video_ranks(similarity, caption_video)
    assert ranks.shape == (num_captions,) and ranks.dtype == np.int64
    np.testing.assert_array_equal(ranks, brute_ranks(similarity, caption_video))


def test_integer_scores_are_accepted():
    scores = np.array([[3, 5, 5, 1], [2, 2, 2, 2]])
    np.testing.assert_array_equal(ranks_from_scores(scores, np.array([1, 0])), [2, 4])  # ties count against
    np.testing.assert_array_equal(ranks_from_scores(scores, np.array([0, 3])), [3, 4])


def test_ranks_from_true_scores_on_row_blocks_equals_full_matrix():
    rng = np.random.default_rng(7)
    scores = tied_scores(rng, (30, 12), nan_fraction=0.1)
    true_index = rng.integers(0, 12, size=30)
    full = ranks_from_scores(scores, true_index)
    others, true_scores = without_true_items(scores, true_index)
    assert np.isnan(others[np.arange(30), true_index]).all()
    pieces = [ranks_from_true_scores(others[start:start + 7], true_scores[start:start + 7])
              for start in range(0, 30, 7)]
    np.testing.assert_array_equal(np.concatenate(pieces), full)


@pytest.mark.parametrize("block", [1, 7, 64])
def test_exact_ranks_in_blocks_equal_text_to_video_ranks(block):
    rng = np.random.default_rng(11)
    num_queries, num_items, width = 50, 20, 6
    # Integer-valued embeddings in a small range: exact float32 products with many ties.
    query_emb = rng.integers(-2, 3, size=(num_queries, width)).astype(np.float32)
    gallery_emb = rng.integers(-2, 3, size=(num_items, width)).astype(np.float32)
    true_columns = rng.integers(0, num_items, size=num_queries)
    true_columns[[3, 17, 49]] = -1
    ranks, truth = exact_ranks(lambda w: query_emb[w] @ gallery_emb.T, num_queries, true_columns, block=block)
    valid = true_columns >= 0
    np.testing.assert_array_equal(ranks[~valid], -1)
    assert np.isnan(truth[~valid]).all()
    full = query_emb @ gallery_emb.T
    np.testing.assert_array_equal(ranks[valid], text_to_video_ranks(full, np.where(valid, true_columns, 0))[valid])
    np.testing.assert_array_equal(ranks[valid], brute_ranks(full[valid], true_columns[valid]))
    np.testing.assert_array_equal(truth[valid], full[valid, true_columns[valid]])


def test_exact_ranks_reject_bad_input():
    def scores_of(window):
        return np.zeros((window.stop - window.start, 5))

    with pytest.raises(ValueError, match="true_columns"):
        exact_ranks(scores_of, 3, np.array([0, 5, 1]))
    with pytest.raises(ValueError, match="true_columns"):
        exact_ranks(scores_of, 3, np.array([0, -2, 1]))
    with pytest.raises(ValueError, match="true_columns"):
        exact_ranks(scores_of, 3, np.array([0, 1]))
    with pytest.raises(ValueError, match="block"):
        exact_ranks(scores_of, 3, np.array([0, 1, 2]), block=0)


def test_ranks_reject_bad_shapes_and_indices():
    scores = np.zeros((3, 4))
    with pytest.raises(ValueError, match="2-D"):
        ranks_from_scores(np.zeros(4), np.array([0]))
    with pytest.raises(ValueError, match="true_index"):
        ranks_from_scores(scores, np.array([0, 1]))
    with pytest.raises(ValueError, match="true_index"):
        ranks_from_scores(scores, np.array([0, 4, 1]))
    with pytest.raises(ValueError, match="true_index"):
        ranks_from_scores(scores, np.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="true_scores"):
        ranks_from_true_scores(scores, np.zeros(4))


# --- CLIP4Clip agreement on tie-free matrices --------------------------------------------

def clip4clip_compute_metrics(x: np.ndarray) -> dict[str, float]:
    """CLIP4Clip's compute_metrics (metrics.py), verbatim apart from the return keys."""
    sx = np.sort(-x, axis=1)
    d = np.diag(-x)
    d = d[:, np.newaxis]
    ind = sx - d
    ind = np.where(ind == 0)
    ind = ind[1]
    metrics = {}
    metrics["R1"] = float(np.sum(ind == 0)) * 100 / len(ind)
    metrics["R5"] = float(np.sum(ind < 5)) * 100 / len(ind)
    metrics["R10"] = float(np.sum(ind < 10)) * 100 / len(ind)
    metrics["MR"] = np.median(ind) + 1
    metrics["MeanR"] = np.mean(ind) + 1
    return metrics


@pytest.mark.parametrize("size", [30, 31])
def test_matches_clip4clip_compute_metrics_on_tie_free_matrix(size):
    rng = np.random.default_rng(size)
    x = rng.standard_normal((size, size))
    assert all(len(np.unique(row)) == size for row in x)  # tie-free
    ours = retrieval_metrics(text_to_video_ranks(x, np.arange(size)))
    theirs = clip4clip_compute_metrics(x)
    assert ours["R1"] == theirs["R1"]
    assert ours["R5"] == theirs["R5"]
    assert ours["R10"] == theirs["R10"]
    assert ours["MdR"] == theirs["MR"]
    assert ours["MnR"] == pytest.approx(theirs["MeanR"], rel=1e-12)
    # And video→text on the transpose, as CLIP4Clip evaluates it.
    v2t_ranks, columns = video_to_text_ranks(x, np.arange(size))
    np.testing.assert_array_equal(columns, np.arange(size))
    v2t_theirs = clip4clip_compute_metrics(x.T)
    assert retrieval_metrics(v2t_ranks)["R1"] == v2t_theirs["R1"]
    assert retrieval_metrics(v2t_ranks)["MdR"] == v2t_theirs["MR"]


# --- ties and NaN ------------------------------------------------------------------------

def test_ties_count_against_the_true_item():
    scores = np.array([
        [0.5, 0.5, 0.5, 0.5],  # fully tied row: the worst rank, 4
        [0.2, 0.9, 0.5, 0.5],  # true 0.5 ties with column 3, one strictly higher: rank 3
        [0.7, 0.7, 0.9, 0.9],  # true 0.7 ties with column 0, two strictly higher: rank 4
        [0.1, 0.4, 0.3, 0.2],  # no tie: rank 1
    ])
    np.testing.assert_array_equal(ranks_from_scores(scores, np.array([2, 2, 1, 1])), [4, 3, 4, 1])


def test_a_constant_scorer_ranks_every_true_item_last():
    constant = np.full((5, 7), 0.3)
    np.testing.assert_array_equal(ranks_from_scores(constant, np.arange(5)), [7] * 5)
    assert retrieval_metrics(ranks_from_scores(constant, np.arange(5)))["R1"] == 0.0


def test_nan_scores_are_minus_infinity_and_nan_true_score_is_worst():
    scores = np.array([
        [np.nan, 0.1, np.nan, 0.3],    # NaN distractors never beat the true 0.1: 1 + 1
        [-np.inf, np.nan, 0.0, -np.inf],  # true -inf: the 0.0 beats it, the other -inf ties: 1 + 2
        [0.1, np.nan, 0.2, 0.3],       # NaN true score: worst rank N = 4
        [np.nan, np.nan, np.nan, np.nan],  # all NaN: still N
    ])
    true_index = np.array([1, 0, 1, 2])
    np.testing.assert_array_equal(ranks_from_scores(scores, true_index), [2, 3, 4, 4])
    np.testing.assert_array_equal(ranks_from_true_scores(*without_true_items(scores, true_index)), [2, 3, 4, 4])


# --- multi-caption: 3 videos, 2 captions each --------------------------------------------

def test_multi_caption_text_to_video_and_video_to_text():
    caption_video = np.array([0, 0, 1, 1, 2, 2])
    similarity = np.array([   # videos: 0    1    2
        [0.9, 0.1, 0.2],      # caption 0 of video 0: rank 1
        [0.3, 0.8, 0.4],      # caption 1 of video 0: rank 3
        [0.2, 0.7, 0.1],      # caption 0 of video 1: rank 1
        [0.1, 0.2, 0.6],      # caption 1 of video 1: rank 2
        [0.5, 0.4, 0.3],      # caption 0 of video 2: rank 3
        [0.0, 0.3, 0.35],     # caption 1 of video 2: rank 1
    ])
    t2v = text_to_video_ranks(similarity, caption_video)
    np.testing.assert_array_equal(t2v, [1, 3, 1, 2, 3, 1])
    # Video 0: best own caption 0.9, nothing higher in column 0: rank 1.
    # Video 1: best own caption 0.7, caption 1 (0.8) is higher: rank 2.
    # Video 2: best own caption 0.35, captions 3 (0.6) and 1 (0.4) are higher: rank 3.
    v2t, columns = video_to_text_ranks(similarity, caption_video)
    np.testing.assert_array_equal(columns, [0, 1, 2])
    np.testing.assert_array_equal(v2t, [1, 2, 3])
    assert retrieval_metrics(t2v)["R1"] == pytest.approx(50.0)
    assert retrieval_metrics(v2t)["R1"] == pytest.approx(100.0 / 3)


def test_video_to_text_skips_videos_without_captions():
    caption_video = np.array([3, 0, 3])
    similarity = np.array([
        [0.1, 0.9, 0.9, 0.5, 0.0],
        [0.8, 0.2, 0.2, 0.7, 0.0],
        [0.2, 0.3, 0.3, 0.6, 0.0],
    ])
    ranks, columns = video_to_text_ranks(similarity, caption_video)
    np.testing.assert_array_equal(columns, [0, 3])
    # Video 0: own caption 0.8 is the column max: 1. Video 3: best own 0.6, caption 1 (0.7) higher: 2.
    np.testing.assert_array_equal(ranks, [1, 2])


@pytest.mark.parametrize("seed", range(3))
def test_video_to_text_matches_brute_force(seed):
    rng = np.random.default_rng(200 + seed)
    similarity = tied_scores(rng, (25, 10), high=4, nan_fraction=0.2)
    caption_video = rng.integers(0, 8, size=25)  # videos 8, 9 (and maybe more) have no caption
    ranks, columns = video_to_text_ranks(similarity, caption_video)
    brute, brute_columns = brute_video_to_text(similarity, caption_video)
    np.testing.assert_array_equal(columns, brute_columns)
    np.testing.assert_array_equal(ranks, brute)


def test_video_to_text_all_nan_true_captions_is_worst():
    similarity = np.array([[np.nan, 0.1], [np.nan, 0.5], [0.3, 0.2]])
    ranks, columns = video_to_text_ranks(similarity, np.array([0, 0, 1]))
    np.testing.assert_array_equal(columns, [0, 1])
    np.testing.assert_array_equal(ranks, [3, 2])


# --- dual softmax ------------------------------------------------------------------------

def test_dual_softmax_penalises_hub_video():
    # Video 1 is a hub: it beats caption 0's true video 0, but caption 1 fits it far better.
    similarity = np.array([[0.5, 0.6],
                           [0.1, 0.9]])
    caption_video = np.array([0, 1])
    np.testing.assert_array_equal(text_to_video_ranks(similarity, caption_video), [2, 1])
    reweighted = dual_softmax(similarity)
    assert reweighted.shape == similarity.shape
    np.testing.assert_array_equal(text_to_video_ranks(reweighted, caption_video), [1, 1])


@pytest.mark.parametrize("axis", [0, 1])
def test_dual_softmax_matches_naive_formula(axis):
    rng = np.random.default_rng(5)
    similarity = rng.uniform(-1, 1, size=(6, 4))
    temperature = 3.0
    exp = np.exp(similarity * temperature)
    expected = similarity * exp / exp.sum(axis=axis, keepdims=True)
    result = dual_softmax(similarity, temperature=temperature, axis=axis)
    assert result.shape == (6, 4)
    np.testing.assert_allclose(result, expected, rtol=1e-12)


def test_dual_softmax_is_stable_for_large_temperature():
    rng = np.random.default_rng(6)
    similarity = rng.uniform(0.05, 1, size=(7, 5)).astype(np.float32)
    result = dual_softmax(similarity, temperature=1e6)
    assert result.dtype == np.float32
    assert np.all(np.isfinite(result))
    weights = result / similarity
    np.testing.assert_allclose(weights.sum(axis=0), 1.0, rtol=1e-6)
    # At huge temperature each video keeps only its best caption.
    np.testing.assert_array_equal(np.argmax(weights, axis=0), np.argmax(similarity, axis=0))


def test_dual_softmax_nan_gets_zero_weight_and_stays_nan():
    similarity = np.array([[np.nan, 0.2], [0.4, 0.3], [0.1, np.nan]])
    result = dual_softmax(similarity, temperature=10.0)
    assert np.isnan(result[0, 0]) and np.isnan(result[2, 1])
    finite = ~np.isnan(similarity)
    assert np.all(np.isfinite(result[finite]))
    np.testing.assert_allclose(result[1, 0] / 0.4 + result[2, 0] / 0.1, 1.0)
    with pytest.raises(ValueError, match="temperature"):
        dual_softmax(similarity, temperature=0.0)


# --- retrieval_metrics and format_table --------------------------------------------------

def test_retrieval_metrics_on_known_ranks():
    metrics = retrieval_metrics(np.array([1, 2, 6, 11]))
    assert tuple(metrics) == METRIC_KEYS
    assert metrics == {"R1": 25.0, "R5": 50.0, "R10": 75.0, "MdR": 4.0, "MnR": 5.0}
    assert all(type(value) is float for value in metrics.values())


def test_retrieval_metrics_rejects_empty_and_non_positive_ranks():
    with pytest.raises(ValueError, match="empty"):
        retrieval_metrics(np.array([], dtype=np.int64))
    with pytest.raises(ValueError, match="1-based"):
        retrieval_metrics(np.array([1, -1, 3]))


def test_format_table():
    table = format_table({
        "stage 1": {"R1": 44.51, "R5": 71.0, "R10": 80.26, "MdR": 2.0, "MnR": 14.333},
        "re-ranked": {"R1": 48.2, "R5": 74.96, "R10": 83.0, "MdR": 2.0, "MnR": 12.0},
    })
    lines = table.splitlines()
    assert len(lines) == 1 + len(METRIC_KEYS)
    assert "stage 1" in lines[0] and "re-ranked" in lines[0]
    assert len({len(line) for line in lines}) == 1  # fixed width
    labels = [line.split()[0] for line in lines[1:]]
    assert labels == ["R@1", "R@5", "R@10", "MdR", "MnR"]
    assert lines[1].split()[1:] == ["44.5", "48.2"]
    assert lines[2].split()[1:] == ["71.0", "75.0"]
    assert lines[3].split()[1:] == ["80.3", "83.0"]
    assert lines[5].split()[1:] == ["14.3", "12.0"]
    with pytest.raises(ValueError, match="MnR"):
        format_table({"broken": {"R1": 1.0, "R5": 1.0, "R10": 1.0, "MdR": 1.0}})
