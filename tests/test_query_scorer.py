"""QueryScorer: one query's re-rank with fixed shapes (eager on the CPU; a CUDA graph on a GPU)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from conftest import without_host_values
from torch._subclasses.fake_tensor import DataDependentOutputException
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
        rows[2] = -1  # and one with none
        expected = batched.candidate_scores(tokens, lengths, rows)
        got = single.candidate_scores(tokens, lengths, rows)
        assert np.isneginf(got[rows < 0]).all() and np.isfinite(got[rows >= 0]).all()
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
    # what lets CUDA capture it as one graph; checked here on the CPU with tensors that have no values
    root, cache = with_store
    with Retriever(cache, root / "index", root / "run", device="cpu", device_store=True) as r:
        scorer = r.query_scorer(4)
        with without_host_values():
            assert scorer._step().shape == (4,)
        with without_host_values(), pytest.raises(DataDependentOutputException):  # the batched path reads
            r.reranker.model.score(scorer.text, scorer.length, r.device_store.gather(scorer.positions), None,
                                   pair_text=scorer.pair_text)  # the longest caption's length


class RecordedStep:
    """A stand-in for a CUDA graph on the CPU: ``replay`` runs the step again into the recorded scores
    (as a graph does), or does nothing (a graph that captured nothing)."""

    def __init__(self, scorer: QueryScorer, *, faithful: bool):
        self.scorer, self.faithful, self.replays = scorer, faithful, 0

    def record(self):
        self.scorer._example(seed=0)
        self.scores = self.scorer._step()
        return self, self.scores

    def replay(self):
        self.replays += 1
        if self.faithful:
            with torch.inference_mode():
                self.scores.copy_(self.scorer._step())


def test_a_recorded_step_is_used_only_once_a_replay_on_other_inputs_matches(with_store, caplog):
    root, cache = with_store
    with Retriever(cache, root / "index", root / "run", device="cpu", device_store=True) as r:
        emb, tokens, lengths = r.encoder.encode_texts(QUERIES)
        _, rows = r.stage1(emb, 4)
        scorer = r.query_scorer(4)
        eager = [scorer(tokens[i], int(lengths[i]), r.store.positions(rows[i])) for i in range(len(QUERIES))]
        assert scorer.graph is None  # nothing to capture on the CPU

        with caplog.at_level(logging.WARNING):  # a graph that replays what it saw is refused
            assert not scorer.capture(RecordedStep(scorer, faithful=False).record)
        assert scorer.graph is None and "differ from the eager ones" in caplog.text

        graph = RecordedStep(scorer, faithful=True)
        assert scorer.capture(graph.record) and scorer.graph is graph
        for i in range(len(QUERIES)):  # each query copies its inputs in and replays
            np.testing.assert_array_equal(scorer(tokens[i], int(lengths[i]), r.store.positions(rows[i])), eager[i])
        assert graph.replays == 1 + len(QUERIES)


def test_a_capture_that_fails_leaves_the_eager_scorer(with_store, caplog):
    root, cache = with_store
    with Retriever(cache, root / "index", root / "run", device="cpu", device_store=True) as r:
        emb, tokens, lengths = r.encoder.encode_texts(QUERIES[:1])
        _, rows = r.stage1(emb, 4)
        scorer = QueryScorer(r.reranker.model, r.device_store, pairs=4, text_tokens=tokens.shape[1],
                             text_token_dim=tokens.shape[2], device=CPU)
        before = scorer(tokens[0], int(lengths[0]), r.store.positions(rows[0]))
        with caplog.at_level(logging.WARNING):
            assert not scorer.capture(scorer._record_graph)  # no CUDA here: recording raises
        assert scorer.graph is None and "without a CUDA graph" in caplog.text
        np.testing.assert_array_equal(scorer(tokens[0], int(lengths[0]), r.store.positions(rows[0])), before)
        with pytest.raises(ValueError, match="5 candidates"):
            scorer(tokens[0], int(lengths[0]), np.arange(5))


def test_views_share_the_files_and_drop_the_store_or_its_device_copy(with_store):
    root, cache = with_store
    with Retriever(cache, root / "index", root / "run", device="cpu", device_store=True) as r:
        host, bare = r.view(device_store=False), r.view(use_store=False)
        assert host.store is r.store and host.device_store is None and host.encoder is r.encoder
        assert bare.store is None and bare.device_store is None
        for view in (host, bare):
            for a, b in zip(r.search(QUERIES, top=5, k=4), view.search(QUERIES, top=5, k=4)):
                assert [h.video_id for h in a.results] == [h.video_id for h in b.results]
        assert r._scorers and not host._scorers  # the view went the batched way
