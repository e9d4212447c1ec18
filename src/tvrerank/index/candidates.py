"""``tvrerank candidates``: the first stage's top-K videos for every caption of a cache.

The top K come from the cache's FAISS index, or from any other retriever: its text and video
embeddings (``--text-emb``/``--video-emb``, rows aligned with the cache's captions and videos,
compared by cosine) or its full similarity matrix (``--similarity``, captions × videos). Only
videos that extracted ok are candidates.

Besides the lists, every caption's *true* stage-1 rank is stored, even when it is beyond K:
training needs it and evaluation reports it. It is the rank the lists give (``ranks_as_listed``:
ties count against the true video, and a video missing from its list comes after every listed
one), computed exactly over the whole gallery beyond the list. A caption whose video failed
extraction gets rank -1.

File (HDF5, schema ``tvrerank.candidates/1``)::

    candidates/video  (M, K) int32    cache rows, best first (-1 padding)
    candidates/score  (M, K) float32  stage-1 scores
    true_rank         (M,)   int32    stage-1 rank of the caption's video (-1: not in the gallery)
    true_score        (M,)   float32
    attrs: schema, k, source, cache path, the cache's fingerprint and video-id digest, and for a trained
           first stage's embeddings its record (``first_stage``, JSON: run, checkpoint digest, held-out videos)
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from tvrerank.cache.identity import cache_video_ids_digest, require_same_cache
from tvrerank.cache.reader import CacheReader
from tvrerank.errors import CacheMismatch, InputError, MissingInput
from tvrerank.files import checksummed_file, require_space, verify_checksum
from tvrerank.firststage.store import check_embeddings_record
from tvrerank.index.faiss_index import build_index, search, to_gpu_if_available
from tvrerank.index.store import check_index_matches, load_index_dir, read_gallery
from tvrerank.metrics import exact_ranks

log = logging.getLogger(__name__)

SCHEMA = "tvrerank.candidates/1"


@dataclass
class CandidateLists:
    video: np.ndarray  # (M, K) int32 cache rows, -1 padding
    score: np.ndarray  # (M, K) float32
    true_rank: np.ndarray  # (M,) int32, -1 when the caption's video is not in the gallery
    true_score: np.ndarray  # (M,) float32 (NaN when not in the gallery)
    source: str
    # the trained first stage whose embeddings made the lists (its first_stage.json record: run, checkpoint digest,
    # ``trained``: the videos it held out, see cache.identity.held_out_record); None for any other first stage
    first_stage: dict | None = None


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def ranks_as_listed(video: np.ndarray, score: np.ndarray, true_video: np.ndarray, exact_rank: np.ndarray,
                    exact_score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stage-1 ranks as the first stage's lists order the videos (the order ``retrieve`` serves).

    video/score (M, K) lists (-1 padding), true_video (M,) rows, exact_rank/exact_score (M,) over the
    whole gallery (rank -1: not in the gallery) → (rank, score) (M,), ties counted against the true video:

    * true video in its list: ``1 + #{other listed videos with score >= its listed score}``;
    * not in its list: after every listed video, ``#listed + 1 + #{unlisted others scored >= it}``
      (equals the exact rank for an exact index; larger when an approximate index missed it).
    """
    rank, true_score = exact_rank.astype(np.int32).copy(), exact_score.astype(np.float32).copy()
    present = video >= 0
    hit = video == true_video[:, None]
    inside = hit.any(axis=1)
    slot = hit.argmax(axis=1)
    listed_true = score[np.arange(len(score)), slot]
    listed_ahead = (present & (score >= listed_true[:, None])).sum(axis=1)  # the true slot included
    rank[inside], true_score[inside] = listed_ahead[inside], listed_true[inside]
    beyond = ~inside & (exact_rank > 0)
    listed_above = (present & (score >= exact_score[:, None])).sum(axis=1)
    rank[beyond] = np.maximum(exact_rank - listed_above + present.sum(axis=1), present.sum(axis=1) + 1)[beyond]
    return rank, true_score


def top_k_from_scores(scores_of, num_queries: int, k: int, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Top-k columns and scores of each row (stable: lower column first on ties) → (M, k) each."""
    columns = np.empty((num_queries, k), dtype=np.int64)
    values = np.empty((num_queries, k), dtype=np.float32)
    for start in range(0, num_queries, block):
        window = slice(start, min(start + block, num_queries))
        scores = np.nan_to_num(scores_of(window), nan=-np.inf)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        columns[window], values[window] = order, np.take_along_axis(scores, order, axis=1)
    return columns, values


def _clamp_k(k: int, gallery: int) -> int:
    if gallery == 0:
        raise InputError("the gallery is empty: no video extracted ok")
    if k > gallery:
        log.warning("K=%d is larger than the gallery (%d videos): using K=%d", k, gallery, gallery)
    return min(k, gallery)


def _load_matrix(path: str | Path, name: str, rows: int, what: str) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise InputError(f"{name} {path}: not a readable .npy file ({exc})") from exc
    if array.ndim != 2 or array.shape[0] != rows:
        raise InputError(f"{name} {path}: shape {array.shape}, expected ({rows}, ...) — one row per {what}")
    return array


def build_candidates(
    cache_path: str | Path,
    *,
    k: int = 15,
    index_dir: str | Path | None = None,
    text_emb: str | Path | None = None,
    video_emb: str | Path | None = None,
    similarity: str | Path | None = None,
) -> CandidateLists:
    """Top-K lists and exact true ranks for every caption of a cache, from one first stage."""
    given = [index_dir is not None, text_emb is not None or video_emb is not None, similarity is not None]
    first_stage = None
    if sum(given) != 1:
        raise InputError("give exactly one first stage: --index DIR, --text-emb/--video-emb, or --similarity")
    if (text_emb is None) != (video_emb is None):
        raise InputError("--text-emb and --video-emb go together")
    with CacheReader(cache_path) as cache:
        rows = cache.ok_rows()
        m, n = cache.num_captions, cache.num_videos
        caption_video = cache["texts/video"][()]
        column_of = np.full(n, -1, dtype=np.int64)
        column_of[rows] = np.arange(len(rows))
        true_columns = column_of[caption_video]
        k = _clamp_k(k, len(rows))
        if index_dir is not None:
            index, config, index_rows = load_index_dir(index_dir)
            check_index_matches(config, cache, f"index {index_dir}")
            if config.first_stage_sha256:
                raise InputError(f"index {index_dir} holds a trained first stage's video embeddings, and the "
                                 "captions' would be the cache's own: make these candidates with --text-emb and "
                                 "--video-emb from `tvrerank firststage embed`")
            index = to_gpu_if_available(index)
            if not np.array_equal(index_rows, rows):
                raise CacheMismatch(f"index {index_dir} holds other videos than the ok videos of {cache_path}")
            queries = cache["texts/emb"][()].astype(np.float32)
            _, gallery = read_gallery(cache)
            scores, positions = search(index, queries, k)
            source = f"faiss:{config.factory}"
            ranks, truth = exact_ranks(lambda w: queries[w] @ gallery.T, m, true_columns)
        elif text_emb is not None:
            # a trained first stage's record says which cache they belong to (and which videos it held out)
            records = [check_embeddings_record(given, cache) for given in (text_emb, video_emb)]
            first_stage = records[1] or records[0]
            queries = _normalise(_load_matrix(text_emb, "--text-emb", m, "caption of the cache"))
            gallery = _normalise(_load_matrix(video_emb, "--video-emb", n, "video of the cache"))[rows]
            if queries.shape[1] != gallery.shape[1]:
                raise InputError(f"--text-emb has {queries.shape[1]} columns, --video-emb {gallery.shape[1]}")
            scores, positions = search(build_index(gallery, "Flat"), queries, k)
            source = "external-embeddings"
            ranks, truth = exact_ranks(lambda w: queries[w] @ gallery.T, m, true_columns)
        else:
            matrix = _load_matrix(similarity, "--similarity", m, "caption of the cache")
            if matrix.shape[1] != n:
                raise InputError(f"--similarity {similarity}: {matrix.shape[1]} columns, the cache has {n} videos")
            def scores_of(window):
                return np.asarray(matrix[window], dtype=np.float32)[:, rows]

            positions, scores = top_k_from_scores(scores_of, m, k)
            source = "external-similarity"
            ranks, truth = exact_ranks(scores_of, m, true_columns)
    video = np.where(positions >= 0, rows[np.clip(positions, 0, None)], -1).astype(np.int32)
    ranks, truth = ranks_as_listed(video, scores, caption_video, ranks, truth)
    if (missing := int((ranks < 0).sum())):
        log.warning("%d captions belong to videos that failed extraction: they get rank -1", missing)
    return CandidateLists(video=video, score=scores.astype(np.float32), true_rank=ranks, true_score=truth,
                          source=source, first_stage=first_stage)


def write_candidates(path: str | Path, lists: CandidateLists, cache_path: str | Path) -> None:
    with CacheReader(cache_path) as cache:
        fingerprint, digest = cache.header.fingerprint(), cache_video_ids_digest(cache)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    require_space(path, lists.video.nbytes + lists.score.nbytes + 8 * len(lists.true_rank) + (1 << 20),
                  "the candidates file")
    with checksummed_file(path, Path(str(path) + ".tmp")) as tmp, h5py.File(tmp, "w") as f:
        f["candidates/video"], f["candidates/score"] = lists.video, lists.score
        f["true_rank"], f["true_score"] = lists.true_rank, lists.true_score
        f.attrs.update({"schema": SCHEMA, "k": lists.video.shape[1], "source": lists.source,
                        "cache": str(cache_path), "fingerprint": json.dumps(fingerprint, sort_keys=True),
                        "video_ids_sha256": digest})
        if lists.first_stage is not None:
            f.attrs["first_stage"] = json.dumps(lists.first_stage, sort_keys=True)


def read_candidates(path: str | Path, cache: CacheReader) -> CandidateLists:
    """Load a candidate file, refusing one made from another cache."""
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"{path}: no such candidates file; make one with `tvrerank candidates`")
    verify_checksum(path, f"make it again with `tvrerank candidates {cache.path} ... --out {path}`",
                    what="candidates file")
    with h5py.File(path, "r") as f:
        if f.attrs.get("schema") != SCHEMA:
            raise InputError(f"{path}: not a tvrerank candidates file (schema {f.attrs.get('schema')!r})")
        require_same_cache(cache, f"candidates {path} (made from {f.attrs['cache']})",
                           fingerprint=json.loads(f.attrs["fingerprint"]),
                           video_ids_sha256=str(f.attrs["video_ids_sha256"]),
                           remedy=f"make them again with `tvrerank candidates {cache.path} ...`")
        if f["true_rank"].shape[0] != cache.num_captions:
            raise CacheMismatch(f"{path} has {f['true_rank'].shape[0]} captions, {cache.path} {cache.num_captions}")
        return CandidateLists(video=f["candidates/video"][()], score=f["candidates/score"][()],
                              true_rank=f["true_rank"][()], true_score=f["true_score"][()],
                              source=str(f.attrs["source"]),
                              first_stage=json.loads(f.attrs["first_stage"]) if "first_stage" in f.attrs else None)
