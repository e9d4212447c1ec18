"""The gallery store: the re-ranker's selected tokens of every gallery video, computed once.

The selectors depend on the video only, so ``tvrerank gallery`` runs them over the gallery once
and keeps their output in ``RUN_DIR/gallery/<cache>-<digest>.h5``: the tokens as float16 (half the
bytes of float32; read back as float32, so rankings can differ from computing them on the fly only
where two candidates' scores are within float16 rounding — measured in docs/design.md), the
padding masks as booleans. A query then reads K small records instead of K full
token grids. The file records which cache and which re-ranker it was made from; its sha256 is kept
beside it (``NAME.h5.sha256``) and checked when it is opened, so damaged records (which may stay
finite and silently reorder results) are never used: the store is skipped with a warning.

The datasets are contiguous and uncompressed, so a reader memory-maps them: fetching K scattered
records is K memory copies (microseconds; a warm page cache assumed), where h5py's per-record
selections cost ~100 us each (milliseconds per query, more than the re-ranking it feeds).
"""

from __future__ import annotations

import logging
import mmap
from pathlib import Path

import h5py
import numpy as np
import torch

from tvrerank.cache.identity import cache_video_ids_digest
from tvrerank.cache.reader import CacheReader
from tvrerank.cache.rows import CacheRows
from tvrerank.errors import CorruptFile, InputError, TvrerankError, reason_of
from tvrerank.files import checksummed_file, file_sha256, require_space, verify_checksum
from tvrerank.rerank.checkpoint import load_reranker
from tvrerank.rerank.inference import select_videos
from tvrerank.rerank.model import Reranker, SelectedVideos

log = logging.getLogger(__name__)

FIELDS = SelectedVideos.names()  # one dataset each
# /1 (chunked per record) and /2 (float32, frame tokens in one row per video) are no longer read:
# rebuild with `tvrerank gallery`
FORMAT = "tvrerank.gallery/3"
STORED_FLOAT = np.float16


def store_path(run_dir: str | Path, cache_path: str | Path, ids_digest: str) -> Path:
    """Where the store of this cache (``ids_digest``: its video-ids digest) lives in ``run_dir``."""
    return Path(run_dir) / "gallery" / f"{Path(cache_path).stem}-{ids_digest[:12]}.h5"


def reranker_digest(run_dir: str | Path) -> str:
    return file_sha256(Path(run_dir) / "reranker.pt")


def build_gallery_store(cache_path: str | Path, run_dir: str | Path, model: Reranker, *,
                        device: torch.device, batch: int = 128) -> Path:
    """Select tokens for every ok video of the cache; returns the store's path."""
    model.eval()  # hard top-k, as at query time
    with CacheReader(cache_path) as cache:
        rows = cache.ok_rows()
        if len(rows) == 0:
            raise InputError(f"{cache_path}: no video extracted ok, so there is nothing to store")
        digest = cache_video_ids_digest(cache)
        path = store_path(run_dir, cache_path, digest)
    source = CacheRows(cache_path, memory_budget=0)
    parts = (select_videos(model, source, rows[start : start + batch], device=device)
             for start in range(0, len(rows), batch))
    return write_gallery_store(path, rows, parts, cache_path=cache_path, ids_digest=digest,
                               reranker_sha256=reranker_digest(run_dir), per_video=store_bytes_per_video(model.config))


def store_bytes_per_video(c) -> int:
    """Bytes of one video's record for a re-ranker config ``c``: float16 tokens, boolean pads, its row number."""
    return np.dtype(STORED_FLOAT).itemsize * c.width * (c.frames * c.kept_per_frame + c.video_keep) + \
        c.frames + c.video_keep + 8


def write_gallery_store(path: Path, rows: np.ndarray, parts, *, cache_path: str | Path, ids_digest: str,
                        reranker_sha256: str, per_video: int) -> Path:
    """Write a store: rows (N,) cache rows, ``parts`` the records of consecutive rows in order (each a
    ``SelectedVideos``, tensors (B, ...)); tokens as float16, contiguous datasets (readers memory-map
    them). The file replaces ``path`` only once complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    require_space(path, len(rows) * per_video + (1 << 20), "the gallery store")
    with checksummed_file(path) as tmp, h5py.File(tmp, "w") as f:
        f["rows"] = rows
        start = 0
        for part in parts:
            for name in FIELDS:
                array = getattr(part, name).cpu().numpy()
                if array.dtype.kind == "f":
                    array = array.astype(STORED_FLOAT)
                if name not in f:
                    # contiguous (no chunks, no filter): readers memory-map it
                    f.create_dataset(name, shape=(len(rows),) + array.shape[1:], dtype=array.dtype)
                f[name][start : start + len(array)] = array
            start += len(part.frame_tokens)
        if start != len(rows):
            raise ValueError(f"{len(rows)} rows but records of {start}")
        f.attrs.update({"format": FORMAT, "cache": str(cache_path), "video_ids_sha256": ids_digest,
                        "reranker_sha256": reranker_sha256})
    return path


def build_for_run(cache_path: str | Path, run_dir: str | Path, device: torch.device) -> Path:
    """``tvrerank gallery``: load the run, check it belongs with the cache, build the store."""
    trained = load_reranker(run_dir, device)
    with CacheReader(cache_path) as cache:
        trained.require_cache(cache)
    return build_gallery_store(cache_path, run_dir, trained.model, device=device)


class GalleryStore:
    """Reads selected-token records by cache row from a store made for this cache and re-ranker."""

    def __init__(self, path: Path):
        self.path = path
        self.file = h5py.File(path, "r")
        if self.file.attrs.get("format") != FORMAT:
            self.file.close()
            raise StoreFormatError(f"{path} was made by an older version: rebuild it with `tvrerank gallery`")
        try:
            self.rows = self.file["rows"][()]
            mapped = _map_for_random_reads(path)
            self.arrays = {name: _memory_map(path, self.file[name], mapped) for name in FIELDS}
        except Exception:
            self.file.close()
            raise

    @classmethod
    def find(cls, run_dir: str | Path, cache: CacheReader) -> "GalleryStore | None":
        """The store of this cache and re-ranker, or None (missing or made for another one)."""
        ids_digest = cache_video_ids_digest(cache)
        path = store_path(run_dir, cache.path, ids_digest)
        if not path.is_file():
            return None
        try:
            verify_checksum(path, f"rebuild it with `tvrerank gallery --gallery {cache.path} --reranker {run_dir}`",
                            what="gallery store")
            store = cls(path)
        except CorruptFile as exc:  # damaged bytes: score without it (a correct result, only slower)
            log.warning("unreadable gallery store: %s; scoring without it", exc)
            return None
        except StoreFormatError as exc:
            log.warning("%s (not used now)", exc)
            return None
        except (OSError, ValueError, KeyError) as exc:  # truncated or damaged: score without it
            log.warning("%s: unreadable gallery store (%s); scoring without it. Rebuild it with "
                        "`tvrerank gallery --gallery %s --reranker %s`", path, reason_of(exc, limit=120),
                        cache.path, run_dir)
            return None
        attrs = store.file.attrs
        if (attrs["video_ids_sha256"] != ids_digest
                or attrs["reranker_sha256"] != reranker_digest(run_dir)):
            store.close()
            return None
        return store

    def positions(self, rows: np.ndarray) -> np.ndarray:
        """rows (U,) cache rows → the positions of their records (U,); KeyError if one has none."""
        positions = np.searchsorted(self.rows, rows)
        if not np.array_equal(self.rows[np.clip(positions, 0, len(self.rows) - 1)], rows):
            raise KeyError("a requested video is not in the gallery store")
        return positions

    def read(self, rows: np.ndarray, device: torch.device) -> SelectedVideos:
        """rows (U,) unique cache rows, in any order → their selected tokens, in that order."""
        positions = self.positions(rows)
        arrays = {name: torch.from_numpy(array[positions].astype(np.float32) if array.dtype.kind == "f"
                                         else array[positions]) for name, array in self.arrays.items()}
        return SelectedVideos(**arrays).to(device)

    @property
    def nbytes(self) -> int:
        return sum(array.nbytes for array in self.arrays.values())

    def on_device(self, device: torch.device) -> "DeviceStore":
        return DeviceStore(self, device)

    def close(self) -> None:
        self.arrays = {}
        self.file.close()


class DeviceStore:
    """A gallery store's records copied to ``device`` once (tokens float16, as stored) and gathered by
    position with device operations only: a query costs no host work and no copy, and the gather
    can be part of a captured CUDA graph (``retrieve/query_scorer.py``)."""

    def __init__(self, store: GalleryStore, device: torch.device):
        self.arrays = {name: torch.from_numpy(np.array(array)).to(device) for name, array in store.arrays.items()}
        self.records = len(store.rows)

    def gather(self, positions: torch.Tensor) -> SelectedVideos:
        """positions (K,) int64 on the device → those K records; tokens float32, as ``GalleryStore.read``."""
        picked = {name: array.index_select(0, positions) for name, array in self.arrays.items()}
        return SelectedVideos(**{name: t.float() if t.is_floating_point() else t for name, t in picked.items()})


class StoreFormatError(TvrerankError, ValueError):
    """A gallery store this version cannot read (made by an older one); `tvrerank gallery` rebuilds it."""


def _map_for_random_reads(path: Path) -> mmap.mmap:
    """The whole file mapped read-only, with the kernel told that reads are random: a query reads K
    scattered records, so read-ahead around each page fault would only pull in other records from a
    cold disk. (It does not change how many page-cache pages a warm store maps into the process:
    ``benchmarks/README.md``, "A million videos".)"""
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(mapped, "madvise") and hasattr(mmap, "MADV_RANDOM"):  # Linux and macOS; elsewhere a hint lost
        mapped.madvise(mmap.MADV_RANDOM)
    return mapped


def _memory_map(path: Path, dataset: h5py.Dataset, mapped: mmap.mmap) -> np.ndarray:
    """A read-only view of a contiguous, unfiltered HDF5 dataset straight from the file's bytes in ``mapped``."""
    if dataset.chunks is not None or dataset.compression is not None:
        raise StoreFormatError(f"{path}: {dataset.name} is chunked or compressed; rebuild it with `tvrerank gallery`")
    offset = dataset.id.get_offset()  # None until written
    if offset is None:
        raise StoreFormatError(f"{path}: {dataset.name} was never written; rebuild it with `tvrerank gallery`")
    count = int(np.prod(dataset.shape))
    if offset + count * dataset.dtype.itemsize > len(mapped):
        raise StoreFormatError(f"{path}: {dataset.name} runs past the end of the file (truncated); rebuild it with "
                               "`tvrerank gallery`")
    return np.frombuffer(mapped, dtype=dataset.dtype, count=count, offset=offset).reshape(dataset.shape)


def describe(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return {"videos": int(f["rows"].shape[0]), "bytes": path.stat().st_size,
                "attrs": {k: str(v) for k, v in f.attrs.items()}}
