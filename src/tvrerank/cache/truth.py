"""Known answers in a cache: which patches of which sampled frames show a toy world's detail.

Optional parts of a cache (docs/design.md, "The cache"), written by ``tvrerank toy truth`` (the demo
does it) after extraction; caches without them read as before:

- root attribute ``toy_world``: JSON ``{"world": "events" | "detail", "grid": [H', W'], "source": the
  world folder}``: the toy world the cache was extracted from, ``grid`` the cache's token grid;
- dataset ``truth/detail`` (N, T, P) bool (detail world only): True where sampled frame t of video n
  shows the detail on patch p of the cache's token grid (row-major); all False for failed videos and
  padded frames. Chunked with a checksum like every numeric dataset.

``cache check`` validates both (``check_truth``); ``read_truth`` gives them to evaluation; ``cache
compact`` carries them over, pooled with its tokens (``pooled_detail``).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from tvrerank.cache.schema import storage_for
from tvrerank.errors import InputError
from tvrerank.files import replaced_file

log = logging.getLogger(__name__)

WORLD_ATTRIBUTE = "toy_world"
DETAIL_DATASET = "truth/detail"
WORLD_NAMES = ("events", "detail")


@dataclass(frozen=True)
class CacheTruth:
    """A cache's known answers: its world and, for the detail world, ``detail`` (N, T, P) bool."""

    world: str
    grid: tuple[int, int]
    detail: np.ndarray | None  # (N, T, P) bool or None
    source: str = ""  # the world folder it came from

    def detail_frames(self) -> np.ndarray:
        """(N, T) bool: the sampled frames that show the detail."""
        return self.detail.any(axis=-1)


def read_truth(cache) -> CacheTruth | None:
    """A ``CacheReader``'s (or open h5py file's) known answers; None for a cache without them."""
    f = getattr(cache, "file", cache)
    raw = f.attrs.get(WORLD_ATTRIBUTE)
    if raw is None:
        return None
    meta = json.loads(raw)
    detail = cache[DETAIL_DATASET][()].astype(bool) if DETAIL_DATASET in f else None
    return CacheTruth(world=meta["world"], grid=tuple(meta["grid"]), detail=detail, source=meta.get("source", ""))


def pooled_detail(detail: np.ndarray, grid: tuple[int, int], pool: str) -> np.ndarray:
    """(N, T, P) bool on an (H, W) grid → (N, T, P') on the grid ``cache.encoding.pool_grid`` leaves: a
    pooled cell shows the detail when any cell it averages does (the same windows as the tokens)."""
    import torch

    from tvrerank.cache.encoding import pool_grid

    n, t, _ = detail.shape
    cells = torch.from_numpy(np.ascontiguousarray(detail, dtype=np.float32)).reshape(n * t, 1, *grid)
    return (pool_grid(cells, pool) > 0).reshape(n, t, -1).numpy()


def check_truth(f: h5py.File, *, videos: int, frames: int, tokens_per_frame: int, grid: tuple[int, int]) -> list[str]:
    """Every problem of a cache's known answers (empty when sound or absent)."""
    raw = f.attrs.get(WORLD_ATTRIBUTE)
    if raw is None:
        return [f"{DETAIL_DATASET} without the {WORLD_ATTRIBUTE} attribute"] if DETAIL_DATASET in f else []
    try:
        meta = json.loads(raw)
    except (TypeError, ValueError):
        return [f"{WORLD_ATTRIBUTE}: not JSON"]
    if not isinstance(meta, dict):
        return [f"{WORLD_ATTRIBUTE}: {meta!r} is not a JSON object"]
    problems = []
    if meta.get("world") not in WORLD_NAMES:
        problems.append(f"{WORLD_ATTRIBUTE}.world: {meta.get('world')!r} is not one of {', '.join(WORLD_NAMES)}")
    if meta.get("grid") != list(grid):
        problems.append(f"{WORLD_ATTRIBUTE}.grid: {meta.get('grid')!r} is not the token grid {list(grid)}")
    has_detail = DETAIL_DATASET in f
    if meta.get("world") == "detail" and not has_detail:
        problems.append(f"missing dataset {DETAIL_DATASET} (a detail world's cache)")
    if meta.get("world") == "events" and has_detail:
        problems.append(f"{DETAIL_DATASET} in an events world's cache")
    if has_detail:
        dataset = f[DETAIL_DATASET]
        expected = (videos, frames, tokens_per_frame)
        if tuple(dataset.shape) != expected:
            problems.append(f"{DETAIL_DATASET}: shape {dataset.shape}, expected {expected}")
        elif dataset.dtype != np.bool_:
            problems.append(f"{DETAIL_DATASET}: dtype {dataset.dtype}, expected bool")
        else:
            detail = dataset[()]
            mask = f["videos/frame_mask"][()]
            if (outside := int((detail.any(-1) & ~mask).sum())):
                problems.append(f"{DETAIL_DATASET}: {outside} padded frames show the detail")
    return problems


def write_truth(path: str | Path, *, world: str, grid: tuple[int, int], source: str,
                detail: np.ndarray | None) -> None:
    """Record a toy world's known answers in the cache at ``path`` (replacing earlier ones): a copy
    gets them, then takes the cache's place in one rename, so a killed run leaves the cache as it was."""
    path = Path(path)
    with replaced_file(path) as tmp:
        shutil.copyfile(path, tmp)
        with h5py.File(tmp, "r+") as f:
            if DETAIL_DATASET in f:
                del f[DETAIL_DATASET]
            if detail is not None:
                detail = np.asarray(detail, dtype=bool)
                f.create_dataset(DETAIL_DATASET, data=detail, **storage_for(DETAIL_DATASET, detail.shape, np.bool_))
            f.attrs[WORLD_ATTRIBUTE] = json.dumps({"world": world, "grid": list(grid), "source": source},
                                                  sort_keys=True)
            problems = check_truth(f, videos=f["videos/id"].shape[0], frames=f["videos/frame_mask"].shape[1],
                                   tokens_per_frame=f["videos/tokens"].shape[2], grid=grid)
            if problems:
                raise InputError(f"{path}: the known answers do not fit the cache: {'; '.join(problems)}")
    log.info("%s: %s world's known answers recorded", path, world)
