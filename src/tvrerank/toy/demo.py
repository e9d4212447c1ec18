"""``tvrerank demo``: the whole pipeline on the embedded toy world, in minutes on a laptop CPU.

Stages so far: toy make → extract (toy encoder) → index → candidates → stage-1 metrics.
Output layout (scripts rely on it)::

    DIR/data/            the toy world (train.jsonl, test.jsonl, videos/)
    DIR/cache/train.h5   DIR/cache/test.h5
    DIR/index/train/     DIR/index/test/        FAISS indexes of each split's videos
    DIR/candidates/train.h5   DIR/candidates/test.h5
    DIR/metrics.json     {"stage1": {"R1", "R5", "R10", "MdR", "MnR"}, ...} on the test split
    DIR/report.md
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

from tvrerank.config import ExtractConfig
from tvrerank.toy.make import ToyWorldConfig, make_toy_world

log = logging.getLogger(__name__)

TOY_MODEL = "tvr-toy"


@dataclass(frozen=True)
class DemoConfig:
    out: str = "demo-out"
    seed: int = 0
    videos: int = 240
    frames: int = 12
    text_tokens: int = 48  # toy captions run up to ~40 tokens
    workers: int = 2
    k: int = 15


def toy_pretrained() -> str | None:
    """The shipped toy-encoder tag when its weights are in the package, else None (random weights)."""
    from tvrerank.extract.models import SHIPPED_WEIGHTS

    weights = SHIPPED_WEIGHTS[(TOY_MODEL, "toy")]
    if weights.is_file():
        return "toy"
    log.warning("the shipped toy-encoder weights are missing (%s): the demo uses random weights", weights)
    return None


def run_demo(config: DemoConfig, *, progress: bool = True) -> dict:
    """Run every stage; returns a summary dict (also written to DIR/report.md)."""
    from tvrerank.cache.inspect import cache_info
    from tvrerank.extract.runner import run_extraction
    from tvrerank.index.candidates import build_candidates, write_candidates
    from tvrerank.index.evaluation import stage1_evaluation
    from tvrerank.index.store import build_index_dir

    out = Path(config.out)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    data = make_toy_world(out / "data", ToyWorldConfig(videos=config.videos, seed=config.seed), progress=progress)
    timings["make"] = time.perf_counter() - start

    base = ExtractConfig(annotations=(), format="jsonl", videos=str(data), out="", model=TOY_MODEL,
                         pretrained=toy_pretrained(), frames=config.frames, text_tokens=config.text_tokens,
                         workers=config.workers,
                         device="cpu", overwrite=True)
    caches = {}
    for split in ("train", "test"):
        start = time.perf_counter()
        caches[split] = out / "cache" / f"{split}.h5"
        caches[split].parent.mkdir(parents=True, exist_ok=True)
        split_config = replace(base, annotations=(str(data / f"{split}.jsonl"),), out=str(caches[split]))
        run_extraction(split_config, progress=progress)
        timings[f"extract_{split}"] = time.perf_counter() - start

    for split, cache in caches.items():
        start = time.perf_counter()
        build_index_dir(cache, out / "index" / split)
        lists = build_candidates(cache, k=config.k, index_dir=out / "index" / split)
        write_candidates(out / "candidates" / f"{split}.h5", lists, cache)
        timings[f"index_{split}"] = time.perf_counter() - start
    evaluation = stage1_evaluation(caches["test"], out / "candidates" / "test.h5")
    metrics = {key: evaluation[key] for key in ("stage1", "v2t", "recall_at_k", "k") if key in evaluation}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    infos = {split: cache_info(path) for split, path in caches.items()}
    summary = {"config": config.__dict__, "timings_s": timings, "metrics": metrics, "caches": {
        split: {k: info[k] for k in ("path", "videos_ok", "videos_failed", "captions", "frames",
                                      "tokens_per_frame", "token_dim", "embed_dim", "bytes_on_disk")}
        for split, info in infos.items()}}
    (out / "report.md").write_text(_report(summary))
    return summary


def _report(summary: dict) -> str:
    from tvrerank.metrics import format_table

    lines = ["# tvrerank demo (synthetic toy world)", "",
             "A known-answer check on generated videos; not a real dataset.", "", "## Caches", ""]
    for split, info in summary["caches"].items():
        lines.append(f"- {split}: {info['videos_ok']} videos ok, {info['videos_failed']} failed, "
                     f"{info['captions']} captions, {info['frames']} frames x {info['tokens_per_frame']} "
                     f"tokens x {info['token_dim']}")
    metrics = summary["metrics"]
    lines += ["", f"## Stage 1 on the test split (text->video; true video within top-{metrics['k']}: "
              f"{metrics['recall_at_k']:.1f}%)", "", "```", format_table({"stage 1": metrics["stage1"]}), "```"]
    lines += ["", "## Timings (s)", "", "```", json.dumps(summary["timings_s"], indent=1), "```", ""]
    return "\n".join(lines)
