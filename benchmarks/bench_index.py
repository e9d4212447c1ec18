"""First-stage index: exact (Flat) vs the ``auto`` choice on large synthetic galleries.

For each size in ``--sizes`` (default 100k and 1M) it draws 512-d unit vectors with realistic
clustering (a few thousand cluster centres, unequal cluster sizes, per-cluster spread) and 1,000
queries near gallery items, then builds both indexes and reports, for K = 15: recall@15 of the
auto index against exact search, queries/s (all queries in one batch, FAISS's default threads), build
time, and the index's memory (its serialized size). On a machine with a GPU it also times the
same searches on the GPU: FAISS's GPU copies of both indexes when the GPU build (faiss-gpu) is
installed, else says so; and, for scale, an exact top-k in torch on the GPU (not FAISS). Figures
only; ``--factory`` compares another index with Flat instead of the auto choice (its figures
keep the name ``auto``). The last line is ``auto_recall_at_15_<size>=<x> ...`` (plus ``gpu_over_cpu_flat_<size>=<x>``
when faiss-gpu ran).

    python benchmarks/bench_index.py [--sizes 100000,1000000] [--queries 1000] [--dim 512]
        [--memory-budget-gb 4] [--factory auto] [--search-params ""]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from tvrerank.index.faiss_index import IndexChoice, auto_factory, build_index, import_faiss, search


def clustered_unit_vectors(n: int, dim: int, rng: np.random.Generator, clusters: int = 2000) -> np.ndarray:
    """(n, dim) float32 unit vectors around ``clusters`` centres with Zipf-like cluster sizes."""
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = 1.0 / np.arange(1, clusters + 1) ** 0.8
    members = rng.choice(clusters, size=n, p=weights / weights.sum())
    spread = rng.uniform(0.3, 0.9, clusters).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):  # in blocks, to bound the temporary arrays
        block = members[start : start + 100_000]
        noise = rng.normal(size=(len(block), dim)).astype(np.float32) / np.sqrt(dim)
        out[start : start + len(block)] = centres[block] + spread[block, None] * noise
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def gpu_searches(indexes: dict, gallery: np.ndarray, queries: np.ndarray, k: int, cpu_qps: dict) -> dict:
    """Queries/s of each index's FAISS GPU copy (faiss-gpu) and of a torch exact top-k on the GPU; prints them."""
    faiss, figures = import_faiss(), {}
    if hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
        for name, index in indexes.items():
            try:
                on_gpu = faiss.index_cpu_to_all_gpus(index)
            except RuntimeError as exc:  # an index type without a GPU implementation
                print(f"  {name:<5} faiss GPU: not supported ({exc})")
                continue
            search(on_gpu, queries[:10], k)  # warm-up
            _, seconds = timed(search, on_gpu, queries, k)
            figures[name] = len(queries) / seconds
            print(f"  {name:<5} faiss GPU {figures[name]:9.0f} queries/s = {figures[name] / cpu_qps[name]:.1f}x the CPU")
    else:
        print("  faiss GPU: not measured (no faiss-gpu build or no GPU here; pip install 'tvrerank[gpu]')")
    try:
        import torch
    except ImportError:
        return figures
    if torch.cuda.is_available():
        g = torch.from_numpy(gallery).cuda()
        q = torch.from_numpy(queries).cuda()
        (q[:10] @ g.T).topk(k)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for lo in range(0, len(q), 256):
            (q[lo : lo + 256] @ g.T).topk(k, dim=1)
        torch.cuda.synchronize()
        rate = len(queries) / (time.perf_counter() - start)
        print(f"  torch exact top-k on the GPU (float32 matmul, not FAISS; for scale): {rate:9.0f} queries/s "
              f"= {rate / cpu_qps['exact']:.1f}x FAISS Flat on the CPU")
    return figures


def index_bytes(index) -> int:
    faiss = import_faiss()
    return int(faiss.serialize_index(index).nbytes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=15)
    parser.add_argument("--memory-budget-gb", type=float, default=4.0)
    parser.add_argument("--factory", default="auto", help="the index compared with Flat (default: auto's choice)")
    parser.add_argument("--search-params", default="", help="its FAISS search parameters, e.g. nprobe=32")
    parser.add_argument("--smoke", action="store_true", help="seconds-long check that the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.sizes, args.queries, args.dim = "3000", 50, 32
    import_faiss()
    rng = np.random.default_rng(0)
    summary = []
    for size in (int(s) for s in args.sizes.split(",")):
        gallery = clustered_unit_vectors(size, args.dim, rng)
        picks = rng.choice(size, args.queries, replace=False)
        queries = gallery[picks] + rng.normal(scale=0.5 / np.sqrt(args.dim), size=(args.queries, args.dim))
        queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
        choice = auto_factory(size, args.dim, int(args.memory_budget_gb * 2**30))
        print(f"{size} vectors of {args.dim}-d; auto picks {choice.factory} ({choice.reason})")
        if args.factory != "auto":
            choice = IndexChoice(args.factory, args.search_params, "given")
            print(f"  compared instead: {choice.factory} {choice.search_params} (--factory)")
        results, indexes, cpu_qps = {}, {}, {}
        for name, factory, params in (("exact", "Flat", ""), ("auto", choice.factory, choice.search_params)):
            index, build_s = timed(build_index, gallery, factory, params)
            (scores, positions), search_s = timed(search, index, queries, args.k)
            results[name], indexes[name], cpu_qps[name] = positions, index, args.queries / search_s
            print(f"  {name:<5} {factory:<18} build {build_s:7.1f}s  {args.queries / search_s:9.0f} queries/s  "
                  f"memory {index_bytes(index) / 2**20:8.1f} MiB")
        recall = np.mean([len(set(a) & set(b)) / args.k for a, b in zip(results["auto"], results["exact"])])
        print(f"  recall@{args.k} of auto against exact: {recall:.4f}")
        summary.append(f"auto_recall_at_{args.k}_{size}={recall:.4f}")
        gpu = gpu_searches(indexes, gallery, queries, args.k, cpu_qps)
        if "exact" in gpu:
            summary.append(f"gpu_over_cpu_flat_{size}={gpu['exact'] / cpu_qps['exact']:.1f}")
        del indexes
    print(" ".join(summary))


if __name__ == "__main__":
    main()
