"""FAISS helpers against exact brute force (``faiss.knn``), and the auto choice."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from tvrerank.index.faiss_index import EXACT_MAX, IVF_PROBES, auto_factory, build_index, search, whole_vectors


def exact_search(gallery, queries, k):
    """The reference: FAISS's brute-force k-NN by inner product (faiss.knn) → (scores, positions)."""
    return faiss.knn(queries, gallery, k, metric=faiss.METRIC_INNER_PRODUCT)


def unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_flat_index_equals_brute_force():
    rng = np.random.default_rng(0)
    gallery, queries = unit(rng, 500, 32), unit(rng, 50, 32)
    scores, positions = search(build_index(gallery, "Flat"), queries, 10)
    ref_scores, ref_positions = exact_search(gallery, queries, 10)
    np.testing.assert_array_equal(positions, ref_positions)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


@pytest.mark.parametrize("factory, params, floor", [("HNSW32", "efSearch=128", 0.95),
                                                     ("IVF16,PQ8x4", "nprobe=16", 0.3)])
def test_approximate_indexes_recall_against_exact(factory, params, floor):
    rng = np.random.default_rng(1)
    centres = unit(rng, 20, 32)
    gallery = unit(rng, 4000, 32) * 0.5 + centres[rng.integers(0, 20, 4000)]
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    queries = gallery[:100] + rng.normal(scale=0.05, size=(100, 32)).astype(np.float32)
    _, positions = search(build_index(gallery, factory, params), queries, 15)
    _, exact = exact_search(gallery, queries, 15)
    recall = np.mean([len(set(a) & set(b)) / 15 for a, b in zip(positions, exact)])
    assert recall >= floor, recall


def test_auto_factory_scales_with_size_and_budget():
    assert auto_factory(1000, 512).factory == "Flat"
    mid = auto_factory(1_000_000, 64)  # bench_scale's 1M toy gallery: IVF-Flat, whose text-query recall is 0.98
    assert (mid.factory, mid.search_params) == ("IVF4096,Flat", f"nprobe={IVF_PROBES}")
    assert auto_factory(EXACT_MAX + 1, 512).factory == "IVF1024,Flat"
    big = auto_factory(10_000_000, 512, memory_budget=4 << 30)
    assert big.factory.startswith("IVF") and ",PQ64x8" in big.factory and big.search_params == "nprobe=32"
    # a small budget forces compression even for a mid-sized collection
    assert auto_factory(200_000, 512, memory_budget=100 << 20).factory.startswith("IVF")


def test_whole_vectors_are_the_added_ones_where_the_index_keeps_them():
    rng = np.random.default_rng(2)
    gallery = unit(rng, 3000, 16)
    positions = np.array([5, 2999, 0, 17])
    for factory in ("Flat", "HNSW16", "IVF16,Flat"):
        np.testing.assert_array_equal(whole_vectors(build_index(gallery, factory), positions), gallery[positions])
    assert whole_vectors(build_index(gallery, "IVF16,PQ4x4"), positions) is None
