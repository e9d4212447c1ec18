"""A trained first stage on disk (``RUN/firststage.pt``), and the embeddings it gives a cache.

``firststage.pt`` holds the weights, the model config and the fingerprint of the cache it was
trained on; ``load_first_stage`` needs no flags and refuses a cache from another encoder,
sampling or layout. ``embed_cache`` writes ``text_emb.npy`` (M, E) and ``video_emb.npy`` (N, E),
float32, unit length, one row per caption and per video of the cache (zeros for videos that failed
extraction), and ``first_stage.json`` recording which cache (its video-ids digest and caption
count) and which run made them, and which videos that run held out of its training cache
(``cache.identity.held_out_record``): ``candidates --text-emb/--video-emb`` checks it and keeps it, so
``train`` can refuse a validation split the first stage was trained on; it also records the sha256
of both embedding files, so damaged embeddings are refused where they are read. ``firststage.pt``
has its sha256 beside it (``files.atomic_save``), verified when it loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tvrerank.cache.identity import cache_video_ids_digest, held_out_record, require_same_cache
from tvrerank.cache.reader import CacheReader, read_rows
from tvrerank.config import from_dict, to_dict
from tvrerank.errors import CacheMismatch, CorruptFile, MissingInput
from tvrerank.files import atomic_save, file_sha256, read_torch_file, replaced_folder
from tvrerank.firststage.model import FirstStage, FirstStageConfig

MODEL_FILE = "firststage.pt"
EMBEDDING_FILES = ("text_emb.npy", "video_emb.npy", "first_stage.json")
RECORD = "first_stage.json"


def save_first_stage(run_dir: str | Path, model: FirstStage, *, fingerprint: dict, cache: str, metrics: dict) -> None:
    atomic_save({"format": "tvrerank.firststage/1", "config": to_dict(model.config), "model": model.state_dict(),
                 "fingerprint": fingerprint, "cache": cache, "splits": metrics.get("splits") or {},
                 "validation": metrics.get("validation")}, Path(run_dir) / MODEL_FILE)


@dataclass
class TrainedFirstStage:
    model: FirstStage
    fingerprint: dict
    path: Path
    splits: dict  # the identities of the splits it was trained and validated on (empty: written before)

    def require_cache(self, cache: CacheReader) -> None:
        require_same_cache(cache, f"first stage {self.path} (trained on another cache)", fingerprint=self.fingerprint,
                           remedy="train a first stage on a cache made with the same encoder")

    def digest(self) -> str:
        return file_sha256(self.path)


def load_first_stage(run_dir: str | Path, device: str | torch.device = "cpu") -> TrainedFirstStage:
    path = Path(run_dir) / MODEL_FILE
    if not path.is_file():
        raise MissingInput(f"{path}: no trained first stage; train one with `tvrerank firststage train`")
    saved = read_torch_file(path, map_location=device, weights_only=False,
                            remedy="train it again with `tvrerank firststage train`")
    if not isinstance(saved, dict) or saved.get("format") != "tvrerank.firststage/1":
        raise CorruptFile(f"{path}: not a tvrerank first-stage checkpoint; train one with `tvrerank firststage train`")
    model = FirstStage(config=from_dict(FirstStageConfig, saved["config"])).to(device)
    model.load_state_dict(saved["model"])
    return TrainedFirstStage(model=model.eval(), fingerprint=saved["fingerprint"], path=path,
                             splits=saved.get("splits", {}))


@torch.no_grad()
def embed_cache(run_dir: str | Path, cache_path: str | Path, out: str | Path, *, device: str = "cpu",
                batch: int = 1024) -> dict:
    """Write the first stage's embeddings of every caption and video of ``cache_path`` into ``out``."""
    first_stage = load_first_stage(run_dir, device)
    with CacheReader(cache_path) as cache:
        first_stage.require_cache(cache)
        n, m, ok, model = cache.num_videos, cache.num_captions, cache.ok_rows(), first_stage.model
        video_emb = np.zeros((n, model.config.embed_dim), dtype=np.float32)  # failed videos stay zero
        for start in range(0, len(ok), batch):
            rows = ok[start : start + batch]
            frames = read_rows(cache["videos/frame_emb"], rows).astype(np.float32)
            video_emb[rows] = model.videos(torch.from_numpy(frames).to(device), torch.from_numpy(
                read_rows(cache["videos/frame_mask"], rows)).to(device)).cpu().numpy()
        text_emb = np.zeros((m, model.config.embed_dim), dtype=np.float32)
        for start in range(0, m, batch):
            captions = cache["texts/emb"][start : start + batch].astype(np.float32)
            text_emb[start : start + batch] = model.texts(torch.from_numpy(captions).to(device)).cpu().numpy()
        record = {"cache": str(cache_path), "video_ids_sha256": cache_video_ids_digest(cache), "videos": int(n),
                  "captions": int(m), "run": str(run_dir), "first_stage_sha256": first_stage.digest(),
                  "trained": held_out_record(first_stage.splits)}
    with replaced_folder(out, owned=set(EMBEDDING_FILES)) as tmp:
        np.save(tmp / "text_emb.npy", text_emb)
        np.save(tmp / "video_emb.npy", video_emb)
        record["files_sha256"] = {name: file_sha256(tmp / name) for name in ("text_emb.npy", "video_emb.npy")}
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record


def check_embeddings_record(embedding: str | Path, cache: CacheReader) -> dict | None:
    """Refuse embeddings that ``first_stage.json`` beside them says were made for another cache;
    returns the record (None when there is none: embeddings from outside)."""
    record_path = Path(embedding).parent / RECORD
    if not record_path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text())
    except ValueError as exc:
        raise CorruptFile(f"{record_path}: not readable JSON ({exc}); run `tvrerank firststage embed` again") from None
    recorded = (record.get("files_sha256") or {}).get(Path(embedding).name)
    if recorded is not None and file_sha256(embedding) != recorded:
        raise CorruptFile(f"{embedding}: not readable embeddings (its sha256 differs from {RECORD}'s record: damaged "
                          f"or changed since it was written); run `tvrerank firststage embed --cache {cache.path}` "
                          "again")
    if record.get("video_ids_sha256") != cache_video_ids_digest(cache) or record.get("captions") != cache.num_captions:
        raise CacheMismatch(f"{embedding} was made for {record.get('cache')} ({record.get('videos')} videos, "
                            f"{record.get('captions')} captions), not {cache.path} ({cache.num_videos} videos, "
                            f"{cache.num_captions} captions); run `tvrerank firststage embed --cache {cache.path}`")
    return record


def first_stage_record(video_emb: str | Path, cache: CacheReader) -> dict:
    """The record of a trained first stage's video embeddings of ``cache`` (for an index over them)."""
    record = check_embeddings_record(video_emb, cache)
    if record is None:
        raise MissingInput(f"{video_emb}: no {RECORD} beside it; index a trained first stage's embeddings "
                           "(`tvrerank firststage embed`), or give other first stages to `candidates --video-emb`")
    array = np.load(video_emb, mmap_mode="r")
    if array.ndim != 2 or array.shape[0] != cache.num_videos:
        raise CacheMismatch(f"{video_emb}: shape {array.shape}, expected ({cache.num_videos}, E) for {cache.path}")
    return record
