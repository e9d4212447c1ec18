"""Distractor scaling on the known-answer toy world: stage-1 and re-ranked R@1 as the gallery grows.

The demo's test captions are searched against its test gallery plus N distractor videos of the
same world (``tvrerank.toy.make.make_distractors``: drawn as the training split is, never the
script of any split's video nor of another distractor, ids ``distractor-NNNNNN``), through the real
pipeline:

1. the demo's world, caches and trained re-ranker: those of ``tvrerank demo --out DIR`` with
   ``--demo DIR`` (N = 0 is then checked against its metrics.json), else the demo's own steps into
   OUT/demo (``toy.demo.prepare_world`` and the demo's re-ranker training, without its first stage);
2. the distractors in ranges between the sizes (0-1k, 1k-10k, ...), each range written as H.264
   videos into the world's folder and extracted into its own cache by ``tvrerank extract``'s library
   entry with the shipped toy encoder (the demo's extraction settings);
3. per N, the gallery is the test cache joined with the ranges up to N (``cache.merge.join_caches``:
   mapped, not copied), its FAISS index (Flat: exact), every caption's top K, and the demo's
   re-ranker with its fusion weight (tuned on the val split, never here) on the test captions' lists.

The distractors' own captions are in the joined caches (extraction needs one per video) and get
candidate lists too, but only the test captions are evaluated. Everything made is kept in OUT and
reused by a later run (sizes added above the largest extract only their new range).

    python benchmarks/bench_distractors.py                     # N = 0, 1k, 10k (2 shared cores: 19 min + the demo's 14)
    python benchmarks/bench_distractors.py --large             # and 100k (2 cores: about 3 h more, not yet run)
    python benchmarks/bench_distractors.py --demo demo-out     # the world and re-ranker of `tvrerank demo`
    python benchmarks/bench_distractors.py --smoke             # a 64-video world, N = 0, 8, 32

Prints a table (N, gallery, stage-1 R@1 / R@5 / R@K, re-ranked R@1 / R@5, gain) and writes it with
every figure to OUT/distractors.json and the plot to OUT/distractors.png. The last line is
``distractor_min_gain=<the smallest re-ranked minus stage-1 R@1 over the sizes, points>``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from tvrerank.cache.merge import join_caches
from tvrerank.cache.reader import CacheReader
from tvrerank.evaluation import compare_stages, load_lists
from tvrerank.extract.runner import run_extraction
from tvrerank.index.candidates import build_candidates, write_candidates
from tvrerank.index.store import build_index_dir
from tvrerank.rerank.checkpoint import load_reranker
from tvrerank.toy.demo import DemoConfig, demo_extraction, demo_training, prepare_world
from tvrerank.train.loop import train
from tvrerank.toy.make import (distractor_annotations, make_distractors, script_from_record, world_config,
                               world_script_keys)

SIZES = (0, 1_000, 10_000)
LARGE = 100_000


def demo_world(demo: Path, config: DemoConfig) -> None:
    """The demo's world, caches and trained re-ranker in ``demo`` (the demo's own steps: ``prepare_world``, then
    its re-ranker training into ``demo/run``), unless already there."""
    if (demo / "run" / "reranker.pt").exists() and (demo / "cache" / "test.h5").exists():
        return
    _, caches, by_k = prepare_world(demo, config, progress=False)
    candidates = by_k[config.k]
    train(caches["train"], candidates["train"], demo / "run", demo_training(config), val_cache=caches["val"],
          val_candidates=candidates["val"], progress=False)


def distractor_ranges(sizes: list[int]) -> list[tuple[int, int]]:
    """Consecutive (start, stop) ranges of distractors between the sizes: [0, 1k, 10k] → [(0, 1k), (1k, 10k)]."""
    bounds = sorted({0, *sizes})
    return list(zip(bounds[:-1], bounds[1:]))


def distractor_cache(data: Path, out: Path, config: DemoConfig, start: int, stop: int) -> tuple[Path, dict]:
    """Videos and cache of distractors start..stop-1 (made unless already there) → (cache, seconds)."""
    seconds = {"write videos": 0.0, "extract": 0.0}
    annotations = distractor_annotations(data, start, stop)
    if not annotations.exists():
        began = time.perf_counter()
        make_distractors(data, start=start, stop=stop, progress=False)
        seconds["write videos"] = time.perf_counter() - began
    cache = out / "cache" / f"{annotations.stem}.h5"
    cache.parent.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    summary = run_extraction(replace(demo_extraction(config, data), annotations=(str(annotations),), out=str(cache),
                                     overwrite=False), progress=False)
    if not summary.already_done:
        seconds["extract"] = time.perf_counter() - began
    if summary.failed:
        raise RuntimeError(f"{summary.failed} distractor videos failed extraction: {cache}")
    return cache, seconds


def check_disjoint(data: Path, ranges: list[tuple[int, int]]) -> int:
    """Distractor scripts that equal a script of the world (by key), counted from the files written: 0."""
    world = world_script_keys(data)
    records = [json.loads(distractor_annotations(data, start, stop).with_suffix(".json").read_text())["distractor"]
               for start, stop in ranges]
    keys = [script_from_record(r).key() for written in records for r in written]
    if len(set(keys)) != len(keys):
        raise RuntimeError("two distractors share a script")
    return sum(key in world for key in keys)


def evaluate_gallery(gallery: Path, out: Path, run: Path, k: int, test_videos: int) -> dict:
    """Index, top-K lists and the re-ranker on the test captions (the gallery's first ``test_videos`` videos)."""
    began = time.perf_counter()
    index_dir, candidates = out / "index", out / "candidates.h5"
    build_index_dir(gallery, index_dir)
    write_candidates(candidates, build_candidates(gallery, k=k, index_dir=index_dir), gallery)
    first_stage_seconds = time.perf_counter() - began
    trained = load_reranker(run)
    with CacheReader(gallery) as cache:
        trained.require_cache(cache)
        videos = cache.num_videos
    lists, true_video = load_lists(gallery, candidates)
    captions = np.flatnonzero(true_video < test_videos)
    result = compare_stages(trained.model, gallery, lists, true_video, device=torch.device("cpu"),
                            alpha=trained.fusion_alpha, fusion=trained.fusion, captions=captions)
    return {"gallery": videos, "captions": result["evaluated"], "k": result["k"], "stage1": result["stage1"],
            "reranked": result["reranked"], "reranker_only": result["reranker_only"],
            "recall_at_k": result["recall_at_k"], "fusion": result["fusion"], "alpha": result["alpha"],
            "first_stage_seconds": first_stage_seconds,
            "rerank_seconds": time.perf_counter() - began - first_stage_seconds}


def table(rows: list[dict]) -> str:
    k = rows[0]["k"]
    lines = [f"| N distractors | gallery | stage-1 R@1 | R@5 | R@{k} | re-ranked R@1 | R@5 | gain R@1 |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        s, r = row["stage1"], row["reranked"]
        lines.append(f"| {row['n']:,} | {row['gallery']:,} | {s['R1']:.1f} | {s['R5']:.1f} | {row['recall_at_k']:.1f} "
                     f"| {r['R1']:.1f} | {r['R5']:.1f} | {r['R1'] - s['R1']:+.1f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    x = [row["n"] for row in rows]
    k = rows[0]["k"]
    ax.plot(x, [row["stage1"]["R1"] for row in rows], marker="o", label="stage 1 R@1 (toy CLIP + FAISS)")
    ax.plot(x, [row["reranked"]["R1"] for row in rows], marker="o", label="re-ranked R@1 (the demo's re-ranker)")
    ax.plot(x, [row["recall_at_k"] for row in rows], marker="s", linestyle="--", label=f"stage 1 R@{k} (the ceiling)")
    ax.set_xscale("symlog", linthresh=max(1, min([n for n in x if n > 0], default=1)))
    ax.set_xticks(x, [f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n) for n in x])
    ax.minorticks_off()
    ax.set_xlabel("distractor videos N (beside the test gallery)")
    ax.set_ylabel("text→video (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench-distractors-out", help="Everything made (reused when present).")
    parser.add_argument("--demo", default=None,
                        help="A `tvrerank demo` output folder to use (default: OUT/demo, made when missing).")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="Distractor counts N.")
    parser.add_argument("--large", action="store_true", help=f"Also N = {LARGE:,}.")
    parser.add_argument("--smoke", action="store_true", help="A 64-video world, N = 0, 8, 32, a few training steps.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    config = DemoConfig()
    if args.smoke:
        args.sizes, config = [0, 8, 32], DemoConfig(videos=64, steps=8)
    sizes = sorted(set(args.sizes) | ({LARGE} if args.large else set()))
    out = Path(args.out)
    demo = Path(args.demo) if args.demo else out / "demo"
    started = time.perf_counter()
    demo_world(demo, replace(config, out=str(demo)))
    data = demo / "data"
    print(f"demo world and re-ranker: {demo} ({time.perf_counter() - started:.0f} s)", flush=True)

    seconds = {"write videos": 0.0, "extract": 0.0}
    ranges = distractor_ranges(sizes)
    caches = {}
    for start, stop in ranges:
        caches[stop], spent = distractor_cache(data, out, config, start, stop)
        for name, value in spent.items():
            seconds[name] += value
        print(f"distractors {start:,}-{stop:,}: videos {spent['write videos']:.0f} s, extraction "
              f"{spent['extract']:.0f} s", flush=True)
    repeats = check_disjoint(data, ranges)
    if repeats:
        raise RuntimeError(f"{repeats} distractors repeat a script of the world")
    print(f"distractor scripts equal to a script of the world: {repeats}", flush=True)

    test = demo / "cache" / "test.h5"
    with CacheReader(test) as cache:
        test_videos = cache.num_videos
    rows = []
    for n in sizes:
        folder = out / "galleries" / f"n{n}"
        gallery = test if n == 0 else join_caches([test, *(caches[stop] for _, stop in ranges if stop <= n)],
                                                  folder / "gallery.h5")
        row = {"n": n, **evaluate_gallery(gallery, folder, demo / "run", config.k, test_videos)}
        rows.append(row)
        print(f"N = {n:,}: R@1 {row['stage1']['R1']:.1f} -> {row['reranked']['R1']:.1f} over {row['gallery']:,} "
              f"videos (lists {row['first_stage_seconds']:.0f} s, re-rank {row['rerank_seconds']:.0f} s)", flush=True)
    if sizes[0] == 0 and (demo / "metrics.json").exists():  # N = 0 is `tvrerank demo`'s own test evaluation
        recorded = json.loads((demo / "metrics.json").read_text())
        same = all(recorded[name]["R1"] == rows[0][name]["R1"] for name in ("stage1", "reranked"))
        print(f"N = 0 against {demo / 'metrics.json'}: stage-1 R@1 {recorded['stage1']['R1']:.1f}, re-ranked "
              f"{recorded['reranked']['R1']:.1f} ({'the same' if same else 'DIFFERENT'})")
    text = table(rows)
    world = world_config(data)
    title = f"toy world (seed {world.seed}): {rows[0]['captions']} test captions, K = {rows[0]['k']}"
    plot(rows, out / "distractors.png", title)
    seconds["total"] = time.perf_counter() - started
    gains = [row["reranked"]["R1"] - row["stage1"]["R1"] for row in rows]
    (out / "distractors.json").write_text(json.dumps({"rows": rows, "table": text, "seconds": seconds,
                                                      "demo": str(demo), "sizes": sizes}, indent=1) + "\n")
    print(text)
    print(f"plot: {out / 'distractors.png'}; seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    print(f"distractor_min_gain={min(gains):+.1f}")


if __name__ == "__main__":
    sys.exit(main())
