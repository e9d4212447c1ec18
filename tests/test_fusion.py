"""Score fusion and re-ranked ranks (pure numpy)."""

from __future__ import annotations

import numpy as np

from tvrerank.train.fusion import fuse, reranked_ranks, standardise, tune_alpha

CANDIDATES = np.array([[10, 11, 12, 13], [20, 21, 22, 23], [30, 31, 32, 33]])
STAGE1 = np.array([[0.9, 0.8, 0.7, 0.6], [0.9, 0.8, 0.7, 0.6], [0.9, 0.8, 0.7, 0.6]])
RERANK = np.array([[0.0, 0.0, 5.0, 0.0], [3.0, 1.0, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
TRUE_VIDEO = np.array([12, 20, 99])
TRUE_RANK = np.array([3, 1, 40])  # caption 2's video is beyond K: its stage-1 rank stays


def test_standardise_rows():
    z = standardise(np.array([[1.0, 2.0, 3.0], [4.0, 4.0, 4.0]]))
    np.testing.assert_allclose(z[0], [-1.2247449, 0, 1.2247449], atol=1e-6)
    assert (z[1] == 0).all()


def test_alpha_one_keeps_stage_one_and_alpha_zero_follows_the_reranker():
    assert reranked_ranks(fuse(STAGE1, RERANK, 1.0), CANDIDATES, TRUE_VIDEO, TRUE_RANK).tolist() == [3, 1, 40]
    assert reranked_ranks(fuse(STAGE1, RERANK, 0.0), CANDIDATES, TRUE_VIDEO, TRUE_RANK).tolist() == [1, 1, 40]


def test_ties_never_help():
    tied = np.ones((1, 4))
    assert reranked_ranks(tied, CANDIDATES[:1], np.array([13]), np.array([4])).tolist() == [1]
    fused = np.array([[2.0, 2.0, 1.0, 0.0]])
    assert reranked_ranks(fused, CANDIDATES[:1], np.array([12]), np.array([3])).tolist() == [3]


def test_tune_alpha_picks_the_best_weight():
    alpha, table = tune_alpha(STAGE1, RERANK, CANDIDATES, TRUE_VIDEO, TRUE_RANK)
    assert table[alpha]["R1"] == max(row["R1"] for row in table.values())
    assert table[0.0]["R1"] > table[1.0]["R1"] and alpha < 0.5
