"""Top-K candidates from the cache's index and from external first stages; exact true ranks."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import synthetic_cache

from tvrerank.cache.reader import CacheReader
from tvrerank.index.candidates import build_candidates, read_candidates, write_candidates
from tvrerank.errors import CacheMismatch
from tvrerank.index.store import build_index_dir


@pytest.fixture
def cache(tmp_path):
    return synthetic_cache(tmp_path / "c.h5", videos=40, failed=(3, 17))


def brute_force(cache_path, k):
    with CacheReader(cache_path) as cache:
        rows = cache.ok_rows()
        text = cache["texts/emb"][()].astype(np.float32)
        video = cache["videos/video_emb"][()].astype(np.float32)[rows]
        truth = cache["texts/video"][()]
    sim = text @ video.T
    order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    ranks = []
    for i, row in enumerate(truth):
        if row not in rows:
            ranks.append(-1)
            continue
        true_score = sim[i, list(rows).index(row)]
        ranks.append(1 + int((sim[i] > true_score).sum()))
    return rows[order], np.array(ranks), text, video, rows


def test_index_candidates_match_brute_force(cache, tmp_path):
    build_index_dir(cache, tmp_path / "index")
    lists = build_candidates(cache, k=5, index_dir=tmp_path / "index")
    ref_video, ref_ranks, *_ = brute_force(cache, 5)
    np.testing.assert_array_equal(lists.video, ref_video)
    np.testing.assert_array_equal(lists.true_rank, ref_ranks)
    assert (lists.true_rank[[6, 7, 34, 35]] == -1).all()  # captions of the failed videos 3 and 17
    assert (lists.true_rank > 5).any(), "some true ranks lie beyond K and are still exact"
    assert 3 not in lists.video and 17 not in lists.video  # failed videos are never candidates


def test_external_embeddings_and_similarity_give_the_same_lists(cache, tmp_path):
    ref_video, ref_ranks, text, video, rows = brute_force(cache, 7)
    with CacheReader(cache) as c:
        full_video = c["videos/video_emb"][()].astype(np.float32)
    np.save(tmp_path / "t.npy", text * 3.0)  # scaled: external embeddings are compared by cosine
    np.save(tmp_path / "v.npy", full_video)
    by_embeddings = build_candidates(cache, k=7, text_emb=tmp_path / "t.npy", video_emb=tmp_path / "v.npy")
    np.save(tmp_path / "s.npy", text @ full_video.T)
    by_similarity = build_candidates(cache, k=7, similarity=tmp_path / "s.npy")
    for lists in (by_embeddings, by_similarity):
        np.testing.assert_array_equal(lists.video, ref_video)
        np.testing.assert_array_equal(lists.true_rank, ref_ranks)


def test_shape_errors_name_the_file(cache, tmp_path):
    np.save(tmp_path / "t.npy", np.zeros((3, 16), np.float32))
    np.save(tmp_path / "v.npy", np.zeros((40, 16), np.float32))
    with pytest.raises(ValueError, match="--text-emb .*t.npy.*one row per caption"):
        build_candidates(cache, text_emb=tmp_path / "t.npy", video_emb=tmp_path / "v.npy")
    np.save(tmp_path / "s.npy", np.zeros((80, 39), np.float32))
    with pytest.raises(ValueError, match="39 columns"):
        build_candidates(cache, similarity=tmp_path / "s.npy")
    with pytest.raises(ValueError, match="exactly one"):
        build_candidates(cache)


def test_k_is_clamped_and_an_empty_gallery_is_an_error(tmp_path, caplog):
    small = synthetic_cache(tmp_path / "small.h5", videos=4)
    build_index_dir(small, tmp_path / "i")
    lists = build_candidates(small, k=15, index_dir=tmp_path / "i")
    assert lists.video.shape == (8, 4) and "larger than the gallery" in caplog.text
    empty = synthetic_cache(tmp_path / "empty.h5", videos=2, failed=(0, 1))
    with pytest.raises(ValueError, match="empty"):
        build_index_dir(empty, tmp_path / "j")


def test_a_mismatch_names_each_setting_that_differs_with_both_values(cache, tmp_path):
    other = synthetic_cache(tmp_path / "other.h5", videos=40, frames=8, tokens=6)
    build_index_dir(other, tmp_path / "other-index")
    with pytest.raises(CacheMismatch) as error:
        build_candidates(cache, index_dir=tmp_path / "other-index")
    message = str(error.value)
    assert "sampling.frames 8 (it) vs 4 (" in message and "layout.tokens_per_frame 6 (it) vs 4 (" in message
    assert "encoder" not in message  # only what differs


def test_an_index_or_candidates_from_another_cache_is_refused(cache, tmp_path):
    other = synthetic_cache(tmp_path / "other.h5", videos=40, model="another-encoder")
    build_index_dir(other, tmp_path / "other-index")
    with pytest.raises(CacheMismatch, match=r"encoder.model another-encoder \(it\) vs synthetic"):
        build_candidates(cache, index_dir=tmp_path / "other-index")
    build_index_dir(cache, tmp_path / "index")
    write_candidates(tmp_path / "cand.h5", build_candidates(cache, index_dir=tmp_path / "index"), cache)
    with CacheReader(other) as reader, pytest.raises(CacheMismatch, match="does not belong to .*other.h5"):
        read_candidates(tmp_path / "cand.h5", reader)
    with CacheReader(cache) as reader:
        assert read_candidates(tmp_path / "cand.h5", reader).video.shape == (80, 15)
