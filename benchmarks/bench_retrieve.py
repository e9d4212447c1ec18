"""Interactive retrieval latency: what the re-ranker adds to a query, with and without the gallery store.

Builds, under ``--workdir`` (default: a temporary folder), a synthetic gallery of ``--videos``
videos as a real cache whose header names an open_clip model (``--model``, default ViT-B-32: the
usual MSR-VTT backbone, whose text tower, shared with ViT-B-16, is the smallest of the usual CLIP
backbones, so the least favourable real case). Weights are seeded random ones, as latency depends
on the shapes only (``tvr-toy`` uses the shipped toy weights); ``Retriever`` rebuilds the text
encoder from the cache as in production. Every video is ok, with random unit
``video_emb``/``frame_emb``; its ``--frames`` frames of float16 tokens are drawn from a bank of
4,096 random frames (the values do not change any cost). ``texts/*`` holds 10 captions. The
unpooled layout is used when the tokens fit ``--max-token-gb`` (default 24), else the same
encoder's 2x2-pooled layout (ViT-B-32: 16 x 512-d per frame, 19.7 GB for 100k videos x 12
frames), and the script says so. Then a FAISS index (``build_index_dir``, ``--factory``, default
``auto``: IVF-Flat above 50k videos), a randomly initialised re-ranker (``torch.manual_seed(0)``) of
``--reranker-size``: ``default`` = ``RerankerConfig``'s defaults, what ``tvrerank train`` builds
(width 256, 2 layers, 4 heads, 8 queries, frame_keep 4, video_keep 16), or ``demo`` = the toy
demo's (width 96, 1 layer), saved with ``save_reranker``, and the gallery store
(``build_gallery_store``; its build time and size are printed).

``--queries`` queries (MSR-VTT's 1k-A test captions, the field's standard 1,000 queries, from
``tests/data/annotations``; toy-world captions for ``tvr-toy``) are searched one at a time (batch
size 1, as an interactive user would), top 10 of K = ``--k`` candidates, with the gallery store
and without it side by side (queries interleaved, so background load hits both alike; one
``Retriever``, whose text tower is built once, and ``Retriever.view`` of it without its store).
Each query is split into the phases ``Retriever.search`` runs, by calling its own pieces in its
order: text encode (``encoder.encode_texts``), FAISS search (``Retriever.stage1``), candidate
tokens (``Retriever.candidate_tokens``: the store's K records, or without the store the K full
token grids read from the cache and put through the selectors), re-rank
(``Retriever.score_candidates``, or ``Retriever.candidate_scores`` with the store on the device;
then fusion and ordering by ``Retriever.rank_hits``). p50/p95 are
per-query figures (p50 of the per-query sums, not sums of p50s), after 5 warm-up queries; on CUDA
the device is synchronised before every clock read. ``--threads`` sets torch's and FAISS's CPU
threads as ``tvrerank retrieve --threads`` does (default: their choice); on cores busy with other
work, more threads than idle cores make every small op wait for a descheduled thread, so pass
``--threads 1`` there. ``Retriever.search([query])`` end to end is timed on the first
``--e2e-queries`` queries to cross-check the sum; the rankings of both ways (and of both
configurations) are compared. The files were just written, so reads may come from a warm page
cache; ``--cold`` evicts the cache and store files from it first (``posix_fadvise``), so the
token load pays K random disk reads.

On CUDA ``Retriever`` holds the store on the device and re-ranks each query through a
``QueryScorer`` replayed as a CUDA graph (the script says whether the capture worked; ``--device-store`` takes the same path
eagerly on a CPU, as ``--smoke`` does); its
candidate tokens are gathered inside that step, so that phase reads 0. A third column, "store,
host, batched" (``Retriever.view(device_store=False)``), is the path without it, and
``rerank_overhead_batched=`` its overhead.

Stage-1-only latency = text encode + FAISS. The last line is ``rerank_overhead=<x>``, x = p50 of
re-ranked latency with the store / p50 of stage-1-only latency - 1 (target <= 0.5); the added
milliseconds, the p95 and the no-store variants are printed above it. The ratio is the
re-ranker's cost over the text tower's: with the store the re-ranker only sees width-d selected
tokens, so its cost hardly depends on the backbone, while the text tower grows with it.
``tvr-toy``'s 3-layer, 64-wide text tower costs less than any re-ranker: its ratio is printed,
not a target.

    python benchmarks/bench_retrieve.py [--videos 100000] [--queries 1000] [--k 15] [--frames 12]
        [--model ViT-B-32] [--reranker-size default|demo] [--device auto] [--threads 0]
        [--max-token-gb 24] [--factory auto] [--cold] [--device-store] [--workdir DIR] [--keep]
    python benchmarks/bench_retrieve.py --videos 2000 --queries 50 --threads 1      # quick check
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tvrerank.cache.reader import CacheReader
from tvrerank.cache.schema import OK, CacheHeader
from tvrerank.cache.writer import create_cache
from tvrerank.config import SamplingConfig
from tvrerank.extract.annotations import read_annotations
from tvrerank.devices import resolve_device
from tvrerank.extract.encoder import FrozenClipEncoder
from tvrerank.extract.models import SHIPPED_WEIGHTS
from tvrerank.index.store import build_index_dir
from tvrerank.retrieve.gallery_store import build_gallery_store
from tvrerank.retrieve.retriever import Retriever, set_cpu_threads
from tvrerank.toy.demo import DEMO_TRAINING
from tvrerank.toy.world import captions_for, random_script
from tvrerank.rerank.checkpoint import load_reranker, save_reranker
from tvrerank.rerank.model import RerankerConfig
from tvrerank.rerank.variants import build_reranker

TOP, WARMUP, BANK_FRAMES = 10, 5, 4096
MSRVTT_TEST = Path(__file__).resolve().parents[1] / "tests/data/annotations/msrvtt/MSRVTT_JSFUSION_test.csv"
TEXT_TOKENS = {"tvr-toy": 48}  # the demo's; other models: extract's default (32)
RERANKER_SIZES = {"default": {}, "demo": {k: v for k, v in DEMO_TRAINING["model"].items()
                                          if k not in ("dropout", "perturb_samples")}}
PHASES = ("text encode", "FAISS search", "candidate tokens", "re-rank")
BATCHED = "store, host, batched"  # on a GPU, besides "store" (held on the device): the store read from the host


# --------------------------------------------------------------------------- set-up
def make_encoder(model: str, videos: int, frames: int, max_gb: float) -> FrozenClipEncoder:
    """``model``'s encoder with the finest token layout whose cache tokens fit ``max_gb``."""
    shipped = (model, "toy") in SHIPPED_WEIGHTS and SHIPPED_WEIGHTS[(model, "toy")].is_file()
    for pool in ("none", "2x2"):
        encoder = FrozenClipEncoder(model=model, pretrained="toy" if shipped else None, token_pool=pool,
                                    text_tokens=TEXT_TOKENS.get(model, 32), device="cpu")
        layout = encoder.layout
        size = videos * frames * layout.tokens_per_frame * layout.token_dim * 2
        print(f"{model} token layout pool={pool}: {layout.tokens_per_frame} tokens x {layout.token_dim}-d per "
              f"frame, {size / 1e9:.2f} GB of tokens for {videos} videos x {frames} frames")
        if size <= max_gb * 1e9:
            if pool != "none":
                print(f"  (pooled: the unpooled layout exceeds --max-token-gb {max_gb})")
            return encoder
    raise SystemExit(f"even the 2x2-pooled tokens exceed --max-token-gb {max_gb}: use fewer --videos or --frames")


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def build_cache(path: Path, encoder: FrozenClipEncoder, videos: int, frames: int, seed: int = 0) -> dict:
    """A valid cache of ``videos`` ok videos with random arrays; returns its header's fingerprint."""
    rng = np.random.default_rng(seed)
    layout = encoder.layout
    header = CacheHeader(encoder=encoder.config, sampling=SamplingConfig(frames=frames), layout=layout,
                         dataset={"format": "synthetic", "benchmark": "bench_retrieve"},
                         created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    captions = captions_for(random_script(random.Random(seed)), count=10)
    text_emb, text_tokens, text_length = encoder.encode_texts(captions)
    ids = [f"v{i:07d}" for i in range(videos)]
    frame_shape = (layout.tokens_per_frame, layout.token_dim)
    bank = rng.standard_normal((BANK_FRAMES,) + frame_shape, dtype=np.float32).astype(np.float16)
    with create_cache(path, header, video_ids=ids, video_paths=[f"videos/{i}.mp4" for i in ids],
                      captions=captions, caption_video=np.arange(len(captions), dtype=np.int32)) as f:
        f["videos/status"][:] = OK
        f["videos/frame_mask"][:] = True
        f["texts/emb"][:], f["texts/tokens"][:], f["texts/length"][:] = text_emb, text_tokens, text_length
        block = max(1, (256 << 20) // bank[:frames].nbytes)  # ~256 MB of tokens at a time
        for start in range(0, videos, block):
            n = min(block, videos - start)
            frame_emb = unit(rng.standard_normal((n, frames, layout.embed_dim), dtype=np.float32))
            f["videos/frame_emb"][start : start + n] = frame_emb
            f["videos/video_emb"][start : start + n] = unit(frame_emb.mean(axis=1))
            f["videos/tokens"][start : start + n] = bank[rng.integers(0, BANK_FRAMES, (n, frames))]
    with CacheReader(path) as cache:  # the fingerprint as readers see it (after the JSON round trip)
        return cache.header.fingerprint()


def save_random_reranker(run_dir: Path, encoder: FrozenClipEncoder, frames: int, fingerprint: dict, size: str) -> None:
    """A randomly initialised re-ranker of ``size`` (RERANKER_SIZES), saved as a run folder."""
    layout = encoder.layout
    torch.manual_seed(0)
    config = RerankerConfig(frames=frames, tokens_per_frame=layout.tokens_per_frame, token_dim=layout.token_dim,
                            embed_dim=layout.embed_dim, text_token_dim=layout.text_token_dim,
                            text_tokens=layout.text_tokens, **RERANKER_SIZES[size])
    print(f"re-ranker ({size}): " + ", ".join(f"{k} {getattr(config, k)}" for k in
                                              ("width", "layers", "heads", "queries", "frame_keep", "video_keep")))
    run_dir.mkdir(parents=True, exist_ok=True)
    save_reranker(run_dir, build_reranker(config), fusion_alpha=0.3, fingerprint=fingerprint, step=0,
                  train_config={})


def build_store(cache_path: Path, run_dir: Path, device: torch.device, videos: int) -> None:
    """The gallery store of the saved re-ranker, built and sized as ``tvrerank gallery`` does."""
    trained = load_reranker(run_dir, device)  # eval mode (hard top-k), as the CLI passes it
    path, seconds = timed(build_gallery_store, cache_path, run_dir, trained.model, device=device)
    size = path.stat().st_size
    print(f"gallery store: built in {seconds:.1f}s ({videos / seconds:.0f} videos/s), {size / 1e9:.2f} GB "
          f"({size / videos / 1e3:.1f} kB per video)")


def make_queries(count: int, model: str, seed: int = 1) -> list[str]:
    """Real queries for real models: MSR-VTT's 1k-A test captions in file order (cycled past 1,000);
    toy-world captions of random scripts for the toy encoder (or when the file is missing)."""
    if model != "tvr-toy" and MSRVTT_TEST.is_file():
        captions = [c.text for c in read_annotations([MSRVTT_TEST], "msrvtt", MSRVTT_TEST.parent)]
        print(f"queries: {min(count, len(captions))} MSR-VTT 1k-A test captions ({MSRVTT_TEST.name})")
        return [captions[i % len(captions)] for i in range(count)]
    print("queries: toy-world captions")
    rng = random.Random(seed)
    return [rng.choice(captions_for(random_script(rng))) for _ in range(count)]


def drop_from_page_cache(path: Path) -> None:
    """Write back and evict ``path``'s pages (Linux), so the next reads go to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


# --------------------------------------------------------------------------- measuring
class Clock:
    """Clock reads that wait for the device first (CUDA work is asynchronous)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


@torch.inference_mode()
def query_phases(r: Retriever, query: str, k: int, clock: Clock) -> tuple[dict[str, float], list[str]]:
    """One query through the pieces of ``Retriever.search`` in its order: (seconds per phase, ranking)."""
    k = min(k, len(r.index_rows))
    depth = min(max(TOP, k), len(r.index_rows))
    t0 = clock()
    emb, tokens, lengths = r.encoder.encode_texts([query])
    t1 = clock()
    scores, rows = r.stage1(r.query_embeddings(emb), depth)
    t2 = clock()
    if r.device_store is None:
        selected, pair_video = r.candidate_tokens(rows[:, :k])
        t3 = clock()
        rerank = r.score_candidates(tokens, lengths, rows[:, :k], selected, pair_video)
    else:  # the store is on the device: its records are gathered inside the scorer's step
        t3 = t2
        rerank = r.candidate_scores(tokens, lengths, rows[:, :k])
    result = r.rank_hits(query, scores[0], rows[0], k, TOP, rerank[0])
    t4 = clock()
    return dict(zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3))), [hit.video_id for hit in result.results]


def end_to_end(r: Retriever, query: str, k: int, clock: Clock) -> tuple[float, list[str]]:
    """``Retriever.search([query])`` as a user calls it: (seconds, ranking)."""
    start = clock()
    (result,) = r.search([query], top=TOP, k=k)
    return clock() - start, [hit.video_id for hit in result.results]


def pct(values) -> tuple[float, float]:
    """(p50, p95) in milliseconds."""
    p50, p95 = np.percentile(np.asarray(values) * 1000, [50, 95])
    return float(p50), float(p95)


def measure(configs: dict[str, Retriever], queries: list[str], k: int, e2e_queries: int):
    """Every query through every configuration, interleaved (background load hits both alike).

    Returns (phases: config → phase → seconds per query, e2e: config → seconds, mismatches with
    Retriever.search, queries whose ranking differs between the configurations); warm-ups dropped.
    """
    clock = Clock(next(iter(configs.values())).device)
    phases = {name: {p: [] for p in PHASES} for name in configs}
    e2e = {name: [] for name in configs}
    mismatches, config_differs = 0, 0
    for i, query in enumerate(queries):
        rankings = []
        for name, r in configs.items():
            times, ranking = query_phases(r, query, k, clock)
            rankings.append(ranking)
            if i < WARMUP:
                continue
            for phase, seconds in times.items():
                phases[name][phase].append(seconds)
            if i < WARMUP + e2e_queries:
                seconds, e2e_ranking = end_to_end(r, query, k, clock)
                e2e[name].append(seconds)
                mismatches += e2e_ranking != ranking
        config_differs += i >= WARMUP and any(other != rankings[0] for other in rankings[1:])
    return phases, e2e, mismatches, config_differs


def report(phases: dict, e2e: dict, mismatches: int, config_differs: int) -> None:
    """The table (p50 / p95 ms per phase and totals), the cross-checks and the overhead lines."""
    names = list(phases)

    def total(name: str, chosen) -> np.ndarray:  # per-query sums of phases
        return np.sum([phases[name][p] for p in chosen], axis=0)

    rows = [(p, {n: phases[n][p] for n in names}) for p in PHASES]
    rows.append(("stage 1 only (encode + FAISS)", {n: total(n, PHASES[:2]) for n in names}))
    rows.append(("re-ranked total (sum of phases)", {n: total(n, PHASES) for n in names}))
    if e2e[names[0]]:
        rows.append((f"Retriever.search, first {len(e2e[names[0]])} queries", e2e))
    print(f"{'':34}" + "".join(f"{n:>22}" for n in names))
    for label, values in rows:
        print(f"{label:34}" + "".join(f"{'%.2f / %.2f' % pct(values[n]):>22}" for n in names))
    queries = len(phases[names[0]][PHASES[0]])
    print(f"phase-by-phase rankings identical to Retriever.search: {mismatches == 0} ({mismatches} differ); "
          f"between the columns: {config_differs} of {queries} rankings differ")
    stage1 = pct(total("store", PHASES[:2]))
    with_store, without = pct(total("store", PHASES)), pct(total("no store", PHASES))
    print(f"rerank_added_ms={with_store[0] - stage1[0]:.1f} (p50 with the store, over stage 1's {stage1[0]:.1f})")
    print(f"rerank_overhead_no_store={without[0] / stage1[0] - 1:.2f}")
    if BATCHED in phases:
        print(f"rerank_overhead_batched={pct(total(BATCHED, PHASES))[0] / stage1[0] - 1:.2f}")
    print(f"rerank_overhead_p95={with_store[1] / stage1[1] - 1:.2f}")
    print(f"rerank_overhead={with_store[0] / stage1[0] - 1:.2f}")


# --------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--e2e-queries", type=int, default=100, help="queries also timed via Retriever.search")
    parser.add_argument("--k", type=int, default=15)
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model of the gallery (tvr-toy: the toy encoder)")
    parser.add_argument("--reranker-size", default="default", choices=sorted(RERANKER_SIZES))
    parser.add_argument("--max-token-gb", type=float, default=24.0)
    parser.add_argument("--threads", type=int, default=0, help="torch and FAISS CPU threads (0: their default)")
    parser.add_argument("--factory", default="auto", help="FAISS factory for build_index_dir (auto or Flat, ...)")
    parser.add_argument("--cold", action="store_true", help="evict the cache and store files from the page cache")
    parser.add_argument("--workdir", help="where to build (default: a temporary folder; 100k ViT-B-32 videos "
                                          "need ~28 GB)")
    parser.add_argument("--keep", action="store_true", help="keep the working folder")
    parser.add_argument("--device-store", action="store_true", help="hold the store on the device and score "
                        "query by query on a CPU too (eagerly; what a GPU does as a CUDA graph)")
    parser.add_argument("--smoke", action="store_true", help="seconds-long check that the script runs (300 toy "
                        "videos, the demo's re-ranker, CPU)")
    args = parser.parse_args()
    if args.smoke:
        args.videos, args.queries, args.e2e_queries, args.model = 300, 10, 3, "tvr-toy"
        args.reranker_size, args.factory, args.device, args.device_store = "demo", "Flat", "cpu", True
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("tvrerank.extract.annotations").setLevel(logging.ERROR)  # the queries' videos are absent
    device = resolve_device(args.device)
    if args.threads:
        set_cpu_threads(args.threads)  # torch and FAISS, as `tvrerank retrieve --threads`
    print(f"torch threads: {torch.get_num_threads()}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-retrieve-"))
    work.mkdir(parents=True, exist_ok=True)
    cache_path, index_dir, run_dir = work / "gallery.h5", work / "index", work / "run"
    try:
        encoder = make_encoder(args.model, args.videos, args.frames, args.max_token_gb)
        fingerprint, seconds = timed(build_cache, cache_path, encoder, args.videos, args.frames)
        print(f"cache: {args.videos} videos in {seconds:.1f}s, {cache_path.stat().st_size / 1e9:.2f} GB "
              f"({work}{', kept' if args.keep else ', removed at the end'})")
        config, seconds = timed(build_index_dir, cache_path, index_dir, args.factory)
        print(f"index: {config.factory} {config.search_params} ({config.reason}) in {seconds:.1f}s")
        save_random_reranker(run_dir, encoder, args.frames, fingerprint, args.reranker_size)
        build_store(cache_path, run_dir, device, args.videos)

        if args.cold:
            for path in (cache_path, *run_dir.glob("gallery/*.h5")):
                drop_from_page_cache(path)
            print("page cache: the cache and store files evicted (--cold)")
        on_device = True if args.device_store else None  # None: Retriever's choice (on CUDA when it fits)
        retriever = Retriever(cache_path, index_dir, run_dir, device=args.device, device_store=on_device)
        assert retriever.store is not None, "Retriever did not find the gallery store"
        configs = {"store": retriever, "no store": retriever.view(use_store=False)}
        if retriever.device_store is not None:  # on a GPU: also the store read from the host, batched
            configs = {"store": retriever, BATCHED: retriever.view(device_store=False), **configs}
            graphed = retriever.query_scorer(min(args.k, len(retriever.index_rows))).graph
            how = ("as a CUDA graph" if graphed is not None else "eagerly (CUDA graphs need a GPU)"
                   if device.type != "cuda" else "eagerly (the CUDA graph capture failed: see the warning)")
            print(f"re-rank: the store on the device, one query at a time, {how}")
            print(f"rerank_cuda_graph={int(graphed is not None)}")
        try:
            results = measure(configs, make_queries(args.queries + WARMUP, args.model), args.k, args.e2e_queries)
        finally:
            retriever.close()  # the other columns are views of it
        print(f"\nper-query latency, batch size 1, {args.queries} queries, K={args.k}, top {TOP}, "
              f"{args.videos} videos, device {configs['store'].device} (ms, p50 / p95)")
        report(*results)
    finally:
        if not args.keep:  # only what this script made: a given --workdir may hold other things
            remove_made((cache_path, index_dir, run_dir) if args.workdir else (work,))


def remove_made(paths) -> None:
    """Delete the files and folders a benchmark made (missing ones are fine)."""
    for made in paths:
        if made.is_dir():
            shutil.rmtree(made, ignore_errors=True)
        else:
            made.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
