"""A million-video gallery on one machine: build cost, disk, resident memory, latency, index recall.

Builds, under ``--workdir`` (default: a temporary folder), a synthetic gallery of ``--videos`` videos
(default 1,000,000) at the ``--shape`` of ``toy`` (the shipped tvr-toy encoder, the demo's re-ranker)
or ``vit-b-16`` (ViT-B-16's layout with seeded random weights, ``RerankerConfig``'s default
re-ranker), nothing decoded:

- the cache (``create_cache``): ids, paths, status ok and clustered unit ``video_emb`` drawn
  (``bench_index.clustered_unit_vectors``); its token and frame-embedding datasets are allocated but
  never written (HDF5 keeps unwritten chunks off the disk), as serving with a gallery store never reads
  them — the disk figure is the cache a store-backed server needs beside it, not an extraction's;
- the index with the library's builder (``build_index_dir``, ``--factory auto``: IVF-Flat or IVF-PQ,
  whichever fits the 4 GB budget);
- a randomly initialised re-ranker (``bench_retrieve.save_random_reranker``) and its gallery store
  written by the library's writer (``write_gallery_store``, memory-mapped by readers) with drawn
  records of the shapes the selectors give (``select_videos`` on two videos fixes them).

Then, each in a fresh process (``--phase measure``, so the figures are those of a server, not of the
builder): ``Retriever`` opened as ``tvrerank retrieve`` opens it (resident memory after start),
``--queries`` toy or MSR-VTT captions one at a time: stage 1 alone (``search(rerank=False)``: text
encode + FAISS), re-ranked at K = ``--k`` (``search``, top 10) and the external-candidates path
(``Retriever.rerank`` of the query's stage-1 top K), resident memory after them; once with 1 and once
with 2 torch/FAISS threads. Then ``tvrerank serve`` on 127.0.0.1 with ``--clients`` (default 8)
concurrent keep-alive clients (``bench_serve.load``). Recall@K of the index against exact search
(``faiss.knn`` over every vector) on ``--recall-sample`` queries: gallery vectors with noise, and the
text queries themselves.

    python benchmarks/bench_scale.py [--videos 1000000] [--shape toy|vit-b-16] [--queries 1000] [--k 15]
        [--clients 8] [--recall-sample 500] [--workdir DIR] [--keep]
    python benchmarks/bench_scale.py --videos 50000 --queries 300          # what 2 shared cores allow

The last line is ``scale_rerank_p50_ms=<p50 re-ranked, 1 thread>``.

``--sweep`` measures stage 1 only: the same drawn video embeddings (no cache, no store), each index of
``SWEEP`` built once on one thread and searched at each of its search parameters (HNSW's efSearch,
IVF's nprobe), one query at a time: recall@K against exact search on the two query sets of the
recall figure above, and per-query FAISS latency p50 / p95 (the re-ranked query adds the text encoder
and the re-ranker on top, ~4.4 ms at toy shapes). Its last line is ``sweep_best=<setting>`` (the
fastest one whose text-query recall is at least ``--recall-target``, or ``none``).

    python benchmarks/bench_scale.py --sweep [--videos 1000000] [--recall-sample 500] [--sweep-index NAME ...]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_index import clustered_unit_vectors  # noqa: E402
from bench_retrieve import make_queries, remove_made, save_random_reranker  # noqa: E402
from bench_serve import Client, load, row, search_path, serve_process  # noqa: E402

from tvrerank.cache.identity import cache_video_ids_digest  # noqa: E402
from tvrerank.cache.reader import CacheReader  # noqa: E402
from tvrerank.cache.rows import CacheRows  # noqa: E402
from tvrerank.cache.schema import OK, CacheHeader  # noqa: E402
from tvrerank.cache.writer import create_cache  # noqa: E402
from tvrerank.config import SamplingConfig  # noqa: E402
from tvrerank.extract.encoder import FrozenClipEncoder  # noqa: E402
from tvrerank.index.faiss_index import build_index, import_faiss, ivf_lists, search  # noqa: E402
from tvrerank.index.store import build_index_dir, load_index_dir  # noqa: E402
from tvrerank.rerank.checkpoint import load_reranker  # noqa: E402
from tvrerank.rerank.inference import select_videos  # noqa: E402
from tvrerank.rerank.model import SelectedVideos  # noqa: E402
from tvrerank.retrieve.gallery_store import (reranker_digest, store_bytes_per_video, store_path,  # noqa: E402
                                             write_gallery_store)
from tvrerank.retrieve.retriever import Retriever, set_cpu_threads  # noqa: E402

SHAPES = {"toy": {"model": "tvr-toy", "pretrained": "toy", "text_tokens": 48, "reranker": "demo"},
          "vit-b-16": {"model": "ViT-B-16", "pretrained": None, "text_tokens": 32, "reranker": "default"}}
FRAMES, TOP, WARMUP, BLOCK = 12, 10, 5, 50_000


def rss_bytes(field: str = "VmRSS") -> int:
    """This process's resident memory (Linux /proc): ``VmRSS`` all of it, ``RssAnon`` its own memory,
    ``RssFile`` pages of mapped files (the gallery store) that the page cache holds and may evict."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return 0


def disk_bytes(path: Path) -> int:
    """Bytes a file or folder takes on the disk (allocated blocks: unwritten HDF5 chunks take none)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_blocks * 512 for p in files)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


# --------------------------------------------------------------------------- building
def make_encoder(shape: str) -> FrozenClipEncoder:
    spec = SHAPES[shape]
    return FrozenClipEncoder(model=spec["model"], pretrained=spec["pretrained"], text_tokens=spec["text_tokens"],
                             device="cpu")


def gallery_vectors(videos: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """(videos, dim) float32 clustered unit vectors: the gallery's ``video_emb``."""
    return clustered_unit_vectors(videos, dim, rng, clusters=max(10, min(2000, videos // 50)))


def build_cache(path: Path, encoder: FrozenClipEncoder, videos: int, seed: int = 0) -> dict:
    """A cache of ``videos`` ok videos whose only written video arrays are the embeddings; its fingerprint."""
    rng = np.random.default_rng(seed)
    layout = encoder.layout
    header = CacheHeader(encoder=encoder.config, sampling=SamplingConfig(frames=FRAMES), layout=layout,
                         dataset={"format": "synthetic", "benchmark": "bench_scale"},
                         created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    captions = make_queries(10, encoder.config.model)
    text_emb, text_tokens, text_length = encoder.encode_texts(captions)
    ids = [f"v{i:07d}" for i in range(videos)]
    with create_cache(path, header, video_ids=ids, video_paths=[f"videos/{i}.mp4" for i in ids], captions=captions,
                      caption_video=np.arange(len(captions), dtype=np.int32)) as f:
        f["videos/status"][:] = OK
        f["videos/frame_mask"][:] = True
        f["texts/emb"][:], f["texts/tokens"][:], f["texts/length"][:] = text_emb, text_tokens, text_length
        emb = gallery_vectors(videos, layout.embed_dim, rng)
        for start in range(0, videos, BLOCK):
            f["videos/video_emb"][start : start + BLOCK] = emb[start : start + BLOCK]
    with CacheReader(path) as cache:
        return cache.header.fingerprint()


def record_shapes(cache_path: Path, run_dir: Path) -> SelectedVideos:
    """Two videos through the saved re-ranker's selectors: the store records' shapes and dtypes."""
    trained = load_reranker(run_dir, "cpu")
    return select_videos(trained.model, CacheRows(cache_path, memory_budget=0), np.array([0, 1]),
                         device=torch.device("cpu"))


def drawn_records(example: SelectedVideos, videos: int, seed: int = 0):
    """Store records of ``example``'s shapes for ``videos`` videos, in blocks: tokens drawn, no padding."""
    rng = np.random.default_rng(seed)
    for start in range(0, videos, BLOCK // 10):
        n = min(BLOCK // 10, videos - start)
        fields = {}
        for name in SelectedVideos.names():
            field = getattr(example, name)
            shape = (n,) + tuple(field.shape[1:])
            if field.is_floating_point():
                fields[name] = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32).astype(np.float16))
            else:
                fields[name] = torch.zeros(shape, dtype=field.dtype)
        yield SelectedVideos(**fields)


def build_store(cache_path: Path, run_dir: Path, videos: int) -> Path:
    example = record_shapes(cache_path, run_dir)
    with CacheReader(cache_path) as cache:
        digest, rows = cache_video_ids_digest(cache), cache.ok_rows()
    config = load_reranker(run_dir, "cpu").model.config
    return write_gallery_store(store_path(run_dir, cache_path, digest), rows, drawn_records(example, videos),
                               cache_path=cache_path, ids_digest=digest, reranker_sha256=reranker_digest(run_dir),
                               per_video=store_bytes_per_video(config))


def recall_queries(vectors: np.ndarray, encoder: FrozenClipEncoder, sample: int) -> dict[str, np.ndarray]:
    """The two query sets of the recall figures, unit rows (sample, E): gallery vectors with noise, and
    text queries encoded by the gallery's text encoder."""
    rng = np.random.default_rng(7)
    noisy = vectors[rng.choice(len(vectors), sample, replace=False)]
    noisy = noisy + rng.normal(scale=0.5 / np.sqrt(vectors.shape[1]), size=noisy.shape).astype(np.float32)
    text, _, _ = encoder.encode_texts(make_queries(sample, encoder.config.model, seed=3))
    return {name: np.ascontiguousarray(q / np.linalg.norm(q, axis=1, keepdims=True), dtype=np.float32)
            for name, q in (("gallery vectors + noise", noisy), ("text queries", text))}


def exact_neighbours(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """queries (Q, E) → positions (Q, k) of their exact top k by inner product."""
    return import_faiss().knn(queries, vectors, k, metric=import_faiss().METRIC_INNER_PRODUCT)[1]


def recall_at(found: np.ndarray, exact: np.ndarray) -> float:
    """found, exact (Q, k) positions → the mean share of each query's exact top k that was found."""
    return float(np.mean([len(set(a) & set(b)) / exact.shape[1] for a, b in zip(exact, found)]))


def recall(cache_path: Path, index_dir: Path, encoder: FrozenClipEncoder, k: int, sample: int) -> dict[str, float]:
    """Recall@k of the index against exact search, on noisy gallery vectors and on text queries."""
    index, _, _ = load_index_dir(index_dir)
    with CacheReader(cache_path) as cache:
        vectors = cache["videos/video_emb"][()].astype(np.float32)
    return {name: recall_at(search(index, queries, k)[1], exact_neighbours(vectors, queries, k))
            for name, queries in recall_queries(vectors, encoder, sample).items()}


# --------------------------------------------------------------------------- stage-1 sweep (--sweep)
# factory (nlist: 4·sqrt(n) as auto picks it) → the search parameter swept and its values
SWEEP = {"HNSW32": ("efSearch", (128, 256, 512, 1024, 2048)),
         "IVF{nlist},Flat": ("nprobe", (16, 32, 64, 128, 256, 512)),
         "IVF{nlist},PQ{m}x8": ("nprobe", (32, 128, 256))}
SMOKE_SWEEP = {"HNSW32": ("efSearch", (16, 128)), "IVF{nlist},Flat": ("nprobe", (1, 8))}


def sweep_factory(template: str, n: int, dim: int) -> str:
    """A SWEEP key → its faiss factory string for n vectors of dim (auto's nlist and PQ width)."""
    return template.format(nlist=ivf_lists(n), m=max(1, dim // 8))


def per_query_ms(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[float]]:
    """Search one query at a time → (positions (Q, k), [p50, p95] ms per query)."""
    found, seconds = np.empty((len(queries), k), dtype=np.int64), []
    for i in range(len(queries)):
        start = time.perf_counter()
        _, found[i : i + 1] = search(index, queries[i : i + 1], k)
        seconds.append(time.perf_counter() - start)
    return found, [float(v) for v in np.percentile(np.array(seconds) * 1000, [50, 95])]


def sweep(videos: int, shape: str, k: int, sample: int, grid: dict, recall_target: float) -> list[dict]:
    """Every (index, search parameter) of ``grid`` on one thread: recall@k of both query sets, ms per query."""
    faiss = import_faiss()
    set_cpu_threads(1)
    encoder = make_encoder(shape)
    vectors = gallery_vectors(videos, encoder.layout.embed_dim, np.random.default_rng(0))
    queries = recall_queries(vectors, encoder, sample)
    del encoder
    exact = {name: exact_neighbours(vectors, q, k) for name, q in queries.items()}
    print(f"\nstage-1 sweep: {videos} videos of width {vectors.shape[1]}, 1 thread, {sample} queries of each set, "
          f"recall@{k} vs exact")
    print(f"{'index':<22} {'parameter':<14} {'build s':>8} {'recall gallery+noise':>21} {'recall text':>12} "
          f"{'ms p50 / p95 (text)':>20}")
    rows = []
    for template, (parameter, values) in grid.items():
        factory = sweep_factory(template, videos, vectors.shape[1])
        index, build_s = timed(build_index, vectors, factory)
        for value in values:
            setting = f"{parameter}={value}"
            faiss.ParameterSpace().set_index_parameters(index, setting)
            found_noisy, _ = per_query_ms(index, queries["gallery vectors + noise"], k)
            found_text, ms = per_query_ms(index, queries["text queries"], k)
            row = {"factory": factory, "search_params": setting, "build_s": build_s,
                   "recall_gallery": recall_at(found_noisy, exact["gallery vectors + noise"]),
                   "recall_text": recall_at(found_text, exact["text queries"]), "ms": ms}
            rows.append(row)
            print(f"{factory:<22} {setting:<14} {build_s:>8.1f} {row['recall_gallery']:>21.3f} "
                  f"{row['recall_text']:>12.3f} {'%.2f / %.2f' % tuple(ms):>20}", flush=True)
        del index
    met = [r for r in rows if min(r["recall_text"], r["recall_gallery"]) >= recall_target]
    best = min(met, key=lambda r: r["ms"][0]) if met else None
    print(f"sweep_best={'none' if best is None else best['factory'] + ' ' + best['search_params']}")
    return rows


# --------------------------------------------------------------------------- measuring (a fresh process)
def measure(work: Path, shape: str, queries: int, k: int, threads: int) -> dict:
    set_cpu_threads(threads)
    start = time.perf_counter()
    retriever = Retriever(work / "gallery.h5", work / "index", work / "run", device="cpu")
    out = {"start_s": time.perf_counter() - start, "rss_start": rss_bytes()}
    assert retriever.store is not None, "Retriever did not find the gallery store"
    texts = make_queries(queries + WARMUP, SHAPES[shape]["model"], seed=5)
    times: dict[str, list[float]] = {"stage 1 alone": [], f"re-ranked, K={k}": [], f"/rerank path, K={k}": []}
    same = 0
    with retriever:
        for i, query in enumerate(texts):
            (stage1,), t1 = timed(retriever.search, [query], top=k, k=k, rerank=False)
            (ranked,), t2 = timed(retriever.search, [query], top=TOP, k=k)
            ids = [hit.video_id for hit in stage1.results]
            given, t3 = timed(retriever.rerank, query, ids, k=k, top=TOP)
            same += given.results == ranked.results
            if i >= WARMUP:
                for name, seconds in zip(times, (t1, t2, t3)):
                    times[name].append(seconds)
        out["rss_after"] = rss_bytes()
        out["rss_anon_after"], out["rss_file_after"] = rss_bytes("RssAnon"), rss_bytes("RssFile")
    out["latency_ms"] = {name: [float(v) for v in np.percentile(np.array(t) * 1000, [50, 95])]
                         for name, t in times.items()}
    out["rerank_equals_search"] = same
    out["queries"] = len(texts)
    return out


def measure_in_fresh_process(work: Path, shape: str, queries: int, k: int, threads: int) -> dict:
    result = subprocess.run([sys.executable, __file__, "--phase", "measure", "--workdir", str(work), "--shape", shape,
                             "--queries", str(queries), "--k", str(k), "--threads", str(threads)],
                            capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    if result.returncode != 0:
        raise SystemExit(f"the measuring process failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def start_server(work: Path, threads: int, k: int) -> tuple[subprocess.Popen, str]:
    (work / "videos").mkdir(exist_ok=True)
    return serve_process(["--gallery", str(work / "gallery.h5"), "--index", str(work / "index"), "--reranker",
                          str(work / "run"), "--videos", str(work / "videos"), "--port", "0", "--host", "127.0.0.1",
                          "--device", "cpu", "--threads", str(threads), "--k", str(k)], timeout=600)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=1_000_000)
    parser.add_argument("--shape", default="toy", choices=sorted(SHAPES))
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=15)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per-client", type=int, default=25, help="searches per client through serve")
    parser.add_argument("--recall-sample", type=int, default=500)
    parser.add_argument("--factory", default="auto")
    parser.add_argument("--workdir")
    parser.add_argument("--keep", action="store_true", help="keep the working folder")
    parser.add_argument("--smoke", action="store_true", help="2,000 toy videos, 10 queries, 2 clients")
    parser.add_argument("--sweep", action="store_true", help="stage 1 only: recall and latency of index settings")
    parser.add_argument("--recall-target", type=float, default=0.95, help="for --sweep's best setting")
    parser.add_argument("--sweep-index", action="append", choices=sorted(SWEEP),
                        help="--sweep only these indexes (repeat; default: all)")
    parser.add_argument("--phase", choices=["all", "measure"], default="all", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase == "measure":
        print(json.dumps(measure(Path(args.workdir), args.shape, args.queries, args.k, args.threads)))
        return
    if args.sweep:
        if args.smoke:
            args.videos, args.recall_sample = 2000, 50
        grid = SMOKE_SWEEP if args.smoke else {name: SWEEP[name] for name in args.sweep_index or SWEEP}
        sweep(args.videos, args.shape, args.k, args.recall_sample, grid, args.recall_target)
        return
    if args.smoke:
        args.videos, args.shape, args.queries, args.clients, args.per_client = 2000, "toy", 10, 2, 3
        args.recall_sample = 50
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    cache_path, index_dir, run_dir = work / "gallery.h5", work / "index", work / "run"
    try:
        print(f"{args.videos} videos, shape {args.shape}, {os.cpu_count()} CPU cores; working folder {work}")
        encoder = make_encoder(args.shape)
        fingerprint, t_cache = timed(build_cache, cache_path, encoder, args.videos)
        config, t_index = timed(build_index_dir, cache_path, index_dir, args.factory)
        save_random_reranker(run_dir, encoder, FRAMES, fingerprint, SHAPES[args.shape]["reranker"])
        store, t_store = timed(build_store, cache_path, run_dir, args.videos)
        print(f"\n{'built':<40} {'seconds':>9} {'disk MB':>10}")
        for name, seconds, path in (("cache (ids, embeddings)", t_cache, cache_path),
                                    (f"index {config.factory} {config.search_params}", t_index, index_dir),
                                    ("gallery store (memory-mapped)", t_store, store)):
            print(f"{name:<40} {seconds:>9.1f} {disk_bytes(path) / 1e6:>10.1f}")
        total_s = t_cache + t_index + t_store
        total_bytes = sum(disk_bytes(p) for p in (cache_path, index_dir, store))
        print(f"{'total':<40} {total_s:>9.1f} {total_bytes / 1e6:>10.1f}")
        del encoder

        recalls = recall(cache_path, index_dir, make_encoder(args.shape), args.k, args.recall_sample)
        for name, value in recalls.items():
            print(f"recall@{args.k} of {config.factory} vs exact, {args.recall_sample} {name}: {value:.3f}")

        print(f"\nRetriever in a fresh process, {args.queries} queries one at a time (ms, p50 / p95)")
        print(f"{'':<26}" + "".join(f"{name:>24}" for name in ("stage 1 alone", f"re-ranked, K={args.k}",
                                                                  f"/rerank path, K={args.k}")))
        measured = {}
        for threads in (1, 2):
            m = measured[threads] = measure_in_fresh_process(work, args.shape, args.queries, args.k, threads)
            print(f"{f'{threads} thread(s)':<26}" + "".join(f"{'%.2f / %.2f' % tuple(v):>24}"
                                                           for v in m["latency_ms"].values()))
        for threads, m in measured.items():
            print(f"{threads} thread(s): resident memory {m['rss_start'] / 1e9:.2f} GB after start "
                  f"({m['start_s']:.1f} s), {m['rss_after'] / 1e9:.2f} GB after {m['queries']} queries "
                  f"({m['rss_anon_after'] / 1e9:.2f} GB its own, {m['rss_file_after'] / 1e9:.2f} GB mapped file pages); "
                  f"/rerank of the stage-1 top K equal to search in {m['rerank_equals_search']} of {m['queries']}")

        process, url = start_server(work, 1, args.k)
        try:
            with CacheReader(cache_path) as cache:
                queries = [str(c) for c in cache.strings("texts/caption")] + make_queries(50, SHAPES[args.shape]["model"], seed=9)
            warm = Client(url)
            for query in queries[:3]:
                warm.get(search_path(query))
            print(f"\ntvrerank serve --threads 1 on {url}")
            print(f"{'':<34} {'requests':>8} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8} {'req/s':>8} {'errors':>6}")
            single = load(url, queries, 1, args.per_client)
            print(row("search, 1 client", *single))
            loaded = load(url, queries, args.clients, args.per_client)
            print(row(f"search, {args.clients} clients at once", *loaded))
        finally:
            process.terminate()
            process.wait(timeout=30)
        one = measured[1]["latency_ms"]
        print(f"scale_build_s={total_s:.0f}")
        print(f"scale_rss_gb={max(m['rss_after'] for m in measured.values()) / 1e9:.2f}")
        print(f"scale_rss_anon_gb={max(m['rss_anon_after'] for m in measured.values()) / 1e9:.2f}")
        print(f"scale_recall_at_{args.k}={recalls['gallery vectors + noise']:.3f}")
        print(f"scale_serve_p95_ms={np.percentile(loaded[0], 95):.1f}")
        print(f"scale_rerank_p50_ms={one[f're-ranked, K={args.k}'][0]:.2f}")
    finally:
        if not args.keep:
            remove_made((cache_path, index_dir, run_dir, work / "videos") if args.workdir else (work,))


if __name__ == "__main__":
    main()
