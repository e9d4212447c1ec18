"""FAISS inner-product indexes over L2-normalised video embeddings (cosine similarity).

Small pure helpers in the spirit of faiss ``contrib/``: choose a factory string, build, search.
``Flat`` is exact and the default; ``auto`` picks by collection size and a memory budget the
way autofaiss does (exact while small, IVF-Flat while the whole vectors fit, IVF-PQ beyond). The GPU is
used for search when FAISS sees one (``faiss-gpu``) and the index type supports it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from tvrerank.errors import InputError, TvrerankError, reason_of

log = logging.getLogger(__name__)

EXACT_MAX = 50_000  # below this, exact search is fast enough for any query load we expect
HNSW_LINKS = 32
# IVF lists probed per query: text-query recall@15 0.980 / 0.984 / 0.983 of exact at 100k / 1M / 3M videos
# (128: 0.945 / 0.959 / 0.949), 0.34 / 0.91 / 1.42 ms a query on one thread (benchmarks/README.md,
# "Stage-1 recall: the sweep"); HNSW32 reached 0.85 at 1M only at efSearch 2048 (4.5 ms)
IVF_PROBES = 256


class FaissMissing(TvrerankError, ImportError):
    """FAISS is not installed (an extra of the package)."""


def import_faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise FaissMissing(
            "FAISS is not installed: pip install 'tvrerank[cpu]' (faiss-cpu) or 'tvrerank[gpu]' (faiss-gpu)"
        ) from exc
    return faiss


@dataclass(frozen=True)
class IndexChoice:
    factory: str  # a faiss index_factory string
    search_params: str  # a faiss ParameterSpace string ("" for none)
    reason: str


def bytes_per_vector(factory: str, dim: int) -> float:
    """Rough memory per vector of an index type (vectors + graph/codes), for the auto choice."""
    if factory.startswith("HNSW"):
        return dim * 4 + HNSW_LINKS * 2 * 4 * 1.1
    if ",PQ" in factory:
        m = int(factory.split(",PQ")[1].split("x")[0])
        return m + 8
    if factory.startswith("IVF"):  # IVF-Flat: the whole vector and its id in a list
        return dim * 4 + 8
    return dim * 4


def auto_factory(n: int, dim: int, memory_budget: int = 4 << 30) -> IndexChoice:
    """Pick an index for ``n`` vectors of ``dim`` within ``memory_budget`` bytes.

    - n <= EXACT_MAX and it fits: ``Flat`` (exact);
    - the whole vectors fit: ``IVF{nlist},Flat`` probing IVF_PROBES lists (text-query recall@15 ≥ 0.98 of
      exact from 100k to 3M videos, where HNSW32 at efSearch 128 gave 0.77 at 100k and 0.28 at 1M: text
      queries lie apart from the video embeddings, where the graph navigates badly);
    - else ``IVF{nlist},PQ{m}x8`` with m = dim/8 codes (64 B per 512-d vector);
    nlist ~ 4·sqrt(n) (``ivf_lists``).
    """
    if n <= EXACT_MAX and n * bytes_per_vector("Flat", dim) <= memory_budget:
        return IndexChoice("Flat", "", f"{n} vectors: exact search is cheap")
    nlist = ivf_lists(n)
    ivf_flat = f"IVF{nlist},Flat"
    if n * bytes_per_vector(ivf_flat, dim) <= memory_budget:
        return IndexChoice(ivf_flat, f"nprobe={min(nlist, IVF_PROBES)}",
                           f"{n} vectors: an inverted file of the whole vectors fits in the memory budget")
    m = max(1, dim // 8)
    while dim % m:
        m -= 1
    return IndexChoice(f"IVF{nlist},PQ{m}x8", "nprobe=32", f"{n} vectors: compressed (IVF-PQ) to fit the budget")


def ivf_lists(n: int) -> int:
    """The number of IVF lists for n vectors: the power of two nearest 4·sqrt(n), at least 64."""
    return max(64, 2 ** round(math.log2(4 * math.sqrt(n))))


def build_index(vectors: np.ndarray, factory: str = "Flat", search_params: str = ""):
    """vectors (N, E) float32, L2-normalised → a trained, filled inner-product index."""
    faiss = import_faiss()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError:
        raise InputError(f"--factory {factory!r}: FAISS cannot build this index; use Flat (exact), auto, or a "
                         "faiss index_factory string such as IVF256,Flat or HNSW32") from None
    if not index.is_trained:
        sample = vectors
        if n > 256 * 1024:
            sample = vectors[np.random.default_rng(0).choice(n, 256 * 1024, replace=False)]
        try:
            index.train(sample)
        except RuntimeError as exc:
            reason = reason_of(exc, last=True, limit=200, default="training failed")
            raise InputError(f"--factory {factory!r}: cannot train it on {len(sample)} vectors ({reason}); "
                             "use fewer lists (e.g. IVF16,Flat), Flat, or auto, which fits the gallery size") from None
    index.add(vectors)
    if search_params:
        faiss.ParameterSpace().set_index_parameters(index, search_params)
    return index


def whole_vectors(index, positions: np.ndarray) -> np.ndarray | None:
    """The vectors (n, E) float32 at ``positions`` (n,) as they were added, for an index that keeps them
    whole (Flat, HNSW over a flat storage, IVF-Flat: its direct map is made on first use); None for
    one that compresses them (PQ) or a GPU copy."""
    faiss = import_faiss()
    base = faiss.downcast_index(index)
    if isinstance(base, faiss.IndexHNSW):
        base = faiss.downcast_index(base.storage)
    if isinstance(base, faiss.IndexIVFFlat):
        if base.direct_map.type == faiss.DirectMap.NoMap:
            base.make_direct_map()
    elif not isinstance(base, faiss.IndexFlat):
        return None
    if len(positions) == 0:
        return np.empty((0, index.d), dtype=np.float32)
    return np.stack([base.reconstruct(int(p)) for p in positions]).astype(np.float32)


def to_gpu_if_available(index):
    """A GPU copy of ``index`` when faiss-gpu sees a GPU and supports the type; else ``index``."""
    faiss = import_faiss()
    if not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0:
        return index
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except RuntimeError as exc:  # e.g. HNSW has no GPU implementation
        log.info("searching on CPU: %s", exc)
        return index


def search(index, queries: np.ndarray, k: int, batch: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """queries (M, E) → (scores (M, k) float32, positions (M, k) int64); -1 where fewer than k exist."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    scores = np.empty((len(queries), k), dtype=np.float32)
    positions = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), batch):
        stop = start + batch
        scores[start:stop], positions[start:stop] = index.search(queries[start:stop], k)
    return scores, positions
