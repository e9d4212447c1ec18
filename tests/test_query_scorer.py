"""QueryScorer: one query's re-rank with fixed shapes (eager on the CPU; a CUDA graph on a GPU)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from conftest import HostSyncs
from test_retrieve import invoke, setup  # noqa: F401 - the module fixture: a trained run on a tiny gallery

from tvrerank.cache.reader import CacheReader
from tvrerank.retrieve.gallery_store import FIELDS, GalleryStore
from tvrerank.retrieve.query_scorer import QueryScorer
from tvrerank.retrieve.retriever import Retriever

CPU = torch.device("cpu")
QUERIES = ["clip 4 caption 0", "clip 1 caption 1", "a query about nothing in particular"]


@pytest.fixture(scope="module")
def with_store(setup):  # noqa: F811
    root, cache = setup
    assert invoke("gallery", "--gallery", str(cache), "--reranker", str(root / "run"), "--device", "cpu").exit_code == 0
    return root, cache


def test_the_device_store_gathers_the_records_the_store_reads(with_store):
    root, cache = with_store
    with CacheReader(cache) as reader:
        store = GalleryStore.find(root / "run", reader)
        rows = store.rows[[3, 0, 2, 0]]  # repeats allowed: padded candidate lists repeat one
        gathered = store.on_device(CPU).gather(torch.from_numpy(store.positions(rows)))
        read = store.read(store.rows[[3, 0, 2]], CPU)
        for name in FIELDS:
            got, want = getattr(gathered, name), getattr(read, name)
            assert got.dtype == want.dtype
            torch.testing.assert_close(got[:3], want, rtol=0, atol=0)
            torch.testing.assert_close(got[3], want[1], rtol=0, atol=0)
        assert store.nbytes == sum(store.arrays[name].nbytes for name in FIELDS)
        store.close()


def test_scores_equal_the_batched_path_with_padded_captions_and_candidate_lists(with_store):
    root, cache = with_store
    with Retriever(cache, root / "index", root / "run", device="cpu", device_store=False) as batched, \
            Retriever(cache, root / "index", root / "run", device="cpu", device_store=True) as single:
        assert batched.device_store is None and single.device_store is not None
        emb, tokens, lengths = batched.encoder.encode_texts(QUERIES)
        assert lengths.max() < tokens.shape[1]  # the scorer pads every caption to the cache's text_tokens
        _, rows = batched.stage1(emb, 4)
        rows[1, 2:] = -1  # a query with fewer candidates than the scorer's pairs
        expected = batched.rerank_scores(tokens, lengths, rows)
        got = single.rerank_scores(tokens, lengths, rows)
        assert np.isneginf(got[1, 2:]).all() and np.isfinite(got[rows >= 0]).all()
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
        assert list(single._scorers) == [4]  # one scorer per candidate count, made on first use


def test_searches_rank_alike_with_the_store_on_the_device(with_store):
    root, cache = with_store
    with Retriever(cache, root / "index", root / "run", device="cpu") as host, \
            Retriever(cache, root / "index", root / "run", device="cpu", device_store=True) as device:
        assert host.device_store is None  # on a CPU the default keeps the memory-mapped store
        for a, b in zip(host.search(QUERIES, top=5, k=4), device.search(QUERIES, top=5, k=4)):
            assert [h.video_id for h in a.results] == [h.video_id for h in b.results]
            np.testing.assert_allclose([h.score for h in a.results], [h.score for h in b.results], atol=1e-5)


def test_the_scoring_step_never_needs_a_value_on_the_host(with_store):
    # what lets CUDA capture it as one graph; checked here on the CPU, operator by operator
    root, cache = with_store
    with Retriever(cache, root / "index", root / "run", device="cpu", device_store=True) as r:
        scorer = r.query_scorer(4)
        with HostSyncs() as syncs:
            scores = scorer._step()
        assert scores.shape == (4,) and syncs.seen == []
        with HostSyncs() as syncs, torch.inference_mode():  # it does see them: the batched path reads the longest caption
            r.reranker.model.score(scorer.text, scorer.length, r.device_store.gather(scorer.positions), None,
                                   pair_text=scorer.pair_text)
        assert syncs.seen == ["aten.item.default"]


def test_a_capture_that_fails_leaves_the_eager_scorer(with_store, caplog):
    root, cache = with_store
    with Retriever(cache, root / "index", root / "run", device="cpu", device_store=True) as r:
        emb, tokens, lengths = r.encoder.encode_texts(QUERIES[:1])
        _, rows = r.stage1(emb, 4)
        scorer = QueryScorer(r.reranker.model, r.device_store, pairs=4, text_tokens=tokens.shape[1],
                             text_token_dim=tokens.shape[2], device=CPU)
        before = scorer(tokens[0], int(lengths[0]), r.store.positions(rows[0]))
        with caplog.at_level(logging.WARNING):
            scorer._capture()  # no CUDA here: the capture fails as a broken one would on a GPU
        assert scorer.graph is None and "without a CUDA graph" in caplog.text
        np.testing.assert_array_equal(scorer(tokens[0], int(lengths[0]), r.store.positions(rows[0])), before)
        scorer._example(seed=1)  # the capture's check inputs: any valid query
        assert 1 <= int(scorer.length) <= tokens.shape[1] and torch.isfinite(scorer._step()).all()
        with pytest.raises(ValueError, match="5 candidates"):
            scorer(tokens[0], int(lengths[0]), np.arange(5))
