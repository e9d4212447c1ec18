"""``tvrerank split``: a gallery's index and gallery store cut into N shard folders, one slice of the videos each.

``OUT/shard-I-of-N/`` (I = 1..N) holds everything one ``tvrerank serve SHARD_DIR`` process needs
beside the gallery cache, which stays whole (ids, paths, embeddings: ~240 MB at 1M toy videos):

- ``index/``: an index folder of the slice (``index.faiss``, ``video_rows.npy``, ``config.json`` with
  ``shard`` {"shard": I, "shards": N}), checked on load as every index folder is (sizes and digests
  of its files, vector count against its row map);
- ``run/``: the re-ranker (``reranker.pt``, copied) and, under ``run/gallery/``, the gallery store's
  records of the slice's videos (bit for bit those of the whole store);
- ``shard.json`` (+ ``.sha256``): the gallery, the videos folder, I of N, and the digests of the slice's
  row map and of the re-ranker, so a folder whose parts come from different splits is refused.

The slices are consecutive runs of the index's positions (``numpy.array_split``), so each shard's
store is read in the order it was written. A slice's index has the whole index's type and search
parameters: Flat and HNSW are built again from the slice's vectors; a trained one (IVF) is a copy of
the trained index, emptied, with the slice's vectors added again (from the index when it keeps them
whole, IVF-Flat, else from the cache's embeddings), so every shard shares one quantizer.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tvrerank.cache.identity import cache_video_ids_digest
from tvrerank.cache.reader import CacheReader, read_rows
from tvrerank.config import from_dict, to_dict
from tvrerank.errors import CorruptFile, InputError, MissingInput, reason_of
from tvrerank.files import file_sha256, replaced_folder, verify_checksum, write_checksum
from tvrerank.index.faiss_index import build_index, import_faiss, whole_vectors
from tvrerank.index.store import (IndexConfig, check_index_matches, load_index_dir, read_index_config,
                                  write_index_files)
from tvrerank.rerank.checkpoint import MODEL_FILE
from tvrerank.rerank.model import SelectedVideos
from tvrerank.retrieve.gallery_store import GalleryStore, reranker_digest, store_path, write_gallery_store

log = logging.getLogger(__name__)

SHARD_FILE = "shard.json"
FORMAT = "tvrerank.shard/1"
RECORDS_PER_PART = 4096  # store records copied per block


@dataclass(frozen=True)
class ShardConfig:
    shard: int  # I, 1-based
    shards: int  # N
    gallery: str  # the gallery cache (whole), absolute
    videos: str  # the videos folder, absolute ("": the one the cache records)
    count: int  # videos of this slice
    video_rows_sha256: str  # of index/video_rows.npy: the slice's row map
    reranker_sha256: str  # of run/reranker.pt
    format: str = FORMAT
    created: str = ""


def shard_name(shard: int, shards: int) -> str:
    return f"shard-{shard}-of-{shards}"


def shard_slices(count: int, shards: int) -> list[np.ndarray]:
    """The index positions (n_i,) of each of ``shards`` consecutive slices of ``count`` vectors."""
    if shards < 1 or shards > count:
        raise InputError(f"--shards must be 1 to {count} (the index's videos), got {shards}")
    return np.array_split(np.arange(count), shards)


def slice_index(index, config: IndexConfig, positions: np.ndarray, rows: np.ndarray, cache: CacheReader):
    """The index of one slice: positions (n,) of ``index`` whose cache rows are rows (n,) → a filled index
    of the same type and search parameters."""
    faiss = import_faiss()
    vectors = whole_vectors(index, positions)  # (n, E), or None: the index compresses them
    if vectors is None and config.first_stage_sha256:
        raise InputError(f"the index ({config.factory}) keeps no whole vectors of the trained first stage, so it "
                         "cannot be split; build a Flat or IVF-Flat index of its embeddings and split that")
    if vectors is None:  # an index of the cache's own embeddings: they are the vectors it was given
        vectors = read_rows(cache["videos/video_emb"].dataset, rows).astype(np.float32)  # rows ascending
    if not faiss.index_factory(index.d, config.factory, faiss.METRIC_INNER_PRODUCT).is_trained:
        part = faiss.clone_index(index)  # a trained index: its quantizer and codebooks, shared by every slice
        part.reset()
        part.add(vectors)
        if config.search_params:
            faiss.ParameterSpace().set_index_parameters(part, config.search_params)
        return part
    return build_index(vectors, config.factory, config.search_params)


def store_records(store: GalleryStore, rows: np.ndarray):
    """The store's records of rows (n,) ascending, in blocks, as stored (float16 tokens): SelectedVideos parts."""
    positions = store.positions(rows)
    for start in range(0, len(positions), RECORDS_PER_PART):
        block = positions[start : start + RECORDS_PER_PART]
        yield SelectedVideos(**{name: torch.from_numpy(np.ascontiguousarray(array[block]))
                                for name, array in store.arrays.items()})


def split_gallery(gallery: str | Path, index_dir: str | Path, run_dir: str | Path, out: str | Path, shards: int, *,
                  videos: str | Path | None = None) -> list[Path]:
    """Write ``shards`` shard folders under ``out`` (replaced whole) from a gallery's index and the re-ranker
    run's gallery store; returns their paths."""
    gallery, run_dir, out = Path(gallery).resolve(), Path(run_dir), Path(out)
    if not (run_dir / MODEL_FILE).is_file():
        raise MissingInput(f"{run_dir}: no {MODEL_FILE}; give the re-ranker run folder with --reranker")
    index, config, rows = load_index_dir(index_dir)
    if config.shard:
        raise InputError(f"index {index_dir} is shard {config.shard['shard']} of {config.shard['shards']} already; "
                         "split the whole gallery's index")
    slices = shard_slices(len(rows), shards)
    reranker_sha256 = reranker_digest(run_dir)
    owned = {p.name for p in out.iterdir() if re.fullmatch(r"shard-\d+-of-\d+", p.name)} if out.is_dir() else set()
    with CacheReader(gallery) as cache:
        check_index_matches(config, cache, f"index {index_dir}")
        digest = cache_video_ids_digest(cache)
        store = GalleryStore.find(run_dir, cache)
        if store is None:
            log.warning("no gallery store of %s in %s: the shards will select tokens per query (`tvrerank gallery "
                        "--gallery %s --reranker %s` builds it; split again after)", gallery, run_dir, gallery, run_dir)
        try:
            with replaced_folder(out, owned=owned) as folder:
                made = []
                for number, positions in enumerate(slices, start=1):
                    name = shard_name(number, shards)
                    made.append(write_shard(folder / name, index, config, positions, rows[positions], cache,
                                            store, run_dir, digest, reranker_sha256, number, shards, videos))
                    log.info("%s: %d videos", name, len(positions))
        finally:
            if store is not None:
                store.close()
    return [out / path.name for path in made]


def write_shard(folder: Path, index, config: IndexConfig, positions: np.ndarray, rows: np.ndarray,
                cache: CacheReader, store: GalleryStore | None, run_dir: Path, digest: str, reranker_sha256: str,
                number: int, shards: int, videos) -> Path:
    """One shard folder (see the module docstring): the slice's index, re-ranker, store records, shard.json."""
    (folder / "index").mkdir(parents=True)
    fields = {name: getattr(config, name) for name in IndexConfig.__dataclass_fields__ if name != "files"}
    fields.update(count=int(len(rows)), shard={"shard": number, "shards": shards},
                  created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    written = write_index_files(folder / "index", slice_index(index, config, positions, rows, cache), rows, fields)
    (folder / "run").mkdir()
    shutil.copyfile(run_dir / MODEL_FILE, folder / "run" / MODEL_FILE)
    if store is not None:
        per_video = -(-store.nbytes // max(1, len(store.rows))) + 8
        write_gallery_store(store_path(folder / "run", cache.path, digest), rows, store_records(store, rows),
                            cache_path=cache.path, ids_digest=digest, reranker_sha256=reranker_sha256,
                            per_video=per_video)
    shard = ShardConfig(shard=number, shards=shards, gallery=str(Path(cache.path).resolve()),
                        videos=str(Path(videos).resolve()) if videos is not None else "", count=int(len(rows)),
                        video_rows_sha256=written.files["video_rows.npy"]["sha256"], reranker_sha256=reranker_sha256,
                        created=written.created)
    (folder / SHARD_FILE).write_text(json.dumps(to_dict(shard), indent=2, sort_keys=True) + "\n")
    write_checksum(folder / SHARD_FILE)
    return folder


def is_shard_folder(path: str | Path) -> bool:
    return (Path(path) / SHARD_FILE).is_file()


def read_shard(path: str | Path) -> dict[str, Path | None]:
    """A shard folder → its gallery, index, reranker and videos (None: the cache's record), after checking
    that its parts come from one split: shard.json against its checksum, the index's config.json (its
    own checksum; the index files against it when the Retriever loads them), the re-ranker's digest.
    The store's records are checked against the index's rows when the Retriever opens it."""
    path = Path(path)
    again = f"split the gallery again with `tvrerank split ... --out {path.parent}`"
    if not (path / SHARD_FILE).is_file():
        raise MissingInput(f"{path}: not a shard folder (no {SHARD_FILE}); make shards with `tvrerank split`")
    verify_checksum(path / SHARD_FILE, again, what="shard description")
    try:
        data = json.loads((path / SHARD_FILE).read_text())
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} description")
        shard = from_dict(ShardConfig, data)
    except (ValueError, TypeError) as exc:
        raise CorruptFile(f"{path / SHARD_FILE}: not a readable shard description ({reason_of(exc)}); {again}") from None
    index_dir, run_dir = path / "index", path / "run"
    if not (index_dir / "config.json").is_file():
        raise MissingInput(f"{path}: its index folder {index_dir} is missing; {again}")
    config = read_index_config(index_dir, again)
    recorded = (config.files.get("video_rows.npy") or {}).get("sha256")
    if config.shard != {"shard": shard.shard, "shards": shard.shards} or recorded != shard.video_rows_sha256:
        held = (f"shard {config.shard['shard']} of {config.shard['shards']}" if config.shard else "a whole gallery")
        raise CorruptFile(f"{path}: its files are from different splits (index/ holds {held} with {config.count} "
                          f"videos, {SHARD_FILE} says shard {shard.shard} of {shard.shards} with {shard.count}); "
                          f"{again}")
    if not (run_dir / MODEL_FILE).is_file() or file_sha256(run_dir / MODEL_FILE) != shard.reranker_sha256:
        raise CorruptFile(f"{path}: run/{MODEL_FILE} is missing or not the re-ranker it was split with; {again}")
    if not Path(shard.gallery).is_file():
        raise MissingInput(f"{path}: its gallery cache {shard.gallery} is missing (shards keep the whole cache where "
                           "it was when they were split); restore it there, or split again")
    return {"gallery": Path(shard.gallery), "index": index_dir, "reranker": run_dir,
            "videos": Path(shard.videos) if shard.videos else None}
