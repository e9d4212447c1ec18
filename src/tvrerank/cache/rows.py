"""Reading rows of a cache as tensors: video rows (tokens, frame embeddings, masks) and caption rows.

``CacheRows`` opens the HDF5 file lazily in whichever process reads (so it pickles into DataLoader
workers). With ``in_memory`` it loads a group's arrays once, in their stored encoding, and every
read then gathers from memory: ``auto`` holds a group when it fits the byte budget (on a GPU, when
it fits half the device's free memory, the arrays are held *on the device* and gathered there),
``on`` holds it whatever its size, ``off`` reads every row from the file. Training, evaluation and
serving all read the cache through it.

Tokens come back as stored (float16, or 8-bit codes with ``token_scale`` beside them:
``cache.encoding``); ``on_device`` moves a batch to the device and decodes them there, so the
host→device copy moves the stored bytes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import h5py
import numpy as np
import torch

from tvrerank.cache.checksums import damaged_reads
from tvrerank.cache.encoding import decode_tokens
from tvrerank.cache.reader import CacheReader, read_rows
from tvrerank.cache.schema import SCALE_ARRAY
from tvrerank.errors import InputError

log = logging.getLogger(__name__)

VIDEO_FIELDS = ("tokens", "frame_emb", "frame_mask")
TEXT_FIELDS = ("tokens", "length")
IN_MEMORY = ("auto", "on", "off")
GPU_SHARE = 0.5  # of the device's free memory that ``auto`` may fill with a cache's arrays
HOST_SHARE = 0.5  # of the host's available memory that ``auto`` may fill when no budget is given


def held_fields(scaled: bool) -> dict[str, tuple[str, ...]]:
    """group → the datasets ``CacheRows`` reads (and holds in memory) for a cache with or without token scales."""
    scale = (SCALE_ARRAY,) if scaled else ()
    return {"videos": VIDEO_FIELDS + scale, "texts": TEXT_FIELDS + scale}


def available_memory() -> int:
    """Bytes of host memory available to a new allocation now (Linux's MemAvailable; free pages elsewhere)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def default_memory_budget() -> int:
    """What ``auto`` may fill when no budget is given: half of the host's available memory."""
    return int(HOST_SHARE * available_memory())


def _human(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**28 else f"{num_bytes / 2**20:.1f} MiB"


class CacheRows:
    """Reads video rows (tokens [, token_scale], frame_emb, frame_mask) and caption rows (tokens
    [, token_scale], length), from the file or from memory (see the module docstring).

    ``memory_budget``: bytes of host memory ``auto`` may fill (the video group first, then the
    captions'; None: ``default_memory_budget()``); ``device``: where the training or evaluation runs (a CUDA device lets ``auto`` hold
    the arrays there).
    """

    def __init__(self, cache_path: str | Path, *, memory_budget: int | None = None, in_memory: str = "auto",
                 device: torch.device | str | None = None):
        if in_memory not in IN_MEMORY:
            raise InputError(f"in_memory must be one of {', '.join(IN_MEMORY)}, got {in_memory!r}")
        self.path = str(cache_path)
        self._file: h5py.File | None = None
        self._pid: int | None = None
        with CacheReader(cache_path) as cache:
            self.token_dtype = cache.header.layout.token_dtype
            self.scaled = SCALE_ARRAY in cache.file["videos"]
            fields = held_fields(self.scaled)
            sizes = {group: sum(cache[f"{group}/{k}"].nbytes for k in names) for group, names in fields.items()}
        self.fields = fields
        budget = default_memory_budget() if memory_budget is None else memory_budget
        self.place = self._choose_places(sizes, budget, in_memory, device)
        self._arrays: dict[str, dict] = {}

    def _choose_places(self, sizes: dict[str, int], budget: int, in_memory: str, device) -> dict[str, str]:
        """group → "file", "host" or "device", and a log line saying why."""
        device = torch.device(device) if device is not None else None
        if in_memory == "off":
            log.info("%s: reading every row from the file (in_memory off)", self.path)
            return {"videos": "file", "texts": "file"}
        total = sizes["videos"] + sizes["texts"]
        if device is not None and device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if in_memory == "on" or total <= GPU_SHARE * free:
                log.info("%s: holding its tokens (%s, %s) on %s (%s free)", self.path, _human(total), self.token_dtype,
                         device, _human(free))
                self.device = device
                return {"videos": "device", "texts": "device"}
        places = {"videos": "host" if in_memory == "on" or sizes["videos"] <= budget else "file"}
        left = budget - (sizes["videos"] if places["videos"] == "host" else 0)
        places["texts"] = "host" if in_memory == "on" or sizes["texts"] <= max(0, left) else "file"
        for group, place in places.items():
            if place == "host":
                log.info("%s: holding its %s (%s, %s) in memory", self.path, group, _human(sizes[group]), self.token_dtype)
            elif in_memory == "auto" and sizes[group]:
                log.info("%s: reading its %s from the file: %s exceed the memory budget of %s", self.path, group,
                         _human(sizes[group]), _human(budget))
        return places

    def __getstate__(self):
        return dict(self.__dict__, _file=None, _pid=None)

    def _open(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = h5py.File(self.path, "r"), os.getpid()
        return self._file

    def _read(self, group: str, rows: np.ndarray) -> dict:
        """The group's fields at ``rows`` (unique, any order): numpy arrays, or device tensors when held there."""
        if self.place[group] == "file":
            f = self._open()
            return {k: read_rows(f[f"{group}/{k}"], rows) for k in self.fields[group]}
        if group not in self._arrays:
            f = self._open()
            arrays = {}
            for k in self.fields[group]:
                with damaged_reads(self.path, f"{group}/{k}"):
                    arrays[k] = f[f"{group}/{k}"][()]
                if self.place[group] == "device":
                    arrays[k] = torch.from_numpy(arrays[k]).to(self.device)
            self._arrays[group] = arrays
        if self.place[group] == "device":
            index = torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(self.device)
            return {k: v.index_select(0, index) for k, v in self._arrays[group].items()}
        return {k: v[rows] for k, v in self._arrays[group].items()}

    @property
    def on_device(self) -> bool:
        """Whether reads come back as tensors on the device already (no DataLoader pinning or workers)."""
        return "device" in self.place.values()

    def videos(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """rows (U,) unique (any order) → tokens (U, T, P, D) as stored (float16, or 8-bit codes with
        token_scale (U, T, P)), frame_emb (U, T, E) float32, frame_mask (U, T) bool.

        The tokens stay as stored (``on_device`` decodes them on the device): the fewest bytes to copy
        to a GPU, and no host-side conversion, which cost more than the read itself.
        """
        data = {k: torch.as_tensor(v) for k, v in self._read("videos", rows).items()}
        data["frame_emb"] = data["frame_emb"].float()
        data["frame_mask"] = data["frame_mask"].bool()
        return data

    def embeddings(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Unit-length float32 rows of ``texts/emb`` or ``videos/video_emb``: rows (U,) unique → (U, E)."""
        dataset, order = self._open()[name], np.argsort(rows)
        data = np.empty((len(rows),) + dataset.shape[1:], dtype=np.float32)
        data[order] = read_rows(dataset, np.asarray(rows)[order])
        return data / np.maximum(np.linalg.norm(data, axis=1, keepdims=True), 1e-12)

    def texts(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """rows (B,) sorted, unique → text_tokens (B, L, Dt) (float32 from a float16 cache; 8-bit codes with
        text_token_scale (B, L) otherwise), text_length (B,) int64."""
        data = {k: torch.as_tensor(v) for k, v in self._read("texts", rows).items()}
        tokens = data["tokens"]
        out = {"text_tokens": tokens.float() if tokens.dtype == torch.float16 else tokens,
               "text_length": data["length"].long()}
        if SCALE_ARRAY in data:
            out["text_token_scale"] = data[SCALE_ARRAY]
        return out


def on_device(batch: dict[str, torch.Tensor], device: torch.device, *, non_blocking: bool = False) -> dict:
    """A batch of ``CacheRows`` tensors (and any others) moved to ``device``, 8-bit tokens decoded there
    to float32 (``token_scale`` / ``text_token_scale`` consumed)."""
    moved = {k: v.to(device, non_blocking=non_blocking) for k, v in batch.items()}
    for tokens, scale in (("tokens", SCALE_ARRAY), ("text_tokens", "text_" + SCALE_ARRAY)):
        if scale in moved:
            moved[tokens] = decode_tokens(moved[tokens], moved.pop(scale))
    return moved
