"""``tvrerank cache compact``: a cache's tokens in another encoding or pool, without extracting again.

The source is read part by part (a range of videos and their captions, ``part_bytes`` of decoded
tokens at most, so memory stays bounded whatever the cache's size); each part's tokens are decoded,
pooled when asked (``cache.encoding.pool_frame_tokens``: the values extraction with ``--pool`` would
store, since the joint-space projection is linear) and encoded again, then written as a part file of
``OUT.h5.parts/`` exactly as extraction writes its parts (``cache.writer``). Killed at any moment, the
same command resumes from the finished parts; the final file appears whole, by one rename.

Every source chunk read passes its fletcher32 checksum (a damaged chunk stops the run naming the
source and the dataset), and the source's string digests are checked before anything is written.
The compacted cache gets checksums of its own; its header records where it came from.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tvrerank.cache.checksums import verify_strings
from tvrerank.cache.encoding import (POOLS, check_token_dtype, decode_tokens, encode_tokens, has_scale,
                                     pool_frame_tokens, pooled_grid, without_padding)
from tvrerank.cache.reader import CacheReader
from tvrerank.cache.schema import SCALE_ARRAY, CacheHeader, part_arrays
from tvrerank.cache.truth import pooled_detail, read_truth, write_truth
from tvrerank.cache.writer import PartData, PartStore, assemble
from tvrerank.errors import CorruptFile, InputError

log = logging.getLogger(__name__)

PART_BYTES = 256 << 20  # decoded float32 tokens per part


def compacted_layout(layout, *, token_dtype: str, pool: str | None):
    """The source's token layout with ``token_dtype`` and (when given) ``pool``; refuses what cannot be made
    from the stored tokens (un-pooling) and a conversion that changes nothing."""
    check_token_dtype(token_dtype, "--token-dtype")
    pool = layout.pool if pool is None else pool
    if pool not in POOLS:
        raise InputError(f"--pool must be one of {', '.join(POOLS)}, got {pool!r}")
    if layout.pool != "none" and pool != layout.pool:
        raise InputError(f"the cache's tokens are pooled {layout.pool} already; pooling cannot be undone "
                         "(extract the videos again for another grid)")
    if (token_dtype, pool) == (layout.token_dtype, layout.pool):
        raise InputError(f"the cache holds {token_dtype} tokens, pool {pool}, already: nothing to compact")
    grid = pooled_grid(layout.grid, pool if layout.pool == "none" else "none")
    return dataclasses.replace(layout, token_dtype=token_dtype, pool=pool, grid=grid,
                               tokens_per_frame=grid[0] * grid[1])


def _tokens(arrays: dict, name: str = "tokens") -> torch.Tensor:
    """A part's stored tokens (and scales) as float32 values (..., D)."""
    scale = arrays.get(SCALE_ARRAY)
    return decode_tokens(torch.from_numpy(np.ascontiguousarray(arrays[name])),
                         None if scale is None else torch.from_numpy(scale))


def converted(arrays: dict, *, token_dtype: str, grid=None, pool: str = "none") -> dict:
    """A part's arrays with its tokens decoded, pooled on ``grid`` (video tokens: (n, T, P, D)) and encoded
    as ``token_dtype``. Unpooled float16 tokens decode to exactly the values extraction encodes, so the
    codes are those of a cache extracted with that encoding."""
    arrays = dict(arrays)
    values = _tokens(arrays)  # (..., D) float32
    arrays.pop(SCALE_ARRAY, None)
    values = pool_frame_tokens(values, grid, pool)  # (n, T, P', D) when pooling
    if has_scale(token_dtype):
        values = values.numpy()
        if "length" in arrays:  # caption tokens: 8-bit caches hold zeros past each caption's length
            values = without_padding(values, arrays["length"])
        arrays["tokens"], arrays[SCALE_ARRAY] = encode_tokens(values, token_dtype)
    else:
        arrays["tokens"] = values.numpy().astype(np.float16)
    return arrays


def part_bounds(caption_video: np.ndarray, num_videos: int, videos_per_part: int) -> list[tuple[int, int, int, int]]:
    """(video start, video stop, caption start, caption stop) of each part; captions are grouped by video."""
    bounds = []
    for start in range(0, num_videos, videos_per_part):
        stop = min(num_videos, start + videos_per_part)
        a, b = np.searchsorted(caption_video, [start, stop])
        bounds.append((start, stop, int(a), int(b)))
    return bounds


def compact_cache(source: str | Path, out: str | Path, *, token_dtype: str = "int8", pool: str | None = None,
                  part_bytes: int = PART_BYTES, overwrite: bool = False, progress: bool = True) -> Path:
    """Write ``out``: ``source`` with its tokens in ``token_dtype`` (and pooled ``pool``); returns ``out``."""
    source, out = Path(source), Path(out)
    if source.resolve() == out.resolve():
        raise InputError(f"--out {out} is the source cache itself; write the compact cache beside it")
    with CacheReader(source) as cache:
        header = cache.header
        layout = compacted_layout(header.layout, token_dtype=token_dtype, pool=pool)
        damaged = verify_strings(cache.file)
        if damaged:
            raise CorruptFile(f"{source}: {', '.join(damaged)} no longer match their digests; "
                              f"`tvrerank cache check {source}` lists the damage; extract it again")
        video_ids, video_paths = cache.strings("videos/id"), cache.strings("videos/path")
        captions, caption_video = cache.strings("texts/caption"), cache["texts/video"][()]
        frame_values = header.sampling.frames * header.layout.tokens_per_frame * header.layout.token_dim * 4
        videos_per_part = max(1, part_bytes // max(1, frame_values))
        bounds = part_bounds(caption_video, len(video_ids), videos_per_part)
        fingerprint = header.fingerprint()
        truth = read_truth(cache)  # a toy world's known answers, carried over (cache/truth.py)
    dataset = dict(header.dataset, compacted_from={
        "cache": str(source.resolve()), "token_dtype": header.layout.token_dtype, "pool": header.layout.pool})
    compacted = CacheHeader(header.encoder, header.sampling, layout, dataset,
                            datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    parts = PartStore(out)
    if overwrite:
        parts.remove()
    stat = source.stat()
    plan = {"compact": True, "source": str(source.resolve()), "source_stat": [stat.st_size, stat.st_mtime_ns],
            "source_fingerprint": fingerprint, "layout": dataclasses.asdict(layout), "parts": len(bounds)}
    parts.start(json.loads(json.dumps(plan)))  # as plan.json reads back (tuples as lists)
    todo = [i for i in range(len(bounds)) if i not in parts.finished(len(bounds))]
    if len(todo) < len(bounds):
        log.info("%s: resuming, %d of %d parts done", out, len(bounds) - len(todo), len(bounds))
    video_names, text_names = part_arrays(header.layout)
    with CacheReader(source) as cache:
        for index in tqdm(todo, desc="compact", unit="part", disable=not progress):
            v0, v1, t0, t1 = bounds[index]
            videos = {name: cache[f"videos/{name}"][v0:v1] for name in video_names if name != "error"}
            videos["error"] = np.asarray(cache.file["videos/error"].asstr()[v0:v1], dtype=object)
            texts = {name: cache[f"texts/{name}"][t0:t1] for name in text_names}
            part = PartData(
                video_rows=np.arange(v0, v1, dtype=np.int64),
                videos=converted(videos, token_dtype=token_dtype, grid=header.layout.grid,
                                 pool=layout.pool if header.layout.pool == "none" else "none"),
                text_rows=np.arange(t0, t1, dtype=np.int64),
                texts=converted(texts, token_dtype=token_dtype),
            )
            parts.write(index, part)
    assemble(parts, len(bounds), out, compacted, video_ids=video_ids, video_paths=video_paths, captions=captions,
             caption_video=caption_video)
    parts.remove()
    if truth is not None:
        detail = truth.detail
        if detail is not None and layout.pool != header.layout.pool:
            detail = pooled_detail(detail, tuple(header.layout.grid), layout.pool)
        write_truth(out, world=truth.world, grid=tuple(layout.grid), source=truth.source, detail=detail)
    return out
