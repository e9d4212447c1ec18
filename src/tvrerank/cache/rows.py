"""Reading rows of a cache as tensors: video rows (tokens, frame embeddings, masks) and caption rows.

``CacheRows`` opens the HDF5 file lazily in whichever process reads (so it pickles into DataLoader
workers), and holds a group in memory when it fits a byte budget. Training, evaluation and
serving all read the cache through it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import h5py
import numpy as np
import torch

from tvrerank.cache.checksums import damaged_reads
from tvrerank.cache.reader import CacheReader, read_rows

log = logging.getLogger(__name__)

VIDEO_FIELDS = ("tokens", "frame_emb", "frame_mask")
TEXT_FIELDS = ("tokens", "length")


class CacheRows:
    """Reads video rows (tokens, frame_emb, frame_mask) and caption rows (tokens, length).

    The HDF5 file is opened lazily in whichever process reads (so it is safe to pickle into
    DataLoader workers); a group is held in memory when it fits ``memory_budget`` bytes.
    """

    def __init__(self, cache_path: str | Path, *, memory_budget: int = 2 << 30):
        self.path = str(cache_path)
        self._file: h5py.File | None = None
        self._pid: int | None = None
        with CacheReader(cache_path) as cache:
            video_bytes = cache["videos/tokens"].nbytes
            text_bytes = cache["texts/tokens"].nbytes
        self._in_memory = {"videos": video_bytes <= memory_budget,
                           "texts": text_bytes <= max(0, memory_budget - video_bytes)}
        self._arrays: dict[str, dict[str, np.ndarray]] = {}

    def __getstate__(self):
        return dict(self.__dict__, _file=None, _pid=None)

    def _open(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = h5py.File(self.path, "r"), os.getpid()
        return self._file

    def _read(self, group: str, fields: tuple[str, ...], rows: np.ndarray) -> dict[str, np.ndarray]:
        if not self._in_memory[group]:
            f = self._open()
            return {k: read_rows(f[f"{group}/{k}"], rows) for k in fields}  # rows unique
        if group not in self._arrays:
            f = self._open()
            arrays = {}
            for k in fields:
                with damaged_reads(self.path, f"{group}/{k}"):
                    arrays[k] = f[f"{group}/{k}"][()]
            self._arrays[group] = arrays
            log.info("holding %s's %s in memory", self.path, group)
        return {k: v[rows] for k, v in self._arrays[group].items()}

    def videos(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """rows (U,) unique (any order) → tokens (U, T, P, D) float16 as stored, frame_emb (U, T, E) float32,
        frame_mask (U, T).

        The tokens stay float16 (the model converts them on its device): half the bytes to copy to a
        GPU, and no host-side conversion, which cost more than the read itself.
        """
        data = self._read("videos", VIDEO_FIELDS, rows)
        return {
            "tokens": torch.from_numpy(data["tokens"]),
            "frame_emb": torch.from_numpy(data["frame_emb"].astype(np.float32)),
            "frame_mask": torch.from_numpy(data["frame_mask"].astype(bool)),
        }

    def embeddings(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Unit-length float32 rows of ``texts/emb`` or ``videos/video_emb``: rows (U,) unique → (U, E)."""
        dataset, order = self._open()[name], np.argsort(rows)
        data = np.empty((len(rows),) + dataset.shape[1:], dtype=np.float32)
        data[order] = read_rows(dataset, np.asarray(rows)[order])
        return data / np.maximum(np.linalg.norm(data, axis=1, keepdims=True), 1e-12)

    def texts(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """rows (B,) sorted, unique → text_tokens (B, L, Dt) float32, text_length (B,) int64."""
        data = self._read("texts", TEXT_FIELDS, rows)
        return {"text_tokens": torch.from_numpy(data["tokens"].astype(np.float32)),
                "text_length": torch.from_numpy(data["length"].astype(np.int64))}
