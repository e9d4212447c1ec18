"""Stage-1 evaluation against metrics computed by hand from the cache's embeddings."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import synthetic_cache

from tvrerank.cache.reader import CacheReader
from tvrerank.index.candidates import build_candidates, write_candidates
from tvrerank.index.evaluation import stage1_evaluation
from tvrerank.index.store import build_index_dir
from tvrerank.metrics import retrieval_metrics


@pytest.fixture
def evaluated(tmp_path):
    cache = synthetic_cache(tmp_path / "c.h5", videos=30, captions_per_video=2, failed=(4,))
    build_index_dir(cache, tmp_path / "index")
    write_candidates(tmp_path / "cand.h5", build_candidates(cache, k=5, index_dir=tmp_path / "index"), cache)
    return cache, stage1_evaluation(cache, tmp_path / "cand.h5", dsl=True)


def test_text_to_video_uses_every_caption_of_ok_videos(evaluated):
    cache, result = evaluated
    assert (result["captions"], result["evaluated"], result["k"]) == (60, 58, 5)
    with CacheReader(cache) as c:
        rows = c.ok_rows()
        sim = c["texts/emb"][()].astype(np.float32) @ c["videos/video_emb"][()].astype(np.float32)[rows].T
        truth = c["texts/video"][()]
    keep = truth != 4
    columns = np.searchsorted(rows, truth[keep])
    ranks = [1 + int((row > row[col]).sum()) for row, col in zip(sim[keep], columns)]
    assert result["stage1"] == retrieval_metrics(np.array(ranks))
    assert result["recall_at_k"] == pytest.approx(np.mean(np.array(ranks) <= 5) * 100)


def test_video_to_text_and_dsl_are_reported_apart(evaluated):
    _, result = evaluated
    assert set(result["v2t"]["stage1"]) == {"R1", "R5", "R10", "MdR", "MnR"}
    assert set(result["dsl"]["stage1"]) == set(result["stage1"])
    # captions sit near their video: stage 1 is far better than chance (R@1 = 1/29)
    assert result["stage1"]["R1"] > 20 and result["v2t"]["stage1"]["R1"] > 20
