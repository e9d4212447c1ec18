"""Writing a cache crash-safely: finished parts on disk, one atomic assembly at the end.

HDF5 files are not crash-safe: a process killed while writing can leave one unreadable. So
extraction never writes into the final file as it goes. It writes each finished *part* (a
fixed range of video rows and their captions) as a small HDF5 file in ``CACHE.h5.parts/``,
each by write-to-temporary then rename, next to a ``plan.json`` that records what the run
is. Killed at any moment, the finished parts survive; the same command run again skips
them. When every part is there, ``assemble`` streams them in order into ``CACHE.h5.tmp``
and renames it to ``CACHE.h5``: the final file either does not exist or is complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from tvrerank.cache.checksums import damaged_reads, seal
from tvrerank.cache.encoding import encode_tokens, has_scale, without_padding
from tvrerank.cache.identity import as_read_today, fingerprint_differences
from tvrerank.cache.schema import SCALE_ARRAY, STR, CacheHeader, dataset_specs, spec_bytes, storage_for
from tvrerank.errors import TvrerankError
from tvrerank.files import replaced_file, require_space

log = logging.getLogger(__name__)


@dataclass
class PartData:
    """Results for one part: rows are positions in the cache's videos/ and texts/ tables."""

    video_rows: np.ndarray  # (n,) int64
    videos: dict[str, np.ndarray]  # schema.part_arrays' video arrays, each (n, ...)
    text_rows: np.ndarray  # (m,) int64
    texts: dict[str, np.ndarray]  # its text arrays, each (m, ...)


def encoded_part(part: PartData, token_dtype: str) -> PartData:
    """The part with its float16 tokens in ``token_dtype`` (``cache.encoding``; a scale per token beside
    the codes; caption positions past their length zero); float16: the part itself."""
    if not has_scale(token_dtype):
        return part
    videos, texts = dict(part.videos), dict(part.texts)
    texts["tokens"] = without_padding(texts["tokens"], texts["length"])
    for arrays in (videos, texts):
        arrays["tokens"], arrays[SCALE_ARRAY] = encode_tokens(arrays["tokens"], token_dtype)
    return replace(part, videos=videos, texts=texts)


class PlanMismatch(TvrerankError, ValueError):
    """An unfinished run in the parts folder was started with other settings."""


class PartStore:
    """The ``CACHE.h5.parts/`` folder of an unfinished extraction."""

    def __init__(self, cache_path: str | Path):
        cache_path = Path(cache_path)
        self.folder = cache_path.with_name(cache_path.name + ".parts")

    def part_path(self, index: int) -> Path:
        return self.folder / f"part-{index:06d}.h5"

    def start(self, plan: dict) -> None:
        """Create the folder for ``plan``, or check that an existing one holds the same plan."""
        plan_path = self.folder / "plan.json"
        if plan_path.exists():
            previous = json.loads(plan_path.read_text())
            if "fingerprint" in previous:  # a run started before a field existed reads with its default
                previous["fingerprint"] = json.loads(json.dumps(as_read_today(previous["fingerprint"])))
            if previous != plan:
                changed = sorted(k for k in set(plan) | set(previous) if plan.get(k) != previous.get(k))
                if "fingerprint" in changed:  # name the settings, e.g. sampling.resize (extract --resize)
                    changed[changed.index("fingerprint")] = "; ".join(fingerprint_differences(
                        plan["fingerprint"], previous.get("fingerprint") or {}, "the unfinished run", label="this run"))
                raise PlanMismatch(
                    f"{self.folder} holds an unfinished run with other settings ({', '.join(changed)}); "
                    "rerun it with the same options to resume, or pass --overwrite to start over"
                )
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = plan_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(plan, indent=1, sort_keys=True))
        os.replace(tmp, plan_path)

    def finished(self, count: int) -> set[int]:
        """Indices of parts already written whole (a part file exists only once complete)."""
        return {i for i in range(count) if self.part_path(i).exists()}

    def write(self, index: int, part: PartData) -> None:
        final = self.part_path(index)
        tmp = final.with_suffix(".h5.tmp")
        arrays = [*part.videos.values(), *part.texts.values()]
        needed = sum(a.nbytes if a.dtype != object else strings_bytes(a) for a in arrays)
        require_space(final, int(needed * 1.02) + (256 << 10), f"part {index}")
        with replaced_file(final, tmp) as tmp, h5py.File(tmp, "w") as f:
            f["video_rows"], f["text_rows"] = part.video_rows, part.text_rows
            for name, array in part.videos.items():
                _checked_dataset(f, f"videos/{name}", array, STR if name == "error" else array.dtype)
            for name, array in part.texts.items():
                _checked_dataset(f, f"texts/{name}", array, array.dtype)

    def read(self, index: int) -> PartData:
        path = self.part_path(index)
        with h5py.File(path, "r") as f, damaged_reads(path, "a dataset", advice="delete that part file and run the "
                                                      "same command again: the part is extracted again"):
            return PartData(
                video_rows=f["video_rows"][()],
                videos={k: _read(f[f"videos/{k}"]) for k in f["videos"]},
                text_rows=f["text_rows"][()],
                texts={k: f[f"texts/{k}"][()] for k in f["texts"]},
            )

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _checked_dataset(f: h5py.File, name: str, array: np.ndarray, dtype) -> None:
    """A part's dataset; numeric ones chunked as in the cache (``chunks_for``: one video's tokens per
    chunk) with a checksum per chunk (strings cannot carry one). h5py's automatic chunks (64 KB,
    strided across frames) wrote and read parts ~1.4x slower."""
    options = storage_for(name, array.shape, dtype) if array.size > 0 else {}
    f.create_dataset(name, data=array, dtype=dtype, **options)


class _CacheFile(h5py.File):
    """An open cache being written: closing it records its strings' digests (cache/checksums.py)."""

    def close(self) -> None:
        if self.id.valid and self.mode == "r+":
            seal(self)
        super().close()


def _read(dataset: h5py.Dataset) -> np.ndarray:
    if h5py.check_string_dtype(dataset.dtype):
        return dataset.asstr()[()]
    return dataset[()]


def create_cache(
    path: str | Path,
    header: CacheHeader,
    *,
    video_ids: Sequence[str],
    video_paths: Sequence[str],
    captions: Sequence[str],
    caption_video: np.ndarray,
) -> h5py.File:
    """Create an empty cache with every dataset allocated (status pending); returns it open.

    Numeric datasets carry a fletcher32 checksum per chunk; closing the file records the digests of
    its string datasets (cache/checksums.py), so write everything before closing it.
    """
    f = _CacheFile(path, "w")
    f.attrs.update(header.to_attrs())
    specs = dataset_specs(len(video_ids), len(captions), header.layout, header.sampling.frames)
    for name, (shape, dtype) in specs.items():
        f.create_dataset(name, shape=shape, dtype=dtype, **storage_for(name, shape, dtype))
    f["videos/id"][:] = list(video_ids)
    f["videos/path"][:] = list(video_paths)
    f["texts/caption"][:] = list(captions)
    f["texts/video"][:] = caption_video
    return f


def write_part(f: h5py.File, part: PartData) -> None:
    """Copy one part's rows into an open cache (rows are contiguous and increasing)."""
    for group, rows, arrays in (("videos", part.video_rows, part.videos), ("texts", part.text_rows, part.texts)):
        if len(rows) == 0:
            continue
        window = slice(int(rows[0]), int(rows[-1]) + 1)
        if window.stop - window.start != len(rows):
            raise ValueError("part rows must be contiguous")
        for name, array in arrays.items():
            f[f"{group}/{name}"][window] = array


def assemble(
    parts: PartStore,
    count: int,
    out: str | Path,
    header: CacheHeader,
    *,
    video_ids: Sequence[str],
    video_paths: Sequence[str],
    captions: Sequence[str],
    caption_video: np.ndarray,
) -> None:
    """Stream parts 0..count-1 into ``out`` atomically (``out.tmp`` then rename).

    The free space is checked first against the file's size (``cache_bytes``): HDF5 that runs out
    of space mid-write cannot close its file cleanly (each dataset fails to flush, and the process
    has died of SIGBUS or SIGSEGV at exit), so a full disk is refused before anything is written.
    If the disk still fills (another writer), the partial ``.tmp`` is removed and the ENOSPC error
    goes on; the parts stay, so the same command resumes.
    """
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.unlink(missing_ok=True)  # a leftover of an earlier failed assembly
    require_space(out, cache_bytes(header, video_ids, video_paths, captions), "the cache")
    with replaced_file(out, tmp) as tmp, create_cache(
        tmp, header, video_ids=video_ids, video_paths=video_paths, captions=captions, caption_video=caption_video,
    ) as f:
        for index in range(count):
            write_part(f, parts.read(index))


def cache_bytes(header: CacheHeader, video_ids: Sequence[str], video_paths: Sequence[str],
                captions: Sequence[str]) -> int:
    """The final file's size, from above: every array, the strings, a checksum per chunk, 1 MiB for HDF5's own
    structures, plus 2%."""
    specs = dataset_specs(len(video_ids), len(captions), header.layout, header.sampling.frames)
    arrays = sum(spec_bytes(shape, dtype) for shape, dtype in specs.values() if dtype is not STR)
    strings = sum(strings_bytes(group) for group in (video_ids, video_paths, captions))
    errors = 256 * len(video_ids)  # failure messages, written by the parts
    return int((arrays + strings + errors) * 1.02) + (1 << 20)


def strings_bytes(values) -> int:
    """What variable-length strings take in an HDF5 file, from above: their UTF-8 bytes plus 32 each."""
    return sum(len(str(s).encode()) + 32 for s in values)
