"""``cache info`` and ``cache check``: what a cache holds, and whether later stages can trust it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np

from tvrerank.cache.checksums import is_damage, verify_strings
from tvrerank.cache.merge import source_files
from tvrerank.cache.reader import CacheReader
from tvrerank.cache.schema import FAILED, OK, PENDING, STR, dataset_specs
from tvrerank.cache.truth import DETAIL_DATASET, check_truth
from tvrerank.config import to_dict

#: Rows read at a time when scanning big arrays, so a check never holds a split in memory.
SCAN_ROWS = 64


def cache_info(path: str | Path) -> dict[str, Any]:
    """Counts, encoder, sampling, token layout, dataset shapes and bytes on disk."""
    with CacheReader(path) as cache:
        header = cache.header
        status = cache["videos/status"][()]
        shapes = {}
        cache.file.visititems(
            lambda name, obj: shapes.__setitem__(name, [list(obj.shape), str(obj.dtype)])
            if isinstance(obj, h5py.Dataset) else None
        )
        files = source_files(path)
        return {
            "path": str(path),
            "schema": cache.file.attrs["schema"],
            "tool_version": header.tool_version,
            "created": header.created,
            "videos": int(len(status)),
            "videos_ok": int((status == OK).sum()),
            "videos_failed": int((status == FAILED).sum()),
            "videos_pending": int((status == PENDING).sum()),
            "captions": cache.num_captions,
            "frames": header.sampling.frames,
            "tokens_per_frame": header.layout.tokens_per_frame,
            "token_dim": header.layout.token_dim,
            "embed_dim": header.layout.embed_dim,
            "text_tokens": header.layout.text_tokens,
            "text_token_dim": header.layout.text_token_dim,
            "token_space": header.layout.space,
            "token_pool": header.layout.pool,
            "token_dtype": header.layout.token_dtype,
            "encoder": {k: v for k, v in to_dict(header.encoder).items() if k != "model_config"},
            "sampling": to_dict(header.sampling),
            "dataset": header.dataset,
            "shapes": shapes,
            "bytes_on_disk": int(sum(f.stat().st_size for f in files if f.exists())),
            "files": [str(f) for f in files],
        }


def _scan(dataset: h5py.Dataset) -> tuple[int, list[int]]:
    """Read all of ``dataset``, SCAN_ROWS rows at a time: (rows holding NaN or inf, rows whose
    bytes fail their checksum). Reading every chunk is what checks every checksum."""
    nonfinite, damaged = 0, []
    for start in range(0, dataset.shape[0], SCAN_ROWS):
        stop = min(dataset.shape[0], start + SCAN_ROWS)
        try:
            block = dataset[start:stop]
        except OSError as exc:
            if not is_damage(exc):
                raise
            damaged += _damaged_rows(dataset, start, stop)
            continue
        if block.dtype.kind == "f":
            nonfinite += int((~np.isfinite(block.reshape(block.shape[0], -1)).all(axis=1)).sum())
    return nonfinite, damaged


def _damaged_rows(dataset: h5py.Dataset, start: int, stop: int) -> list[int]:
    rows = []
    for row in range(start, stop):
        try:
            dataset[row : row + 1]
        except OSError:
            rows.append(row)
    return rows or list(range(start, stop))


def _spans(rows: list[int]) -> str:
    """[3, 4, 5, 9] → '3-5, 9' (at most five spans)."""
    spans: list[list[int]] = []
    for row in rows:
        if spans and row == spans[-1][1] + 1:
            spans[-1][1] = row
        else:
            spans.append([row, row])
    text = [f"{a}-{b}" if b > a else str(a) for a, b in spans]
    return ", ".join(text[:5]) + (f" and {len(text) - 5} more" if len(text) > 5 else "")


def checksum_notes(path: str | Path) -> list[str]:
    """What ``cache check`` cannot vouch for: a cache written before checksums existed (nothing for a
    file that does not open: ``check_cache`` has said so)."""
    try:
        f = h5py.File(path, "r")
    except OSError:
        return []
    with f:
        numeric = [d for d in _datasets(f) if d.dtype.kind != "O" and d.size and not d.is_virtual]
        notes = []
        if numeric and not any(d.fletcher32 for d in numeric):
            notes.append("its arrays carry no checksums (written by an earlier tvrerank): damaged bytes in tokens "
                         "and embeddings cannot be found; extract it again to add them")
        if verify_strings(f) is None:
            notes.append("its strings carry no checksums: damaged bytes in ids, paths and captions cannot be found")
    return notes


def _datasets(f: h5py.File) -> list[h5py.Dataset]:
    found = []
    f.visititems(lambda name, obj: found.append(obj) if isinstance(obj, h5py.Dataset) else None)
    return found


def check_cache(path: str | Path) -> list[str]:
    """Problems found (empty when the cache is sound): schema, shapes, NaN/inf, completeness."""
    try:
        cache = CacheReader(path)
    except (FileNotFoundError, ValueError) as exc:
        return [str(exc)]
    shards = source_files(path)[1:]
    problems = [f"shard file {p} is missing (the merged cache maps onto it)" for p in shards if not p.exists()]
    for shard in shards:  # a merged cache reads the shards' arrays, which carry the checksums
        if shard.exists():
            problems += [f"shard {shard}: {problem}" for problem in check_cache(shard)]
    with cache:
        header, f = cache.header, cache.file
        n = f["videos/id"].shape[0] if "videos/id" in f else 0
        m = f["texts/caption"].shape[0] if "texts/caption" in f else 0
        for name, (shape, dtype) in dataset_specs(n, m, header.layout, header.sampling.frames).items():
            if name not in f:
                problems.append(f"missing dataset {name}")
            elif tuple(f[name].shape) != tuple(shape):
                problems.append(f"{name}: shape {f[name].shape}, expected {shape}")
            elif np.dtype(f[name].dtype).kind != np.dtype(dtype).kind:
                problems.append(f"{name}: dtype {f[name].dtype}, expected {np.dtype(dtype)}")
        if problems:
            return problems
        try:  # the optional known answers of a toy world (cache/truth.py)
            problems += check_truth(f, videos=n, frames=header.sampling.frames,
                                    tokens_per_frame=header.layout.tokens_per_frame, grid=tuple(header.layout.grid))
        except OSError as exc:
            if not is_damage(exc):
                raise
            problems.append(f"{DETAIL_DATASET}: holds damaged bytes (they fail their checksum)")
        for name, (_, dtype) in dataset_specs(n, m, header.layout, header.sampling.frames).items():
            if dtype is STR:
                continue
            nonfinite, damaged = _scan(f[name])
            if damaged:
                problems.append(f"{name}: rows {_spans(damaged)} hold damaged bytes (they fail their checksum)")
            if nonfinite:
                problems.append(f"{name}: {nonfinite} rows hold NaN or inf")
        changed = verify_strings(f) or []
        problems += [f"{name}: its text does not match the checksum recorded when it was written (damaged bytes)"
                     for name in changed]
        if any("damaged" in p for p in problems):
            return problems + [f"extract {path} again (or restore it from a copy)"]
        status = f["videos/status"][()]
        mask = f["videos/frame_mask"][()]
        errors = f["videos/error"].asstr()[()]
        if (pending := int((status == PENDING).sum())):
            problems.append(f"{pending} videos are still pending (an unfinished extraction)")
        if (unknown := int((~np.isin(status, [PENDING, OK, FAILED])).sum())):
            problems.append(f"{unknown} videos have an unknown status")
        if (empty := int(((status == OK) & ~mask.any(1)).sum())):
            problems.append(f"{empty} ok videos have no valid frame")
        if (silent := int(((status == FAILED) & (errors == "")).sum())):
            problems.append(f"{silent} failed videos have no error message")
        video = f["texts/video"][()]
        if len(video) and (video.min() < 0 or video.max() >= n):
            problems.append("texts/video points outside videos/")
        lengths = f["texts/length"][()]
        if len(lengths) and (lengths.min() < 1 or lengths.max() > header.layout.text_tokens):
            problems.append(f"texts/length outside 1..{header.layout.text_tokens}")
        norms = np.linalg.norm(f["videos/video_emb"][()].astype(np.float32), axis=1)
        if (off := int((np.abs(norms[status == OK] - 1) > 1e-2).sum())):
            problems.append(f"videos/video_emb: {off} ok videos are not L2-normalised")
    return problems
