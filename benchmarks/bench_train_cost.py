"""Training cost with the token cache vs. without it, and how fast the cache hands out tokens.

Builds a cache in a temporary folder with ``create_cache`` (random float16 arrays laid out as
``--model``'s joint tokens, measured without weights by ``plan.measure_layout``; every video ok),
then measures:

1. One re-ranker training step (``train.loop.train_step``: forward + backward + gradient
   clipping + AdamW step; listwise loss; bf16 autocast on CUDA) on a step of B captions (``--captions``,
   default TrainConfig's 32), each paired with G = 1 + 7 hard negatives + 4 in-batch videos
   (384 pairs at the defaults), over U unique videos (``--videos-per-step``, default
   B x (1 + negatives) = 256: each caption's positive and its hard negatives; in-batch negatives
   are other captions' positives) of T frames (``--frames``) each:

   - ``cached, in memory``: the cache's arrays loaded once (``CacheRows(in_memory="on")``, held on the
     GPU when there is one), the step's rows gathered from them, moved and decoded (``on_device``),
     then the step: what ``train --in-memory auto`` does when the cache fits;
   - ``cached, streamed``: reading the step's rows from the HDF5 file (``CacheRows(in_memory="off")`` on
     random, sorted, unique rows, ``CacheRows.texts`` for the captions), copying them to the device,
     then the step;
   - ``uncached``: what training without a cache pays: the U x T frames go through the frozen
     open_clip image tower (``--model``, real architecture, seeded random weights, ``--precision``,
     under ``torch.no_grad()``, ``--tower-batch`` frames at a time; preprocessing, last-block patch
     tokens through the visual projection and the pooled embedding, as the extractor computes
     them), then the same step. The frames are pre-decoded uint8 arrays in memory and the caption
     tokens are given ready (no decoding, no text tower), which favours this path: the ratio is
     conservative.

   Each figure is the median of ``--repeats`` steps after one warm-up step of each path (the paths take
   turns within each repeat, so a machine whose speed drifts during the run biases none of them), all after
   ``--warmup`` rounds of one step on cache rows and one on random float32 tokens (CUDA's first
   steps pay for set-up, and each input dtype for its own kernels); every step's parts are printed; on CUDA the device is synchronised before every clock read. Target: ``cache_speedup`` >= 100 on CPU at ViT-B-16 shapes (issue 25).
2. Token read throughput: ``CacheRows.videos`` on ``--read-videos`` random rows (default U; tokens float16
   on disk and out), the bare h5py fancy-index read of the same rows (what ``CacheRows`` does inside),
   the same rows read one at a time (``read_direct`` into one array), and a plain sequential
   ``np.fromfile`` of a flat file holding the same bytes, in MB/s of stored bytes (best of
   ``max(repeats, 2)`` draws of rows). All read files just written, so from a warm page cache;
   cold-disk figures would be lower for all four.

The last line is ``cache_speedup=<x>`` (uncached step time / in-memory cached step time). On a machine
whose cores are busy with other work, pass ``--threads 1``: torch's default of one thread per
core then oversubscribes them and small steps slow down tenfold.

    python benchmarks/bench_train_cost.py [--model ViT-B-16] [--device auto] [--precision fp32]
        [--frames 12] [--captions 32] [--videos-per-step 256] [--cache-videos 512] [--repeats 3]
        [--width 256] [--layers 2] [--tower-batch 64] [--threads N]
    python benchmarks/bench_train_cost.py --smoke
    python benchmarks/bench_train_cost.py --model ViT-bigG-14 --device cuda --precision bf16
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TEXT_TOKENS = 32
TINY = Path(__file__).resolve().parents[1] / "tests" / "data" / "models" / "tiny-vit.json"


# --------------------------------------------------------------------------- set-up
def build_cache(path: Path, model: str, layout: dict, videos: int, frames: int, seed: int = 0) -> None:
    """A valid cache of ``videos`` ok videos (one caption each) with random float16 arrays."""
    from tvrerank.cache.schema import OK, CacheHeader
    from tvrerank.cache.writer import create_cache
    from tvrerank.config import EncoderConfig, SamplingConfig, TokenLayout

    rng = np.random.default_rng(seed)
    e, p, d, dt = layout["embed_dim"], layout["tokens_per_frame"], layout["token_dim"], layout["text_token_dim"]
    header = CacheHeader(
        encoder=EncoderConfig(model=model), sampling=SamplingConfig(frames=frames), dataset={"format": "synthetic"},
        layout=TokenLayout(grid=layout["grid"], tokens_per_frame=p, token_dim=d, text_token_dim=dt, embed_dim=e,
                           text_tokens=TEXT_TOKENS))
    random = lambda *shape: rng.standard_normal(shape, dtype=np.float32).astype(np.float16)  # noqa: E731
    with create_cache(path, header, video_ids=[f"v{i}" for i in range(videos)],
                      video_paths=[f"v{i}.mp4" for i in range(videos)],
                      captions=[f"caption {i}" for i in range(videos)],
                      caption_video=np.arange(videos, dtype=np.int32)) as f:
        f["videos/status"][:] = OK
        f["videos/frame_mask"][:] = True
        f["videos/video_emb"][:] = random(videos, e)
        f["videos/frame_emb"][:] = random(videos, frames, e)
        for lo in range(0, videos, 16):  # bounded memory for large token widths
            hi = min(videos, lo + 16)
            f["videos/tokens"][lo:hi] = random(hi - lo, frames, p, d)
        f["texts/emb"][:] = random(videos, e)
        f["texts/tokens"][:] = random(videos, TEXT_TOKENS, dt)
        f["texts/length"][:] = rng.integers(8, TEXT_TOKENS + 1, videos)


def step_groups(b: int, u: int, negatives: int, in_batch: int, rng: np.random.Generator) -> np.ndarray:
    """(B, G) indices into the step's U videos: positive, hard negatives, then in-batch negatives.

    Caption i's positive is video i mod U; the videos that are nobody's positive serve, in turn, as
    the hard negatives; in-batch negatives are other captions' positives, topped up at random from
    the other videos when there are too few (as ``TrainingBatches.group_rows`` does).
    """
    if u < 2:
        raise SystemExit("--videos-per-step must be at least 2")
    positives = np.arange(b) % u
    pool = np.arange(min(b, u), u)
    groups = np.empty((b, 1 + negatives + in_batch), np.int64)
    for i, positive in enumerate(positives):
        others = np.setdiff1d(np.arange(u), [positive])
        hard = pool[(i * negatives + np.arange(negatives)) % len(pool)] if len(pool) else rng.choice(others, negatives)
        mates = rng.permutation(np.setdiff1d(positives, [positive]))[:in_batch]
        groups[i] = [positive, *hard, *mates, *rng.choice(others, in_batch - len(mates))]
    return groups


# --------------------------------------------------------------------------- the two paths
def sync(device) -> None:
    """Wait for queued device work (CUDA only)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_step(model, optimizer, videos: dict, texts: dict, pair_video, device) -> None:
    """One step of the training loop (``train.loop.train_step``, the default TrainConfig) on tensors on the device."""
    from tvrerank.train.loop import TrainConfig, train_step

    config = TrainConfig()
    train_step(model, optimizer, iter([{**videos, **texts, "pair_video": pair_video}]), config=config,
               lr=config.optim.lr, device=device, step=0)


def tower_features(encoder, frames: np.ndarray, chunk: int) -> dict:
    """(U, T, S, S, 3) uint8 → tokens (U, T, P, D), frame_emb (U, T, E), frame_mask on the device.

    ``FrozenClipEncoder.frames_on_device``, what extraction runs, without the copy to host:
    preprocess, last-block tokens (final norm) through the visual projection, L2-normalised pooled
    embedding.
    """
    import torch

    u, t = frames.shape[:2]
    flat = frames.reshape(u * t, *frames.shape[2:])
    embs, tokens = zip(*(encoder.frames_on_device(flat[lo:lo + chunk])[:2] for lo in range(0, len(flat), chunk)))
    return {"tokens": torch.cat(tokens).view(u, t, *tokens[0].shape[1:]),
            "frame_emb": torch.cat(embs).view(u, t, -1),
            "frame_mask": torch.ones(u, t, dtype=torch.bool, device=encoder.device)}


def timed(fn, device) -> float:
    """Seconds ``fn()`` takes, with the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def measure_steps(args, cache: Path, encoder, model, device, groups) -> tuple[dict, dict, dict]:
    """Median seconds of the cached steps (tokens held in memory, streamed from the file) and the uncached
    step, and of their parts: ({part: s}, {part: s}, {part: s})."""
    import torch

    from tvrerank.cache.rows import CacheRows
    from tvrerank.cache.rows import on_device as to_device

    from tvrerank.train.loop import TrainConfig
    from tvrerank.training import build_optimizer

    rows_reader = CacheRows(cache, in_memory="off")  # read from the file, as for a cache over the budget
    held = CacheRows(cache, in_memory="on", device=device)  # loaded once (on the GPU when there is one)
    held.videos(np.arange(2)), held.texts(np.arange(2))
    optimizer = build_optimizer(model, TrainConfig().optim)
    rng = np.random.default_rng(1)
    u, b = args.videos_per_step, args.captions
    pair_video = torch.from_numpy(groups).to(device)
    size = encoder.config.image_size
    frames = rng.integers(0, 256, (u, args.frames, size, size, 3), dtype=np.uint8)
    texts_ready = {k: v.to(device) for k, v in rows_reader.texts(np.arange(b)).items()}
    on_device = lambda batch: to_device(batch, device, non_blocking=True)  # noqa: E731
    model.train()

    def from_rows(source, parts: dict) -> None:
        rows = np.sort(rng.choice(args.cache_videos, u, replace=False))
        captions = np.sort(rng.choice(args.cache_videos, b, replace=False))
        videos, texts = {}, {}
        parts["read"] = timed(lambda: (videos.update(on_device(source.videos(rows))),
                                       texts.update(on_device(source.texts(captions)))), device)
        parts["step"] = timed(lambda: one_step(model, optimizer, videos, texts, pair_video, device), device)

    def streamed(parts: dict) -> None:
        from_rows(rows_reader, parts)

    def in_memory(parts: dict) -> None:
        from_rows(held, parts)

    def uncached(parts: dict) -> None:
        videos = {}
        parts["tower"] = timed(lambda: videos.update(tower_features(encoder, frames, args.tower_batch)), device)
        parts["step"] = timed(lambda: one_step(model, optimizer, videos, texts_ready, pair_video, device), device)

    # On CUDA the first steps pay for context set-up, kernel loading and memory-pool growth (on an
    # H200: 6.9 s, 3.5 s, 3.1 s, then 44 ms): the step runs alone until that is paid, so that the
    # path timed first does not carry it. Both paths' inputs are warmed: the cache's float16 rows and
    # the tower's float32 tokens take different kernels (an H200 paid 2-2.6 s for each new one).
    layout = encoder.layout
    warm_tower = {"tokens": torch.randn(u, args.frames, layout.tokens_per_frame, layout.token_dim, device=device),
                  "frame_emb": torch.randn(u, args.frames, layout.embed_dim, device=device),
                  "frame_mask": torch.ones(u, args.frames, dtype=torch.bool, device=device)}
    warm_cache = on_device(rows_reader.videos(np.arange(u)))
    for i in range(args.warmup):
        seconds = [timed(lambda: one_step(model, optimizer, warm, texts_ready, pair_video, device), device)
                   for warm in (warm_cache, warm_tower)]
        print(f"  step warm-up {i + 1}: {seconds[0] * 1000:.1f} ms on cache rows, {seconds[1] * 1000:.1f} ms on "
              "tower-like float32 tokens")
    # the paths take turns within each repeat, so that a machine slowing down or speeding up during the
    # run (other work on it, the first minutes' page cache) is shared by all three instead of biasing one
    paths = (in_memory, streamed, uncached)
    samples: dict = {path: [] for path in paths}
    for repeat in range(args.repeats + 1):  # the first is the warm-up
        for path in paths:
            parts = {}
            path(parts)
            print(f"  {path.__name__} {'warm-up' if repeat == 0 else f'repeat {repeat}'}: "
                  + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in parts.items()))
            if repeat:
                samples[path].append(dict(parts, total=sum(parts.values())))
    results = [{k: statistics.median(s[k] for s in samples[path]) for k in samples[path][0]} for path in paths]
    return results[0], results[1], results[2]


# --------------------------------------------------------------------------- read throughput
READS = ("CacheRows.videos", "h5py fancy index", "h5py row by row", "plain file")


def row_by_row(dataset, rows: np.ndarray) -> np.ndarray:
    """``dataset[rows]`` as one ``read_direct`` per row into a preallocated array."""
    out = np.empty((len(rows),) + dataset.shape[1:], dataset.dtype)
    for i, row in enumerate(rows):
        dataset.read_direct(out, np.s_[int(row)], np.s_[i])
    return out


def read_throughput(cache: Path, folder: Path, args) -> dict[str, float]:
    """MB/s (stored bytes) of each way in ``READS`` of reading a step's video rows; best of the draws."""
    import h5py

    from tvrerank.cache.rows import VIDEO_FIELDS, CacheRows

    rng = np.random.default_rng(2)
    reader, best = CacheRows(cache, memory_budget=0), dict.fromkeys(READS, 0.0)
    with h5py.File(cache, "r") as f:
        for _ in range(max(args.repeats, 2)):
            rows = np.sort(rng.choice(args.cache_videos, args.read_videos, replace=False))
            arrays = [row_by_row(f[f"videos/{k}"], rows) for k in VIDEO_FIELDS]
            size = sum(a.nbytes for a in arrays)
            flat = folder / "plain.bin"
            with open(flat, "wb") as out:
                for array in arrays:
                    out.write(array.tobytes())
            for name, read in zip(READS, (lambda: reader.videos(rows),
                                          lambda: [f[f"videos/{k}"][rows] for k in VIDEO_FIELDS],
                                          lambda: [row_by_row(f[f"videos/{k}"], rows) for k in VIDEO_FIELDS],
                                          lambda: np.fromfile(flat, np.uint8))):
                start = time.perf_counter()
                read()
                best[name] = max(best[name], size / 1e6 / (time.perf_counter() - start))
    best["bytes"] = size
    return best


# --------------------------------------------------------------------------- main
def quiet_random_weights() -> None:
    """Drop open_clip's and our own random-weights warnings (random weights are the point here)."""
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda record: "initialized randomly" not in record.getMessage())
    logging.getLogger("tvrerank.extract.models").setLevel(logging.ERROR)


def main() -> None:
    from tvrerank.train.loop import TrainConfig

    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16", help="any open_clip model name (random weights)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="of the image tower")
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--captions", type=int, default=defaults.captions, help="B, captions per step")
    parser.add_argument("--videos-per-step", type=int, default=None,
                        help="U, unique videos per step (default captions x (1 + negatives))")
    parser.add_argument("--cache-videos", type=int, default=None, help="videos in the cache (default 2 U)")
    parser.add_argument("--tower-batch", type=int, default=64, help="frames per image-tower forward")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3, help="steps run alone before either path is timed")
    parser.add_argument("--read-videos", type=int, default=None,
                        help="rows per draw in the read-throughput part (default U, a step's videos)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="seconds-long check that the script runs (tiny "
                        "model, 4 captions, 4 frames, CPU)")
    args = parser.parse_args()
    if args.smoke:
        args.model, args.device, args.captions, args.videos_per_step = str(TINY), "cpu", 4, 8
        args.frames, args.repeats, args.width, args.layers, args.warmup = 4, 1, 32, 1, 1
    args.videos_per_step = args.videos_per_step or args.captions * (1 + defaults.negatives)
    args.cache_videos = max(args.cache_videos or 2 * args.videos_per_step, args.videos_per_step, args.captions)
    args.read_videos = min(args.read_videos or args.videos_per_step, args.cache_videos)
    sys.stdout.reconfigure(line_buffering=True)
    quiet_random_weights()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from tvrerank.devices import resolve_device
    from tvrerank.extract.encoder import FrozenClipEncoder
    from tvrerank.extract.plan import measure_layout
    from tvrerank.rerank.model import RerankerConfig
    from tvrerank.rerank.variants import build_reranker

    layout = measure_layout(args.model, "joint", "none")
    device = resolve_device(args.device)
    groups = step_groups(args.captions, args.videos_per_step, defaults.negatives, defaults.in_batch,
                         np.random.default_rng(0))
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "bench.h5"
        start = time.perf_counter()
        build_cache(cache, args.model, layout, args.cache_videos, args.frames)
        print(f"cache: {args.cache_videos} videos x {args.frames} frames x {layout['tokens_per_frame']} tokens x "
              f"{layout['token_dim']} ({args.model} joint, grid {layout['grid']}), "
              f"{cache.stat().st_size / 2**20:.0f} MiB written in {time.perf_counter() - start:.1f} s")

        encoder = FrozenClipEncoder(model=args.model, pretrained=None, precision=args.precision, device=args.device)
        if (encoder.layout.tokens_per_frame, encoder.layout.token_dim) != (layout["tokens_per_frame"],
                                                                           layout["token_dim"]):
            raise SystemExit(f"measure_layout {layout} disagrees with the encoder's layout {encoder.layout}")
        torch.manual_seed(0)
        model = build_reranker(RerankerConfig(
            frames=args.frames, tokens_per_frame=layout["tokens_per_frame"], token_dim=layout["token_dim"],
            embed_dim=layout["embed_dim"], text_token_dim=layout["text_token_dim"], text_tokens=TEXT_TOKENS,
            width=args.width, layers=args.layers)).to(device)
        cached, streamed, uncached = measure_steps(args, cache, encoder, model, device, groups)
        print_steps(args, groups, encoder, model, device, cached, streamed, uncached)
        reads = read_throughput(cache, Path(tmp), args)

    print(f"token read of {args.read_videos} random videos ({reads['bytes'] / 1e6:.1f} MB stored; warm page cache; "
          f"best of {max(args.repeats, 2)}):")
    for name in READS:
        print(f"  {name:<17} {reads[name]:9.0f} MB/s")
    print(f"  plain_file_over_cacherows={reads['plain file'] / reads['CacheRows.videos']:.2f} "
          f"plain_file_over_h5py_fancy={reads['plain file'] / reads['h5py fancy index']:.2f}")
    print(f"cache_speedup={uncached['total'] / cached['total']:.1f}")


def print_steps(args, groups, encoder, model, device, cached: dict, streamed: dict, uncached: dict) -> None:
    """The steps' summary, printed before the read part (so a run cut short there still shows it)."""
    import torch

    threads = f", {torch.get_num_threads()} torch threads" if device.type == "cpu" else ""
    print(f"step: B={args.captions} captions x G={groups.shape[1]} = {groups.size} pairs over "
          f"U={args.videos_per_step} videos x {args.frames} frames ({args.videos_per_step * args.frames} frames "
          f"at {encoder.config.image_size}px); re-ranker width {args.width}, {args.layers} layers, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters; {device.type}{threads}; "
          f"tower {args.model} {args.precision}; median of {args.repeats} after 1 warm-up")
    print(f"  cached, in memory: {cached['total'] * 1000:10.1f} ms = gather {cached['read'] * 1000:.1f} ms "
          f"+ re-ranker step {cached['step'] * 1000:.1f} ms")
    print(f"  cached, streamed:  {streamed['total'] * 1000:10.1f} ms = read {streamed['read'] * 1000:.1f} ms "
          f"+ re-ranker step {streamed['step'] * 1000:.1f} ms (in-memory gather "
          f"{streamed['read'] / max(cached['read'], 1e-9):.1f}x faster than the read)")
    print(f"  uncached:          {uncached['total'] * 1000:10.1f} ms = image tower {uncached['tower'] * 1000:.1f} ms "
          f"+ re-ranker step {uncached['step'] * 1000:.1f} ms (ratio {uncached['total'] / cached['total']:.2f} in memory, "
          f"{uncached['total'] / streamed['total']:.2f} streamed)")


if __name__ == "__main__":
    main()
