"""Query → the gallery's own text encoder → FAISS top-K → re-ranker → ranked videos.

``Retriever`` checks that everything belongs together before it answers: the index was made
from the gallery cache, the re-ranker was trained on a cache with the same encoder, sampling
and token layout, and the text encoder rebuilt from the cache's attributes is the one that
made it (same model config and checkpoint digest).
"""

from __future__ import annotations

import copy
import logging
import threading
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from tvrerank.cache.reader import CacheReader, read_rows
from tvrerank.cache.encoding import roundtrip_tokens
from tvrerank.cache.rows import CacheRows
from tvrerank.devices import resolve_device
from tvrerank.errors import CacheMismatch, InputError
from tvrerank.extract.encoder import FrozenClipEncoder, TextLayout
from tvrerank.extract.models import register_model_config
from tvrerank.firststage.store import load_first_stage
from tvrerank.index.faiss_index import import_faiss, search, to_gpu_if_available, whole_vectors
from tvrerank.index.store import check_index_matches, load_index_dir
from tvrerank.rerank.checkpoint import load_reranker
from tvrerank.rerank.inference import select_videos
from tvrerank.rerank.model import SelectedVideos
from tvrerank.rerank.ranking import fused_scores, order_candidates
from tvrerank.retrieve.gallery_store import DeviceStore, GalleryStore
from tvrerank.retrieve.query_scorer import QueryScorer

log = logging.getLogger(__name__)


class QueryError(InputError):
    """A query that cannot be searched (empty or whitespace only)."""


class CandidateError(InputError):
    """A candidate list that cannot be re-ranked: empty, too long, a duplicate or an unknown video id."""


NOT_INDEXED = "not searchable (its extraction failed, so it is not in the index)"


def candidate_rows(video_ids: Sequence[str], row_of: dict[str, int], indexed: np.ndarray, k: int,
                   where: str = "video_ids", not_indexed: str = NOT_INDEXED) -> np.ndarray:
    """A caller's candidate ids → their cache rows (n,), checked: 1..k ids, no duplicate, each a gallery
    video that is in the index (``indexed`` (N,) bool by cache row; ``not_indexed`` says why one is not).
    Raises CandidateError naming the id."""
    if isinstance(video_ids, (str, bytes)) or not isinstance(video_ids, Sequence):
        raise CandidateError(f"{where} must be a list of video ids")
    if len(video_ids) == 0:
        raise CandidateError(f"{where} is empty: give 1 to {k} video ids to re-rank")
    if len(video_ids) > k:
        raise CandidateError(f"{where} has {len(video_ids)} ids, more than the re-ranker's K = {k}; "
                             f"give at most {k} (the first stage's top {k})")
    rows, seen = [], set()
    for video_id in video_ids:
        if not isinstance(video_id, str):
            raise CandidateError(f"{where}: {video_id!r} is not a video id (a string)")
        if video_id in seen:
            raise CandidateError(f"{where}: video id {video_id!r} is listed twice; give each candidate once")
        seen.add(video_id)
        row = row_of.get(video_id)
        if row is None:
            raise CandidateError(f"{where}: no video {video_id!r} in the gallery")
        if not indexed[row]:
            raise CandidateError(f"{where}: video {video_id!r} is {not_indexed}")
        rows.append(row)
    return np.asarray(rows, dtype=np.int64)


@dataclass(frozen=True)
class Hit:
    video_id: str
    path: str
    stage1: float
    rerank: float | None  # None: not re-ranked (below K, or --no-rerank)
    score: float  # what the list is ordered by: the fused score inside the re-ranked top K, else stage1
    ranked_by: str  # "fused" (re-ranked top K) or "stage1"
    stage1_rank: int  # 1-based place in the stage-1 (FAISS) list


@dataclass(frozen=True)
class QueryResult:
    query: str
    results: list[Hit]
    warning: str | None = None  # e.g. the query was cut to the text encoder's context

    def to_json(self) -> dict:
        out = {"query": self.query, "results": [asdict(hit) for hit in self.results]}
        return out if self.warning is None else {**out, "warning": self.warning}


def check_queries(queries: Sequence[str], names: Sequence[str]) -> None:
    for query, name in zip(queries, names):
        if not query.strip():
            raise QueryError(f"{name} is empty or whitespace only; give some words to search for")


def set_cpu_threads(threads: int) -> None:
    """Use ``threads`` CPU threads for torch (intra-op) and FAISS. On a machine whose cores are busy,
    fewer threads than idle cores keep small per-query ops from waiting on descheduled threads."""
    if threads < 1:
        raise InputError(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)
    import_faiss().omp_set_num_threads(threads)


def require_store_covers(store: GalleryStore, index_rows: np.ndarray, index_dir) -> None:
    """Refuse a gallery store that lacks a record of some video of the index (index_rows (N,) cache rows):
    the store of another slice of the gallery (another shard's), or of another build."""
    positions = np.clip(np.searchsorted(store.rows, index_rows), 0, max(len(store.rows) - 1, 0))
    held = (store.rows[positions] == index_rows) if len(store.rows) else np.zeros(len(index_rows), dtype=bool)
    if not held.all():
        raise CacheMismatch(f"{store.path}: the gallery store holds no record of {int((~held).sum())} of the "
                            f"{len(index_rows)} videos of index {index_dir} (the store of another shard or build "
                            "beside it); split the gallery again with `tvrerank split`, or rebuild the store with "
                            "`tvrerank gallery`")


def text_encoder_for(cache: CacheReader, device: str) -> FrozenClipEncoder:
    """Rebuild the cache's own encoder from its attributes, its text tower only, and check it is the same one."""
    wanted, layout = cache.header.encoder, cache.header.layout
    register_model_config(wanted.model, wanted.model_config)
    encoder = FrozenClipEncoder(model=wanted.model, pretrained=wanted.pretrained, token_space=layout.space,
                                token_pool=layout.pool, text_tokens=layout.text_tokens, precision=wanted.precision,
                                device=device, text_only=True)
    if encoder.config.identity() != wanted.identity() or encoder.text_layout != TextLayout.of(layout):
        raise CacheMismatch(
            f"the encoder rebuilt from {cache.path}'s attributes ({wanted.model}, pretrained={wanted.pretrained}) "
            "is not the one that made the cache (other weights or config); pass the same checkpoint file"
        )
    return encoder


class Retriever:
    """Search one gallery. Checks every artifact on construction; use as a context manager (or ``close``).

    ``device_store``: hold the gallery store on the device and re-rank each query through a
    ``QueryScorer`` (a CUDA graph on a GPU); None: so on CUDA when the store takes at most a quarter
    of the free GPU memory, True: whenever there is a store (on the CPU the scorer runs eagerly).
    """

    def __init__(self, gallery: str | Path, index_dir: str | Path, run_dir: str | Path | None = None, *,
                 device: str = "auto", use_store: bool = True, first_stage: str | Path | None = None,
                 device_store: bool | None = None):
        self.device = resolve_device(device)
        self.gallery = Path(gallery)
        self.cache = CacheReader(gallery)
        self.store = None
        self.device_store: DeviceStore | None = None
        self._scorers: dict[int, QueryScorer] = {}  # by candidates per query
        self._scorers_lock = threading.Lock()
        self._row_of: dict[str, int] | None = None
        self._indexed: np.ndarray | None = None
        self._index_position: np.ndarray | None = None  # cache row → index position, -1: not indexed
        try:
            self._open(index_dir, run_dir, use_store)
            if self.store is not None and self._store_on_device(device_store):
                self.device_store = self.store.on_device(self.device)
            self.first_stage = self._first_stage(first_stage, index_dir)
        except BaseException:
            self.close()
            raise

    def _open(self, index_dir, run_dir, use_store: bool) -> None:
        gallery = self.gallery
        self.index, config, self.index_rows = load_index_dir(index_dir)
        check_index_matches(config, self.cache, f"index {index_dir}")
        self.index_config = config
        self.index = to_gpu_if_available(self.index)
        self.video_ids = self.cache.strings("videos/id")
        self.video_paths = self.cache.strings("videos/path")
        self.reranker = None
        if run_dir is not None:
            self.reranker = load_reranker(run_dir, self.device)
            self.reranker.require_cache(self.cache)
            self.store = GalleryStore.find(run_dir, self.cache) if use_store else None
            if self.store is not None:
                require_store_covers(self.store, self.index_rows, index_dir)
                log.info("using the gallery store %s", self.store.path)
            elif use_store:
                log.info("no gallery store for %s: selecting tokens per query (`tvrerank gallery --gallery %s "
                         "--reranker %s` precomputes them once)", gallery, gallery, run_dir)
        self.rows = CacheRows(gallery, memory_budget=0)
        self.encoder = text_encoder_for(self.cache, str(self.device))

    def _store_on_device(self, wanted: bool | None) -> bool:
        if wanted is not None:
            return wanted
        if self.device.type != "cuda":
            return False
        free, _ = torch.cuda.mem_get_info(self.device)
        if self.store.nbytes > free // 4:
            log.info("the gallery store (%.1f GB) is over a quarter of the GPU's free memory: its records are "
                     "read from the host per query", self.store.nbytes / 1e9)
            return False
        return True

    def _first_stage(self, run_dir, index_dir):
        """The trained first stage the queries go through, checked against the index's vectors."""
        wanted = self.index_config.first_stage_sha256
        if run_dir is None:
            if wanted:
                raise CacheMismatch(f"index {index_dir} holds a trained first stage's video embeddings; pass that "
                                    "first stage's run folder with --first-stage")
            return None
        first_stage = load_first_stage(run_dir, self.device)
        first_stage.require_cache(self.cache)
        if first_stage.digest() != wanted:
            made = "the cache's own video embeddings" if not wanted else "another first stage's embeddings"
            raise CacheMismatch(f"index {index_dir} holds {made}, not those of first stage {run_dir}; index its "
                                f"embeddings: `tvrerank index {self.gallery} --video-emb EMB/video_emb.npy --out DIR`")
        return first_stage

    def view(self, *, use_store: bool = True, device_store: bool = True) -> "Retriever":
        """This retriever without its gallery store (``use_store=False``) or without the store's copy on
        the device (``device_store=False``): another path through the same files, index and text
        encoder, to compare paths without building them twice. Close only the original."""
        view = copy.copy(self)
        view._scorers, view._scorers_lock = {}, threading.Lock()
        if not use_store:
            view.store = None
        if not (use_store and device_store):
            view.device_store = None
        return view

    def __enter__(self) -> "Retriever":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._scorers, self.device_store = {}, None
        if self.store is not None:
            self.store.close()
        self.cache.close()

    def search(self, queries: Sequence[str], *, top: int = 10, k: int = 15, rerank: bool = True,
               batch: int = 64) -> list[QueryResult]:
        rerank = rerank and self.reranker is not None
        k = min(k, len(self.index_rows))
        depth = min(max(top, k), len(self.index_rows))
        results = []
        for start in range(0, len(queries), batch):
            chunk = list(queries[start : start + batch])
            emb, tokens, lengths = self.encode_queries(chunk)
            scores, candidate_rows = self.stage1(self.query_embeddings(emb), depth)
            reranked = self.candidate_scores(tokens, lengths, candidate_rows[:, :k]) if rerank else None
            for i, query in enumerate(chunk):
                result = self.rank_hits(query, scores[i], candidate_rows[i], k, top,
                                        None if reranked is None else reranked[i])
                warning = self.truncation_warning(query)
                if warning:
                    log.warning("query %d: %s", start + i + 1, warning)
                results.append(result if warning is None else replace(result, warning=warning))
        return results

    def rerank(self, query: str, video_ids: Sequence[str], *, stage1: Sequence[float] | None = None,
               k: int = 15, top: int | None = None) -> QueryResult:
        """Re-rank another first stage's candidates: ``video_ids`` (n <= k) of this gallery for ``query``
        → the same ``QueryResult`` as ``search`` (top ``top``, default all n): the candidates in stage-1
        order (by ``stage1``, the caller's scores (n,), else by the first stage's own score of each,
        ``stage1_scores``), re-ordered by the ranking rule. Given this retriever's own stage-1 top k,
        it returns what ``search`` returns."""
        check_queries([query], ["the query"])
        if self.reranker is None:
            raise InputError("re-ranking candidates needs a trained re-ranker: pass --reranker RUN_DIR")
        rows = candidate_rows(video_ids, self.row_of, self.indexed, k, not_indexed=self.not_indexed)
        emb, tokens, lengths = self.encode_queries([query])
        if stage1 is None:
            scores = self.stage1_scores(self.query_embeddings(emb)[0], rows)
        else:
            scores = np.asarray(stage1, dtype=np.float32)
            if scores.shape != rows.shape or not np.isfinite(scores).all():
                raise CandidateError(f"stage1 must be {len(rows)} finite numbers, one per video id")
        order = np.argsort(-scores, kind="stable")  # stage-1 order; ties keep the caller's order
        scores, rows = scores[order], rows[order]
        n = len(rows)
        reranked = self.candidate_scores(tokens, lengths, rows[None])
        result = self.rank_hits(query, scores, rows, n, n if top is None else min(top, n), reranked[0])
        warning = self.truncation_warning(query)
        return result if warning is None else replace(result, warning=warning)

    @property
    def not_indexed(self) -> str:
        """Why a gallery video is not in the index: its extraction failed, or another shard holds it."""
        shard = self.index_config.shard
        if not shard:
            return NOT_INDEXED
        return (f"not in this shard (it holds shard {shard['shard']} of {shard['shards']} of the gallery's videos); "
                "send it to the shard that holds it")

    @property
    def row_of(self) -> dict[str, int]:
        """video id → cache row (made on first use)."""
        if self._row_of is None:
            self._row_of = {str(video_id): row for row, video_id in enumerate(self.video_ids)}
        return self._row_of

    @property
    def indexed(self) -> np.ndarray:
        """(N,) bool by cache row: in the index (made on first use)."""
        if self._indexed is None:
            self._indexed = np.zeros(len(self.video_ids), dtype=bool)
            self._indexed[self.index_rows] = True
        return self._indexed

    def stage1_scores(self, query_vector: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """query_vector (E,) → the first stage's score of each of ``rows`` (n,) cache rows: (n,) float32.

        The inner products FAISS would give: with the vectors the index holds when it keeps them whole
        (Flat, HNSW, IVF-Flat: exact, in memory), else the cache's video embeddings (an index of the cache's own
        embeddings), computed by a FAISS flat index, as the index's exact search computes them.
        """
        faiss = import_faiss()
        vectors = self.indexed_vectors(rows)  # (n, E)
        flat = faiss.IndexFlatIP(vectors.shape[1])
        flat.add(vectors)
        scores, positions = flat.search(np.ascontiguousarray(query_vector[None], dtype=np.float32), len(rows))
        out = np.empty(len(rows), dtype=np.float32)
        out[positions[0]] = scores[0]
        return out

    def indexed_vectors(self, rows: np.ndarray) -> np.ndarray:
        """rows (n,) cache rows in the index → the vectors (n, E) float32 stage 1 scores them by."""
        if self._index_position is None:
            self._index_position = np.full(len(self.video_ids), -1, dtype=np.int64)
            self._index_position[self.index_rows] = np.arange(len(self.index_rows))
        vectors = whole_vectors(self.index, self._index_position[rows])
        if vectors is not None:
            return vectors
        if self.first_stage is not None:
            raise InputError(f"the index ({self.index_config.factory}) keeps no whole vectors of the trained first "
                             "stage: give each candidate's stage-1 score (\"stage1\": [...])")
        order = np.argsort(rows)
        out = np.empty((len(rows), self.index_config.dim), dtype=np.float32)
        out[order] = read_rows(self.cache["videos/video_emb"].dataset, rows[order])
        return out

    def encode_queries(self, queries: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Queries → the text encoder's emb (Q, E), token features (Q, L, Dt) as the cache's captions
        read back (its 8-bit encoding, when it has one: what the re-ranker was trained on), lengths (Q,)."""
        emb, tokens, lengths = self.encoder.encode_texts(list(queries))
        return emb, roundtrip_tokens(tokens, self.cache.header.layout.token_dtype, lengths), lengths

    def truncation_warning(self, query: str) -> str | None:
        """Why the text encoder will not read all of ``query``, or None."""
        context = self.encoder.clip.context_length
        if hasattr(self.encoder.tokenizer, "encode") and len(self.encoder.tokenizer.encode(query)) + 2 > context:
            return f"the query is longer than the text encoder's {context} tokens: truncated to them"
        return None

    @torch.inference_mode()
    def query_embeddings(self, text_emb: np.ndarray) -> np.ndarray:
        """The text encoder's embeddings (Q, E) → the first stage's query vectors (through a trained
        first stage's text side when there is one)."""
        if self.first_stage is None:
            return text_emb
        return self.first_stage.model.texts(torch.from_numpy(text_emb).to(self.device)).cpu().numpy()

    def stage1(self, text_emb: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        """FAISS top-``depth``: text_emb (Q, E) → stage-1 scores (Q, depth), cache rows (Q, depth), -1: none."""
        scores, positions = search(self.index, text_emb, depth)
        return scores, np.where(positions >= 0, self.index_rows[np.clip(positions, 0, None)], -1)

    def candidate_scores(self, text_tokens: np.ndarray, lengths: np.ndarray, candidate_rows: np.ndarray) -> np.ndarray:
        """(Q, L, Dt), (Q,), (Q, K) rows (-1: none) → re-ranker scores (Q, K), -inf where no candidate.

        With the store on the device: query by query through a ``QueryScorer``; else every query's
        pairs in one batch (``candidate_tokens`` + ``score_candidates``).
        """
        if self.device_store is None:
            selected, pair_video = self.candidate_tokens(candidate_rows)
            return self.score_candidates(text_tokens, lengths, candidate_rows, selected, pair_video)
        scorer = self.query_scorer(candidate_rows.shape[1])
        out = np.full(candidate_rows.shape, -np.inf, dtype=np.float32)
        for i, rows in enumerate(candidate_rows):
            valid = rows >= 0
            if valid.any():
                out[i, valid] = scorer(text_tokens[i], int(lengths[i]), self.store.positions(rows[valid]))
        return out

    def query_scorer(self, pairs: int) -> QueryScorer:
        """The scorer of queries with ``pairs`` candidates (made, and on CUDA captured, on first use)."""
        with self._scorers_lock:  # a capture must not overlap another thread's
            if pairs not in self._scorers:
                config = self.reranker.model.config
                self._scorers[pairs] = QueryScorer(self.reranker.model, self.device_store, pairs=pairs,
                                                   text_tokens=config.text_tokens,
                                                   text_token_dim=config.text_token_dim, device=self.device)
            return self._scorers[pairs]

    @torch.inference_mode()
    def candidate_tokens(self, candidate_rows: np.ndarray) -> tuple[SelectedVideos, torch.Tensor | None]:
        """The candidates' selected tokens: (videos, pair_video), pairs = the valid (query, slot)s row-major.

        From the gallery store, else through the selectors. When each video is in one pair (always
        so for one query) the videos come in pair order and pair_video is None: scoring gathers nothing.
        """
        rows = candidate_rows[candidate_rows >= 0]  # (C,) one per pair
        needed, pair_video = np.unique(rows, return_inverse=True)
        if len(needed) == len(rows):  # each video in one pair (one query): load them in pair order
            needed, pair_video = rows, None
        if self.store is not None:
            selected = self.store.read(needed, self.device)
        else:
            selected = select_videos(self.reranker.model, self.rows, needed, device=self.device)
        return selected, None if pair_video is None else torch.from_numpy(pair_video.reshape(-1)).to(self.device)

    @torch.inference_mode()
    def score_candidates(self, text_tokens: np.ndarray, lengths: np.ndarray, candidate_rows: np.ndarray,
                         selected: SelectedVideos, pair_video: torch.Tensor | None) -> np.ndarray:
        """Score every valid (query, candidate) pair with the re-ranker → (Q, K), -inf where no candidate."""
        pair_query, pair_slot = np.nonzero(candidate_rows >= 0)
        text = torch.from_numpy(text_tokens).to(self.device)
        length = torch.from_numpy(lengths.astype(np.int64)).to(self.device)
        pair_text = torch.from_numpy(pair_query).to(self.device)
        scores = self.reranker.model.score(text, length, selected, pair_video, pair_text=pair_text)
        out = np.full(candidate_rows.shape, -np.inf, dtype=np.float32)
        out[pair_query, pair_slot] = scores.float().cpu().numpy()
        return out

    def rank_hits(self, query: str, stage1: np.ndarray, rows: np.ndarray, k: int, top: int,
              rerank: np.ndarray | None) -> QueryResult:
        """One query's hits by the ranking rule (``rerank.ranking``): the top K by fused score, then
        stage-1 order; stage1 (depth,), rows (depth,) cache rows (-1: none), rerank (K,) or None."""
        present = rows >= 0
        ids = [str(self.video_ids[row]) if ok else None for row, ok in zip(rows, present)]
        paths = [str(self.video_paths[row]) if ok else None for row, ok in zip(rows, present)]
        fusion = None if rerank is None else (self.reranker.fusion, self.reranker.fusion_alpha)
        return QueryResult(query=query, results=ranked_hits(stage1, ids, paths, k, top, rerank, fusion))


def ranked_hits(stage1: np.ndarray, video_ids: Sequence[str | None], paths: Sequence[str | None], k: int, top: int,
                rerank: np.ndarray | None, fusion: tuple[str, float | None] | None) -> list[Hit]:
    """The ranking rule over one query's stage-1 list: stage1 (depth,) scores in stage-1 order, their
    video ids and paths (None: no candidate), rerank (K,) the re-ranker's scores of the first K (or None:
    stage 1 only), fusion the run's (fusion, alpha) → the top ``top`` hits: the first K by fused score
    (ties by stage-1 score, then place), then the rest in stage-1 order."""
    order, fused = np.arange(len(video_ids)), None
    if rerank is not None:
        present = np.array([video_id is not None for video_id in video_ids[:k]])[None]
        fused = fused_scores(stage1[None, :k], rerank[None, :k], fusion=fusion[0], alpha=fusion[1],
                             present=present)[0]  # (K,)
        order = np.concatenate([order_candidates(fused[None], stage1[None, :k])[0], order[k:]])
    hits = []
    for slot in order:
        if video_ids[slot] is None:
            continue
        in_head = fused is not None and slot < k
        hits.append(Hit(video_id=video_ids[slot], path=paths[slot], stage1=float(stage1[slot]),
                        rerank=float(rerank[slot]) if in_head else None,
                        score=float(fused[slot] if in_head else stage1[slot]),
                        ranked_by="fused" if in_head else "stage1", stage1_rank=int(slot) + 1))
        if len(hits) == top:
            break
    return hits
