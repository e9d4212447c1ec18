"""The compact cache, measured side by side: bytes, read rate, token fidelity and the demo's R@1 per encoding.

1. **Bytes** per video and per caption of every token encoding (float16, int8, float8) and pool (1, 2) at
   ViT-B-16 and ViT-bigG-14 shapes (``extract.plan``: the schema's arrays; 12 frames, 32 caption
   tokens), and the total of ``plan --model ViT-bigG-14 --videos 10000 --captions 200000``.
2. **Token read rate** of a training step: ``CacheRows.videos`` (the rows as stored), then also
   ``on_device`` (decoded to float32 on the CPU), on U random sorted rows (a step's videos; ``--videos-per-step``) of a cache at ``--model``'s shapes
   (random tokens), streaming from the file (``in_memory off``) vs held in memory (``on``), per encoding;
   tokens/s, best of ``--repeats`` draws, warm page cache. ``memory_over_streaming`` is the ratio.
3. **Cosine** between each frame patch / caption token as float16 and after the 8-bit round trip
   (``cache.encoding``), for the shipped toy encoder and a random-weight ViT-B-16 over the toy world's
   rendered clips (mean and 1st percentile).
4. **The demo's re-ranked R@1** per encoding and pool on ``--seeds`` seeds: the toy world and its float16
   caches are made once per seed (``toy.demo.prepare_world``), every other encoding is ``cache compact`` of
   them (which gives what extracting with that encoding gives: tests/test_compact.py), and two re-rankers
   are trained and evaluated on each with the demo's budget: the demo's own (each frame's global token)
   and the method's default (global + top-M patches per frame, ``frame_tokens top_m``), which is the one
   pooling can change. Also, for the 8-bit rows, the float16-trained re-ranker on the 8-bit test cache:
   the fraction of test captions whose fused ranking of the top K is identical.

Figures go to stdout; the last line is ``int8_r1_delta=<mean R@1 int8 - float16>``.

    python benchmarks/bench_cache.py [--seeds 3] [--model ViT-B-16] [--skip-demo]
    python benchmarks/bench_cache.py --smoke
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_cost import build_cache, quiet_random_weights  # noqa: E402  (a cache at a model's shapes)

TOKEN_DTYPES = ("float16", "int8", "float8")
ENCODINGS = (("float16", "none"), ("int8", "none"), ("float8", "none"), ("float16", "2x2"), ("int8", "2x2"))


def human(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024


# --------------------------------------------------------------------------- 1. bytes
def sizes(models: list[str]) -> None:
    from tvrerank.extract.plan import plan_every_option

    print("bytes per video (12 frames) and per caption (32 tokens), from the schema:")
    print(f"  {'model':<13}{'tokens':<9}{'pool':<6}{'per video':>12}{'per caption':>13}{'10k/200k':>11}")
    for model in models:
        for plan in plan_every_option(model, 10000, captions=200000):
            per_video = (plan.bytes_tokens + plan.bytes_embeddings) / plan.videos
            print(f"  {model:<13}{plan.token_dtype:<9}{'1' if plan.pool == 'none' else '2':<6}"
                  f"{human(per_video):>12}{human(plan.bytes_text / plan.captions):>13}{human(plan.bytes_total):>11}")


# --------------------------------------------------------------------------- 2. read rate
def read_rates(model: str, videos_per_step: int, cache_videos: int, frames: int, repeats: int) -> dict:
    import torch

    from tvrerank.cache.compact import compact_cache
    from tvrerank.cache.rows import CacheRows, on_device
    from tvrerank.extract.plan import measure_layout

    layout = measure_layout(model, "joint", "none")
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "float16.h5"
        build_cache(source, model, layout, cache_videos, frames)
        caches = {"float16": source}
        for dtype in TOKEN_DTYPES[1:]:
            caches[dtype] = compact_cache(source, Path(tmp) / f"{dtype}.h5", token_dtype=dtype, progress=False)
        tokens = videos_per_step * frames * layout["tokens_per_frame"]
        print(f"token read of a step: {videos_per_step} random videos x {frames} frames x "
              f"{layout['tokens_per_frame']} tokens x {layout['token_dim']} ({model} shapes, a {cache_videos}-video "
              f"cache), decoded to float32 on the CPU; best of {repeats}:")
        rng = np.random.default_rng(0)
        for dtype, path in caches.items():
            for mode in ("off", "on"):
                rows_source = CacheRows(path, in_memory=mode)
                rows_source.videos(np.arange(2))  # loads the arrays once when held in memory
                read = decoded = 0.0
                for _ in range(repeats):
                    rows = np.sort(rng.choice(cache_videos, videos_per_step, replace=False))
                    start = time.perf_counter()
                    batch = rows_source.videos(rows)
                    middle = time.perf_counter()
                    on_device(batch, torch.device("cpu"))
                    end = time.perf_counter()
                    read, decoded = max(read, tokens / (middle - start)), max(decoded, tokens / (end - start))
                rates[(dtype, mode)], rates[(dtype, mode, "decoded")] = read, decoded
            print(f"  {dtype:<8} rows as stored: streaming {rates[(dtype, 'off')] / 1e6:7.2f}, in memory "
                  f"{rates[(dtype, 'on')] / 1e6:7.2f} M tokens/s (memory_over_streaming="
                  f"{rates[(dtype, 'on')] / rates[(dtype, 'off')]:.1f}); decoded to float32 too: "
                  f"{rates[(dtype, 'off', 'decoded')] / 1e6:.2f}, {rates[(dtype, 'on', 'decoded')] / 1e6:.2f} M tokens/s")
    return rates


# --------------------------------------------------------------------------- 3. cosine
def measured_bytes(cache: Path, folder: Path, mean_length: float) -> None:
    """Bytes on disk per video (its datasets) and per caption of ``cache`` and of its compact forms."""
    import h5py

    from tvrerank.cache.compact import compact_cache

    print(f"measured on disk, the toy world's test split (captions {mean_length:.1f} real tokens of 48 on average):")
    for dtype, pool in ENCODINGS:
        path = cache if (dtype, pool) == ("float16", "none") else compact_cache(
            cache, folder / f"m-{dtype}-{pool}.h5", token_dtype=dtype, pool=pool, progress=False)
        with h5py.File(path, "r") as f:
            stored = {group: sum(f[group][name].id.get_storage_size() for name in f[group]
                                 if not h5py.check_string_dtype(f[group][name].dtype)) for group in ("videos", "texts")}
            videos, captions = len(f["videos/id"]), len(f["texts/video"])
        print(f"  {dtype:<8} pool {'1' if pool == 'none' else '2'}: {human(stored['videos'] / videos):>10} per video, "
              f"{human(stored['texts'] / captions):>10} per caption")


def token_cosines(models: list[tuple[str, str | None]], videos: int, workers: int) -> None:
    import h5py
    import torch

    from tvrerank.cache.encoding import decode_tokens, encode_tokens
    from tvrerank.config import ExtractConfig
    from tvrerank.extract.runner import run_extraction
    from tvrerank.toy.make import ToyWorldConfig, make_toy_world

    print("cosine of each token to its float16 value after the 8-bit round trip (mean / 1st percentile):")
    with tempfile.TemporaryDirectory() as tmp:
        data = make_toy_world(Path(tmp) / "data", ToyWorldConfig(videos=max(videos, 8), seed=0), progress=False)
        for model, pretrained in models:
            out = Path(tmp) / "c.h5"
            run_extraction(ExtractConfig(annotations=(str(data / "test.jsonl"),), format="jsonl", videos=str(data),
                                         out=str(out), model=model, pretrained=pretrained, workers=workers,
                                         device="cpu", text_tokens=48, overwrite=True), progress=False)
            with h5py.File(out, "r") as f:
                groups = {"frame patches": f["videos/tokens"][()], "caption tokens": f["texts/tokens"][()]}
                mean_length = float(f["texts/length"][()].mean())
            if pretrained is not None:  # the toy encoder's caches: their bytes on disk, per encoding
                measured_bytes(out, Path(tmp), mean_length)
            for group, values in groups.items():
                values = values.reshape(-1, values.shape[-1]).astype(np.float32)
                values = values[np.abs(values).max(axis=1) > 0]
                cells = []
                for dtype in TOKEN_DTYPES[1:]:
                    codes, scale = encode_tokens(values, dtype)
                    back = decode_tokens(torch.from_numpy(codes), torch.from_numpy(scale))
                    cos = torch.nn.functional.cosine_similarity(back, torch.from_numpy(values), dim=-1).numpy()
                    cells.append(f"{dtype} {cos.mean():.5f} / {np.percentile(cos, 1):.5f}")
                label = f"{model}{' (random weights)' if pretrained is None else ''}"
                print(f"  {label:<28} {group:<15} {len(values):>7} tokens   " + "   ".join(cells))


# --------------------------------------------------------------------------- 4. demo R@1
def candidates_of(cache: Path, k: int) -> Path:
    """CACHE's index (beside it) and top-K candidate lists, as the demo makes them; returns the lists' file.
    (The embeddings are the float16 cache's, so the lists are too; an index records its cache's encoding.)"""
    from tvrerank.index.candidates import build_candidates, write_candidates
    from tvrerank.index.store import build_index_dir

    index = cache.with_suffix(".index")
    build_index_dir(cache, index)
    out = cache.with_suffix(".candidates.h5")
    write_candidates(out, build_candidates(cache, k=k, index_dir=index), cache)
    return out


#: the re-rankers trained on each encoding: the demo's (each frame's global token only, which reads no patch,
#: so pooling cannot change it) and the method's default (global + top-M patches per frame)
MODELS = {"demo (global)": {}, "method (top-M patches)": {"frame_tokens": "top_m"}}


def demo_rows(seeds: list[int], videos: int, steps: int | None, workers: int) -> dict:
    """{"r1": {(model, dtype, pool): [(stage-1 R@1, re-ranked R@1) per seed]},
    "agreement": {(model, dtype): [fraction of test captions ranked identically per seed]}}."""
    import dataclasses

    import torch

    from tvrerank.cache.compact import compact_cache
    from tvrerank.evaluation import evaluate_run, load_lists
    from tvrerank.rerank.checkpoint import load_reranker
    from tvrerank.rerank.inference import rerank_scores
    from tvrerank.rerank.ranking import fused_scores, order_candidates
    from tvrerank.toy.demo import SPLITS, DemoConfig, demo_training, prepare_world
    from tvrerank.train.loop import train

    results, agreement, cpu = {}, {}, torch.device("cpu")
    for seed in seeds:
        with tempfile.TemporaryDirectory() as tmp:
            config = DemoConfig(out=tmp, seed=seed, videos=videos, workers=workers)
            config = config if steps is None else dataclasses.replace(config, steps=steps)
            _, caches, by_k = prepare_world(Path(tmp), config, progress=False)
            encoded = {("float16", "none"): (caches, by_k[config.k])}
            for dtype, pool in ENCODINGS[1:]:
                split_caches = {split: compact_cache(caches[split], Path(tmp) / f"{split}-{dtype}-{pool}.h5",
                                                     token_dtype=dtype, pool=pool, progress=False) for split in SPLITS}
                encoded[(dtype, pool)] = split_caches, {split: candidates_of(split_caches[split], config.k)
                                                        for split in SPLITS}
            for model, changes in MODELS.items():
                training = demo_training(config)
                training = dataclasses.replace(training, model=dict(training.model, **changes))
                for (dtype, pool), (split_caches, split_candidates) in encoded.items():
                    if not changes and pool != "none":
                        continue  # the global-token re-ranker reads no patch: pooling gives the same run
                    run = Path(tmp) / f"run-{len(changes)}-{dtype}-{pool}"
                    train(split_caches["train"], split_candidates["train"], run, training,
                          val_cache=split_caches["val"], val_candidates=split_candidates["val"], progress=False)
                    metrics = evaluate_run(run, split_caches["test"], split_candidates["test"], device="cpu")
                    results.setdefault((model, dtype, pool), []).append((metrics["stage1"]["R1"],
                                                                         metrics["reranked"]["R1"]))
                    print(f"  seed {seed} {model:<24} {dtype:<8} pool {'1' if pool == 'none' else '2'}: stage 1 "
                          f"{metrics['stage1']['R1']:.1f} -> re-ranked {metrics['reranked']['R1']:.1f}")
                # the float16-trained re-ranker on the 8-bit test caches: same candidates, tokens through the encoding
                trained = load_reranker(Path(tmp) / f"run-{len(changes)}-float16-none", cpu)
                lists, _ = load_lists(caches["test"], by_k[config.k]["test"])
                orders = {}
                for dtype in TOKEN_DTYPES:
                    scores = rerank_scores(trained.model, encoded[(dtype, "none")][0]["test"], lists.video, device=cpu)
                    fused = fused_scores(lists.score, scores, fusion=trained.fusion, alpha=trained.fusion_alpha,
                                         present=lists.video >= 0)
                    orders[dtype] = order_candidates(fused, lists.score)
                for dtype in TOKEN_DTYPES[1:]:
                    same = float((orders[dtype] == orders["float16"]).all(axis=1).mean())
                    agreement.setdefault((model, dtype), []).append(same)
    return {"r1": results, "agreement": agreement}


def print_demo(rows: dict, seeds: list[int]) -> float:
    """The table; returns the demo re-ranker's mean re-ranked R@1 of int8 minus float16."""
    def stats(values):
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    print(f"demo (toy world), test split, seeds {seeds}: mean ± sd over seeds; 'same ranking': the float16-trained "
          "re-ranker on the 8-bit test cache, captions whose fused top-K order is identical to float16's")
    print(f"  {'re-ranker':<24}{'tokens':<9}{'pool':<6}{'stage-1 R@1':>14}{'re-ranked R@1':>16}{'vs float16':>12}"
          f"{'same ranking':>14}")
    for (model, dtype, pool), values in rows["r1"].items():
        base = stats([r for _, r in rows["r1"][(model, "float16", "none")]])[0]
        s1, rr = stats([s for s, _ in values]), stats([r for _, r in values])
        same = rows["agreement"].get((model, dtype)) if pool == "none" else None
        print(f"  {model:<24}{dtype:<9}{'1' if pool == 'none' else '2':<6}{s1[0]:>8.1f} ± {s1[1]:<4.1f}"
              f"{rr[0]:>10.1f} ± {rr[1]:<4.1f}{rr[0] - base:>+10.1f}"
              f"{'' if not same else f'{100 * statistics.mean(same):>13.1f}%'}")
    model = next(iter(MODELS))
    return (stats([r for _, r in rows["r1"][(model, "int8", "none")]])[0]
            - stats([r for _, r in rows["r1"][(model, "float16", "none")]])[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16", help="shapes of the read-rate cache (random tokens)")
    parser.add_argument("--videos-per-step", type=int, default=256)
    parser.add_argument("--cache-videos", type=int, default=512)
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--demo-videos", type=int, default=360)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip-demo", action="store_true", help="parts 1-3 only")
    parser.add_argument("--smoke", action="store_true", help="seconds-long check: tiny shapes, one seed, 4 steps")
    args = parser.parse_args()
    steps = None
    if args.smoke:
        args.model = str(Path(__file__).resolve().parents[1] / "tests" / "data" / "models" / "tiny-vit.json")
        args.videos_per_step, args.cache_videos, args.frames, args.repeats = 8, 16, 4, 1
        args.seeds, args.demo_videos, args.workers, steps = 1, 48, 0, 4
    sys.stdout.reconfigure(line_buffering=True)
    quiet_random_weights()
    logging.getLogger("tvrerank").setLevel(logging.WARNING)

    sizes(["ViT-B-16"] if args.smoke else ["ViT-B-16", "ViT-bigG-14"])
    read_rates(args.model, args.videos_per_step, args.cache_videos, args.frames, args.repeats)
    from tvrerank.toy.demo import TOY_MODEL, toy_pretrained

    token_cosines([(TOY_MODEL, toy_pretrained())] + ([] if args.smoke else [("ViT-B-16", None)]),
                  48 if args.smoke else 120, args.workers)
    delta = 0.0
    if not args.skip_demo:
        seeds = list(range(args.seeds))
        delta = print_demo(demo_rows(seeds, args.demo_videos, steps, args.workers), seeds)
    print(f"int8_r1_delta={delta:+.2f}")


if __name__ == "__main__":
    main()
