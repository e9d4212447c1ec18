"""Training data from the cache and the candidate lists alone (the backbone never runs).

``CacheRows`` reads video rows (tokens, frame embeddings, masks) and caption rows from the cache — opening the
HDF5 file lazily in whichever process uses it (DataLoader workers included), or holding the
split in memory when it fits. ``TrainingBatches`` is a map-style dataset whose item ``i`` is a
whole training step: B captions, each with its positive video, hard negatives from its top-K
candidates and in-batch negatives (other captions' videos), plus the tokens of every video the
step needs, each read once. A step depends only on (seed, step), so a resumed run sees the same
batches.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from tvrerank.cache.reader import CacheReader, read_rows
from tvrerank.cache.schema import OK

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
            video_bytes = int(np.prod(cache["videos/tokens"].shape)) * 2
            text_bytes = int(np.prod(cache["texts/tokens"].shape)) * 2
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
            self._arrays[group] = {k: f[f"{group}/{k}"][()] for k in fields}
            log.info("holding %s's %s in memory", self.path, group)
        return {k: v[rows] for k, v in self._arrays[group].items()}

    def videos(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """rows (U,) unique (any order) → tokens (U, T, P, D), frame_emb (U, T, E) float32, frame_mask (U, T)."""
        data = self._read("videos", VIDEO_FIELDS, rows)
        return {
            "tokens": torch.from_numpy(data["tokens"].astype(np.float32)),
            "frame_emb": torch.from_numpy(data["frame_emb"].astype(np.float32)),
            "frame_mask": torch.from_numpy(data["frame_mask"].astype(bool)),
        }

    def texts(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """rows (B,) sorted, unique → text_tokens (B, L, Dt) float32, text_length (B,) int64."""
        data = self._read("texts", TEXT_FIELDS, rows)
        return {"text_tokens": torch.from_numpy(data["tokens"].astype(np.float32)),
                "text_length": torch.from_numpy(data["length"].astype(np.int64))}


@dataclass(frozen=True)
class BatchSpec:
    captions: int = 32  # B
    negatives: int = 7  # hard negatives from each caption's top-K
    in_batch: int = 4  # other captions' videos


class TrainingBatches(torch.utils.data.Dataset):
    """Item ``step`` → one training step's tensors (see module docstring). Length = steps."""

    def __init__(self, cache_path: str | Path, candidate_video: np.ndarray, *, spec: BatchSpec, steps: int,
                 seed: int = 0, rank: int = 0, memory_budget: int = 2 << 30):
        with CacheReader(cache_path) as cache:
            self.caption_video = cache["texts/video"][()]
            self.ok = cache["videos/status"][()] == OK
        self.candidates = candidate_video  # (M, K) cache rows
        self.trainable = np.flatnonzero(self.ok[self.caption_video])
        if len(self.trainable) < 2:
            raise ValueError(f"{cache_path}: fewer than 2 captions have an ok video; nothing to train on")
        skipped = len(self.caption_video) - len(self.trainable)
        if skipped:
            log.warning("%d captions belong to videos that failed extraction: skipped", skipped)
        self.ok_rows = np.flatnonzero(self.ok)
        self.spec, self.steps, self.seed, self.rank = spec, steps, seed, rank
        self.rows = CacheRows(cache_path, memory_budget=memory_budget)

    def __len__(self) -> int:
        return self.steps

    def group_rows(self, captions: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(B,) caption ids → (B, G) video rows: positive first, then hard and in-batch negatives."""
        spec = self.spec
        positives = self.caption_video[captions]
        groups = np.empty((len(captions), 1 + spec.negatives + spec.in_batch), dtype=np.int64)
        for i, (caption, positive) in enumerate(zip(captions, positives)):
            hard = self.candidates[caption]
            hard = hard[(hard >= 0) & (hard != positive)]
            others = np.unique(positives[positives != positive])
            chosen = list(rng.permutation(hard)[: spec.negatives])
            chosen += list(rng.permutation(others)[: spec.in_batch])
            while len(chosen) < groups.shape[1] - 1:  # small galleries: random ok videos
                extra = int(rng.choice(self.ok_rows))
                if extra != positive:
                    chosen.append(extra)
            groups[i] = [positive] + chosen
        return groups

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step, self.rank])
        count = min(self.spec.captions, len(self.trainable))
        captions = np.sort(rng.choice(self.trainable, count, replace=False))
        groups = self.group_rows(captions, rng)
        rows, pair_video = np.unique(groups, return_inverse=True)  # each video read once
        batch = {**self.rows.videos(rows), **self.rows.texts(captions)}
        batch["pair_video"] = torch.from_numpy(pair_video.reshape(groups.shape))  # (B, G) into rows
        return batch


def collate_single(items: list[dict]) -> dict:
    """The dataset already yields whole batches."""
    (item,) = items
    return item
