"""The ranking rule and score fusion (pure numpy): ties and NaN never help."""

from __future__ import annotations

import numpy as np
import pytest

from tvrerank.errors import NonFiniteScores
from tvrerank.metrics import retrieval_metrics
from tvrerank.rerank.ranking import (
    fuse,
    fused_scores,
    order_candidates,
    plain_sum,
    reranked_ranks,
    standardise,
    tune_alpha,
)

CANDIDATES = np.array([[10, 11, 12, 13], [20, 21, 22, 23], [30, 31, 32, 33]])
STAGE1 = np.array([[0.9, 0.8, 0.7, 0.6], [0.9, 0.8, 0.7, 0.6], [0.9, 0.8, 0.7, 0.6]])
RERANK = np.array([[0.0, 0.0, 5.0, 0.0], [3.0, 1.0, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
TRUE_VIDEO = np.array([12, 20, 99])
TRUE_RANK = np.array([3, 1, 40])  # caption 2's video is beyond K: its stage-1 rank stays


def ranks(fused, stage1=STAGE1, candidates=CANDIDATES, true_video=TRUE_VIDEO, true_rank=TRUE_RANK):
    return reranked_ranks(fused, stage1, candidates, true_video, true_rank).tolist()


def test_standardise_rows_over_present_candidates():
    z = standardise(np.array([[1.0, 2.0, 3.0], [4.0, 4.0, 4.0], [0.1 + 2e-17, 0.1, 0.1]]))
    np.testing.assert_allclose(z[0], [-1.2247449, 0, 1.2247449], atol=1e-6)
    assert (z[1] == 0).all() and (z[2] == 0).all()  # constant up to rounding: no spread
    present = np.array([[True, True, False]])
    np.testing.assert_allclose(standardise(np.array([[1.0, 3.0, 100.0]]), present), [[-1, 1, 0]])


def test_alpha_one_keeps_stage_one_and_alpha_zero_follows_the_reranker():
    assert ranks(fuse(STAGE1, RERANK, 1.0)) == [3, 1, 40]
    assert ranks(fuse(STAGE1, RERANK, 0.0)) == [1, 1, 40]


def test_ties_never_help():
    # all four fused scores tie and stage 1 decides: the true video keeps its stage-1 place (4th)
    assert ranks(np.ones((1, 4)), STAGE1[:1], CANDIDATES[:1], np.array([13]), np.array([4])) == [4]
    # the true video (slot 2) ties on both scores with slot 3: the tie counts against it
    fused, stage1 = np.array([[2.0, 2.0, 1.0, 1.0]]), np.array([[0.9, 0.8, 0.5, 0.5]])
    assert ranks(fused, stage1, CANDIDATES[:1], np.array([12]), np.array([3])) == [4]
    # a fused tie with a candidate that stage 1 put later does not push the true video down
    assert ranks(np.array([[1.0, 1.0, 0.0, 0.0]]), STAGE1[:1], CANDIDATES[:1], np.array([10]), np.array([1])) == [1]


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_a_constant_reranker_reproduces_stage_one_exactly(alpha):
    rng = np.random.default_rng(0)
    m, k = 200, 15
    stage1 = -np.sort(-rng.normal(size=(m, k)), axis=1)  # lists best first
    candidates = rng.permuted(np.tile(np.arange(100), (m, 1)), axis=1)[:, :k]
    true_video = np.where(rng.random(m) < 0.6, candidates[np.arange(m), rng.integers(0, k, m)], 999)
    true_rank = np.where(true_video == 999, rng.integers(k + 1, 60, m), 0)
    inside = true_video != 999
    true_rank[inside] = 1 + (candidates[inside] == true_video[inside, None]).argmax(axis=1)
    for constant in (np.zeros((m, k)), np.full((m, k), 3.7), np.full((m, k), 1e9)):
        fused = fuse(stage1, constant, alpha)
        reranked = reranked_ranks(fused, stage1, candidates, true_video, true_rank)
        np.testing.assert_array_equal(reranked, true_rank)
        assert retrieval_metrics(reranked) == retrieval_metrics(true_rank)
        assert (order_candidates(fused, stage1) == np.arange(k)).all()  # serving keeps stage-1 order


def test_a_reranker_that_scores_the_true_video_lowest_is_worse_than_stage_one():
    stage1 = np.tile(np.linspace(1, 0, 6), (4, 1))
    candidates = np.tile(np.arange(6), (4, 1))
    true_video = np.array([0, 1, 0, 2])
    true_rank = np.array([1, 2, 1, 3])
    adversarial = np.where(candidates == true_video[:, None], -5.0, 1.0)
    for fused in (fuse(stage1, adversarial, 0.0), fuse(stage1, adversarial, 0.3), plain_sum(stage1, adversarial)):
        reranked = reranked_ranks(fused, stage1, candidates, true_video, true_rank)
        assert retrieval_metrics(reranked)["R1"] < retrieval_metrics(true_rank)["R1"]
        assert (reranked == 6).all()


def test_nan_or_inf_scores_are_an_error_not_a_zero():
    for bad in (np.nan, np.inf, -np.inf):
        rerank = RERANK.copy()
        rerank[1, 2] = bad
        with pytest.raises(NonFiniteScores, match="NaN/inf"):
            fuse(STAGE1, rerank, 0.5)
        with pytest.raises(NonFiniteScores):
            plain_sum(STAGE1, rerank)
    absent = np.ones_like(RERANK, dtype=bool)
    absent[1, 2] = False  # a missing candidate may hold anything
    rerank = RERANK.copy()
    rerank[1, 2] = np.nan
    assert np.isneginf(fuse(STAGE1, rerank, 0.5, absent)[1, 2])


def test_serving_order_matches_the_evaluated_rank():
    rng = np.random.default_rng(3)
    stage1 = -np.sort(-rng.normal(size=(50, 8)), axis=1)
    rerank = rng.normal(size=(50, 8))
    candidates = np.tile(np.arange(8), (50, 1))
    true_video = rng.integers(0, 8, 50)
    fused = fuse(stage1, rerank, 0.4)
    order = order_candidates(fused, stage1)
    served = 1 + (candidates[np.arange(50)[:, None], order] == true_video[:, None]).argmax(axis=1)
    np.testing.assert_array_equal(served, reranked_ranks(fused, stage1, candidates, true_video, true_video + 1))


def test_tune_alpha_picks_the_best_weight():
    alpha, table = tune_alpha(STAGE1, RERANK, CANDIDATES, TRUE_VIDEO, TRUE_RANK)
    assert table[alpha]["R1"] == max(row["R1"] for row in table.values())
    assert table[0.0]["R1"] > table[1.0]["R1"] and alpha < 1.0
    best = [a for a, row in table.items() if row == table[alpha]]
    assert alpha == max(best)  # among equally good weights, the one closest to stage 1


def test_tune_alpha_cannot_make_a_constant_reranker_look_better():
    constant = np.zeros_like(RERANK)
    alpha, table = tune_alpha(STAGE1, constant, CANDIDATES, TRUE_VIDEO, TRUE_RANK)
    stage1 = retrieval_metrics(TRUE_RANK)
    assert all(row == stage1 for row in table.values()) and alpha == 1.0


def test_a_runs_fusion_is_applied_by_name():
    stage1, rerank = np.array([[0.9, 0.5, 0.1]]), np.array([[-3.0, 4.0, 0.0]])
    assert np.array_equal(fused_scores(stage1, rerank, fusion="sum", alpha=None), plain_sum(stage1, rerank))
    assert np.array_equal(fused_scores(stage1, rerank, fusion="tuned", alpha=0.3), fuse(stage1, rerank, 0.3))
    with pytest.raises(ValueError, match="fusion"):
        fused_scores(stage1, rerank, fusion="mean", alpha=0.3)
