"""Joining shard caches into one with HDF5 virtual datasets: the big arrays are mapped, not copied.

Shards are contiguous slices of the video table (and so of the caption table, which is grouped
by video), written by ``tvrerank extract --shard I/N`` or by each torchrun rank. The merged
file maps ``videos/tokens``, ``videos/frame_emb``, ``videos/video_emb``, ``texts/emb`` and
``texts/tokens`` onto the shard files (stored as paths relative to the merged file, so the
folder can move as a whole) and copies the small per-row tables. The shard files must stay.

``join_caches`` maps whole caches of separate runs the same way (one encoder, sampling and token
layout, one videos root, no video id in two of them): a gallery made of several collections, e.g.
a test split with distractor videos beside it (``benchmarks/bench_distractors.py``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from tvrerank.cache.checksums import seal
from tvrerank.cache.identity import fingerprint_differences
from tvrerank.cache.reader import CacheReader
from tvrerank.cache.schema import STR, VIRTUAL_ARRAYS, CacheHeader, dataset_specs, storage_for
from tvrerank.errors import CacheMismatch, InputError


def _order_shards(paths: Sequence[str | Path]) -> list[tuple[Path, CacheHeader]]:
    shards = []
    for path in paths:
        with CacheReader(path) as cache:
            shards.append((Path(path), cache.header))
    counts = {h.dataset.get("shard", {}).get("count", 1) for _, h in shards}
    if len(counts) != 1 or counts.pop() != len(shards):
        raise InputError(
            f"expected every shard of one run (the shards say {sorted({h.dataset.get('shard', {}).get('count', 1) for _, h in shards})} "
            f"in total), got {len(shards)} files"
        )
    shards.sort(key=lambda item: item[1].dataset["shard"]["index"])
    first = shards[0][1].fingerprint()
    for path, header in shards:
        if header.fingerprint() != first:
            raise CacheMismatch(f"{path} was made with another encoder, sampling or token layout than {shards[0][0]}")
    indices = [h.dataset["shard"]["index"] for _, h in shards]
    if indices != list(range(len(shards))):
        raise InputError(f"shard indices {indices} are not 0..{len(shards) - 1}: a shard is missing or repeated")
    return shards


def merge_shards(paths: Sequence[str | Path], out: str | Path) -> Path:
    """Write ``out`` joining the shard caches ``paths`` (any order); returns ``out``."""
    shards = _order_shards(paths)
    header = shards[0][1]
    return _write_mapped(shards, Path(out), lambda relative: dict(
        header.dataset, shard={"index": 0, "count": 1, "merged_from": relative}))


def _check_joinable(paths: Sequence[str | Path]) -> list[tuple[Path, CacheHeader]]:
    """(path, header) of whole caches that can share one gallery, in the order given; InputError or
    CacheMismatch naming the file otherwise."""
    caches, owner = [], {}
    for path in paths:
        with CacheReader(path) as cache:
            header, video_ids = cache.header, cache.strings("videos/id")
        path = Path(path)
        if header.dataset.get("shard", {}).get("merged_from"):
            raise InputError(f"{path} is itself merged from other files: join those files instead")
        if caches:
            first_path, first = caches[0]
            if header.fingerprint() != first.fingerprint():
                raise CacheMismatch(f"{path} cannot join {first_path}: "
                                    + "; ".join(fingerprint_differences(header.fingerprint(), first.fingerprint(),
                                                                        first_path, label=str(path))))
            if header.dataset.get("videos_root") != first.dataset.get("videos_root"):
                raise InputError(f"{path} has its videos under {header.dataset.get('videos_root')}, {first_path} under "
                                 f"{first.dataset.get('videos_root')}: extract both with the same --videos root")
        for video_id in video_ids:
            if video_id in owner:
                raise InputError(f"video id {video_id!r} is in both {owner[video_id]} and {path}: a gallery holds "
                                 "each video once; give each collection its own ids")
            owner[video_id] = path
        caches.append((path, header))
    if not caches:
        raise InputError("no caches to join")
    return caches


def join_caches(paths: Sequence[str | Path], out: str | Path) -> Path:
    """Write ``out`` joining whole caches of separate runs, their rows in the order given; returns ``out``."""
    caches = _check_joinable(paths)
    first = caches[0][1].dataset
    annotations = [a for _, header in caches for a in header.dataset.get("annotations", [])]
    return _write_mapped(caches, Path(out), lambda relative: {
        "annotations": annotations, "format": first.get("format"), "videos_root": first.get("videos_root"),
        "shard": {"index": 0, "count": 1, "merged_from": relative}})


def _write_mapped(sources: list[tuple[Path, CacheHeader]], out: Path, dataset_of) -> Path:
    """Write ``out`` mapping the big arrays of ``sources`` (in order) and copying the rest; ``dataset_of``
    (paths of the sources relative to ``out``) → the header's dataset record."""
    header = sources[0][1]
    sizes = []
    for path, _ in sources:
        with h5py.File(path, "r") as f:
            sizes.append((f["videos/id"].shape[0], f["texts/caption"].shape[0]))
    n, m = sum(s[0] for s in sizes), sum(s[1] for s in sizes)
    specs = dataset_specs(n, m, header.layout, header.sampling.frames)
    out.parent.mkdir(parents=True, exist_ok=True)
    relative = [os.path.relpath(p.resolve(), out.parent.resolve()) for p, _ in sources]
    merged = CacheHeader(header.encoder, header.sampling, header.layout, dataset_of(relative), header.created,
                         header.tool_version)
    tmp = out.with_name(out.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        f.attrs.update(merged.to_attrs())
        for name, (shape, dtype) in specs.items():
            if name in VIRTUAL_ARRAYS:
                _virtual(f, name, shape, dtype, relative, sizes)
            else:
                _concatenate(f, name, dtype, sources, sizes)
        seal(f)  # the mapped arrays keep the sources' own checksums
    os.replace(tmp, out)
    return out


def _virtual(f, name, shape, dtype, sources: list[str], sizes) -> None:
    """Map ``name`` onto the same dataset of each shard (paths relative to the merged file)."""
    layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
    offset = 0
    axis = 0 if name.startswith("videos/") else 1
    for source, size in zip(sources, sizes):
        rows = size[axis]
        if rows == 0:
            continue
        layout[offset : offset + rows] = h5py.VirtualSource(source, name, shape=(rows,) + shape[1:])
        offset += rows
    f.create_virtual_dataset(name, layout, fillvalue=0)


def _concatenate(f, name, dtype, shards, sizes) -> None:
    arrays, offset = [], 0
    for (path, _), (videos, _) in zip(shards, sizes):
        with h5py.File(path, "r") as src:
            data = src[name].asstr()[()] if dtype is STR else src[name][()]
            if name == "texts/video":
                data = data + offset
            arrays.append(np.asarray(data, dtype=object if dtype is STR else dtype))
        offset += videos
    data = np.concatenate(arrays)
    f.create_dataset(name, data=data, dtype=dtype, **storage_for(name, data.shape, dtype))


def source_files(path: str | Path) -> list[Path]:
    """The files a (possibly merged) cache reads from, itself first."""
    path = Path(path)
    with h5py.File(path, "r") as f:
        dataset = json.loads(f.attrs.get("dataset", "{}"))
    return [path] + [path.parent / rel for rel in dataset.get("shard", {}).get("merged_from", [])]
