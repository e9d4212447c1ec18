"""``tvrerank toy truth``: a toy world's ground truth, per sampled frame, into a cache extracted from it.

``scripts.json`` (``toy/make.py``) records, per video, the rendered frames that show the detail and
the patches it covers on the toy encoder's grid, unpooled and 2×2-pooled. A cache samples T of the
F rendered frames (``extract.frames``: the frame on screen at the centre of each of T equal
segments), so sampled frame t shows the detail when rendered frame ``sampled_frames(F, T)[t]`` does;
tests/test_truth.py checks that rule against the frames PyAV decodes. The result goes into the cache
as ``cache.truth`` lays out.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tvrerank.cache.encoding import pooled_grid
from tvrerank.cache.reader import CacheReader
from tvrerank.cache.schema import OK
from tvrerank.cache.truth import write_truth
from tvrerank.errors import InputError, MissingInput
from tvrerank.extract.frames import target_times
from tvrerank.toy.world import TOY_GRID

SPLITS = ("train", "val", "test")


def sampled_frames(rendered: int, sampled: int) -> np.ndarray:
    """(sampled,) int: the rendered frame (of ``rendered`` frames at a constant rate, starting at 0) that
    uniform sampling takes for each slot: the one on screen at the centre of the slot's segment."""
    return np.floor(target_times(0.0, float(rendered), sampled) + 1e-9).astype(np.int64)


def detail_truth(records: list[dict | None], *, rendered: int, sampled: int, patches: int,
                 pool: str) -> np.ndarray:
    """Per video's ``scripts.json`` record (None: not in the world, or failed) → (N, T, P) bool: sampled
    frame t of video n shows the detail on patch p (``pool``: which of the record's patch lists)."""
    truth = np.zeros((len(records), sampled, patches), dtype=bool)
    source = sampled_frames(rendered, sampled)  # (T,)
    for n, record in enumerate(records):
        if record is None or "detail" not in record:
            continue
        shows = np.flatnonzero(np.isin(source, record["detail"]["frames"]))  # slots showing it
        truth[n][np.ix_(shows, np.asarray(record["detail"]["patches"][pool], dtype=np.int64))] = True
    return truth


def load_world(world_dir: str | Path) -> dict:
    """``scripts.json`` of a toy world folder, with a clear error when it is not one."""
    path = Path(world_dir) / "scripts.json"
    if not path.is_file():
        raise MissingInput(f"{path}: no such file; pass the folder `tvrerank toy make --out` wrote")
    try:
        world = json.loads(path.read_text())
        world.setdefault("world", "events")  # worlds made before the detail world existed
        world["config"]["frames"]
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: not a toy world's scripts.json ({exc}); make the world again") from None
    return world


def world_captions(world_dir: str | Path) -> dict[str, set[str]]:
    """video id → the captions the world's JSONL files give it."""
    captions: dict[str, set[str]] = {}
    for split in SPLITS:
        path = Path(world_dir) / f"{split}.jsonl"
        if path.is_file():
            for line in path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    captions.setdefault(row["video_id"], set()).add(row["caption"])
    return captions


def attach_world_truth(cache_path: str | Path, world_dir: str | Path) -> dict:
    """Record the world's name and (detail world) its ground truth per sampled frame in the cache →
    {"world", "videos", "detail_frames"} (how many sampled frames show the detail)."""
    world = load_world(world_dir)
    records = {r["video_id"]: r for split in SPLITS for r in world.get(split, [])}
    with CacheReader(cache_path) as cache:
        layout, sampling = cache.header.layout, cache.header.sampling
        ids = list(cache.strings("videos/id"))
        ok = cache["videos/status"][()] == OK
        mask = cache["videos/frame_mask"][()]
        captions = list(zip(cache["texts/video"][()], cache.strings("texts/caption")))
    expected = pooled_grid(TOY_GRID, layout.pool)
    if tuple(layout.grid) != tuple(expected):
        raise InputError(f"{cache_path}: its token grid is {tuple(layout.grid)}, not the toy encoder's {expected} "
                         f"(pool {layout.pool}); the world's patches are on that grid: extract with --model tvr-toy")
    if sampling.strategy != "uniform":
        raise InputError(f"{cache_path}: frames sampled {sampling.strategy!r}; the ground truth knows uniform sampling")
    known = world_captions(world_dir)
    missing = [i for i in ids if i not in records] or [ids[v] for v, text in captions if text not in known.get(ids[v], ())]
    if missing:
        raise InputError(f"{cache_path}: {len(missing)} of its videos or captions (e.g. of {missing[0]}) are not in "
                         f"the world {world_dir}; pass the folder the cache was extracted from")
    detail = None
    if world["world"] == "detail":
        rows = [records[i] if good else None for i, good in zip(ids, ok)]
        detail = detail_truth(rows, rendered=world["config"]["frames"], sampled=sampling.frames,
                              patches=layout.tokens_per_frame, pool=layout.pool) & mask[:, :, None]
    write_truth(cache_path, world=world["world"], grid=tuple(layout.grid), source=str(world_dir), detail=detail)
    return {"world": world["world"], "videos": len(ids),
            "detail_frames": 0 if detail is None else int(detail.any(-1).sum())}
