"""``tvrerank index``: a FAISS index over a cache's ok videos, saved with its config and the cache's fingerprint.

``DIR/index.faiss``, ``DIR/video_rows.npy`` (index position → cache row) and ``DIR/config.json``
(factory, search parameters, the cache's encoder/sampling/layout fingerprint and a digest of its
video ids), so an index is never used with a cache it was not made from. ``config.json`` also
records the size and sha256 of ``index.faiss`` and ``video_rows.npy`` (and ``config.json.sha256``
its own), so a damaged file, or one copied in from another build, is refused on load instead of
giving wrong neighbours.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tvrerank.cache.identity import cache_video_ids_digest, require_same_cache
from tvrerank.cache.reader import CacheReader
from tvrerank.config import from_dict, to_dict
from tvrerank.errors import CorruptFile, InputError, MissingInput, reason_of
from tvrerank.files import file_sha256, replaced_folder, verify_checksum, write_checksum
from tvrerank.firststage.store import first_stage_record
from tvrerank.index.faiss_index import IndexChoice, auto_factory, build_index, import_faiss

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexConfig:
    factory: str
    search_params: str
    reason: str
    dim: int
    count: int
    cache: str
    fingerprint: dict = field(default_factory=dict)
    video_ids_sha256: str = ""
    created: str = ""
    # what the vectors are: "" the cache's own video_emb, else the sha256 of the trained first stage
    # (firststage.pt) whose embeddings they are; a query must then go through that first stage
    first_stage_sha256: str = ""
    # {"index.faiss": {"bytes": n, "sha256": hex}, "video_rows.npy": {...}}; empty: written before checksums
    files: dict = field(default_factory=dict)
    # {"shard": i, "shards": n}: this index holds the i-th of n slices of the gallery (`tvrerank split`); empty: all
    shard: dict = field(default_factory=dict)


INDEX_FILES = ("index.faiss", "video_rows.npy", "config.json", "config.json.sha256")
DATA_FILES = {"index.faiss": "FAISS index", "video_rows.npy": "row map"}  # the files config.json records


def file_record(path: Path) -> dict:
    """What config.json records of one of the index's files: its size and sha256."""
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def read_gallery(cache: CacheReader) -> tuple[np.ndarray, np.ndarray]:
    """(rows (N_ok,), video_emb (N_ok, E) float32) of the videos that extracted ok."""
    rows = cache.ok_rows()
    if len(rows) == 0:
        raise InputError(f"{cache.path}: no video extracted ok, the gallery is empty")
    embeddings = cache["videos/video_emb"][()][rows].astype(np.float32)
    return rows, embeddings


def build_index_dir(cache_path: str | Path, out: str | Path, factory: str = "Flat",
                    memory_budget: int = 4 << 30, video_emb: str | Path | None = None) -> IndexConfig:
    """Build and save the index of ``cache_path``'s ok videos under ``out``: of their cached
    ``video_emb``, or of a trained first stage's ``video_emb.npy`` (``tvrerank firststage embed``)."""
    import_faiss()  # before any work: a clear error when FAISS is missing
    out = Path(out)
    first_stage = ""
    with CacheReader(cache_path) as cache:
        rows, embeddings = read_gallery(cache)
        if video_emb is not None:
            first_stage = first_stage_record(video_emb, cache)["first_stage_sha256"]
            embeddings = np.load(video_emb)[rows].astype(np.float32)
        fingerprint = cache.header.fingerprint()
        digest = cache_video_ids_digest(cache)
        skipped = cache.num_videos - len(rows)
    if skipped:
        log.warning("%s: %d videos failed extraction and are not indexed", cache_path, skipped)
    choice = auto_factory(*embeddings.shape, memory_budget) if factory == "auto" else IndexChoice(factory, "", "given")
    log.info("index %s over %d videos (%s)", choice.factory, len(rows), choice.reason)
    index = build_index(embeddings, choice.factory, choice.search_params)
    config = dict(
        factory=choice.factory, search_params=choice.search_params, reason=choice.reason,
        dim=int(embeddings.shape[1]), count=int(len(rows)), cache=str(cache_path), fingerprint=fingerprint,
        video_ids_sha256=digest, created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        first_stage_sha256=first_stage,
    )
    with replaced_folder(out, owned=set(INDEX_FILES)) as folder:  # never a new index beside an old config
        return write_index_files(folder, index, rows, config)


def write_index_files(folder: Path, index, rows: np.ndarray, fields: dict) -> IndexConfig:
    """Write an index folder's files into ``folder``: the index, its row map rows (N,) and config.json
    (``fields`` of IndexConfig, with the files' sizes and digests) with its checksum."""
    import_faiss().write_index(index, str(folder / "index.faiss"))
    np.save(folder / "video_rows.npy", rows)
    config = IndexConfig(**fields, files={name: file_record(folder / name) for name in DATA_FILES})
    (folder / "config.json").write_text(json.dumps(to_dict(config), indent=2, sort_keys=True) + "\n")
    write_checksum(folder / "config.json")
    return config


def load_index_dir(path: str | Path):
    """(faiss index with its search parameters set, IndexConfig, video_rows) from a saved index dir,
    each file checked against what config.json recorded when it was built."""
    faiss = import_faiss()
    path = Path(path)
    rebuild = f"rebuild the folder with `tvrerank index CACHE --out {path}`"
    if not (path / "config.json").is_file() or not (path / "index.faiss").is_file():
        raise MissingInput(f"{path}: not an index folder (expected index.faiss and config.json); "
                                "make one with `tvrerank index CACHE --out DIR`")
    config = read_index_config(path, rebuild)
    if not (path / "video_rows.npy").is_file():
        raise MissingInput(f"{path / 'video_rows.npy'}: missing (the index position -> cache row map); {rebuild}")
    verify_index_files(path, config, rebuild)
    try:
        index = faiss.read_index(str(path / "index.faiss"))
    except RuntimeError as exc:  # zero bytes, truncated, not a FAISS file
        reason = reason_of(exc, last=True, limit=200, default="unreadable")
        raise CorruptFile(f"{path / 'index.faiss'}: not a readable FAISS index ({reason}); {rebuild}") from None
    try:
        rows = np.load(path / "video_rows.npy")
    except (ValueError, OSError, EOFError) as exc:
        raise CorruptFile(f"{path / 'video_rows.npy'}: not a readable row map ({reason_of(exc)}); {rebuild}") from None
    if not index.ntotal == len(rows) == config.count or index.d != config.dim:
        raise CorruptFile(f"{path}: its files are from different builds (index.faiss holds {index.ntotal} vectors of "
                          f"width {index.d}, video_rows.npy {len(rows)} rows, config.json says {config.count} of width "
                          f"{config.dim}); {rebuild}")
    if config.search_params:
        faiss.ParameterSpace().set_index_parameters(index, config.search_params)
    return index, config, rows


def read_index_config(path: Path, rebuild: str) -> IndexConfig:
    """``path/config.json``, checked against its sidecar checksum; one line when it is damaged or not JSON."""
    config_path = path / "config.json"
    if (path / "config.json.sha256").is_file():
        verify_checksum(config_path, rebuild, what="index config")
    try:
        data = json.loads(config_path.read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return from_dict(IndexConfig, data)
    except (ValueError, TypeError) as exc:  # truncated, edited, not JSON (UnicodeDecodeError is a ValueError)
        raise CorruptFile(f"{config_path}: not a readable index config ({reason_of(exc)}); {rebuild}") from None


def verify_index_files(path: Path, config: IndexConfig, rebuild: str) -> None:
    """Refuse index.faiss or video_rows.npy when its size or sha256 differs from config.json's record
    (damaged, or copied from another build); an index built before checksums loads with a warning."""
    if not config.files:
        log.warning("%s: an index built before checksums: its files are used unverified; %s", path, rebuild)
        return
    for name in DATA_FILES:
        recorded, file = config.files.get(name) or {}, path / name
        size = file.stat().st_size
        if recorded.get("bytes") != size:
            differs = f"{size} bytes, config.json recorded {recorded.get('bytes')}"
        elif recorded.get("sha256") != file_sha256(file):
            differs = "its sha256 differs from config.json's record"
        else:
            continue
        raise CorruptFile(f"{file}: not a readable {DATA_FILES[name]} ({differs}: damaged, or not the file this "
                          f"index was built with); {rebuild}")


def check_index_matches(config: IndexConfig, cache: CacheReader, where: str) -> None:
    """Refuse an index made from another encoder/sampling/layout or another set of videos."""
    require_same_cache(cache, where, fingerprint=config.fingerprint, video_ids_sha256=config.video_ids_sha256,
                       remedy=f"rebuild it with `tvrerank index {cache.path} --out DIR`")
