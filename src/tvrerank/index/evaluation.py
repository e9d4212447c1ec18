"""Stage-1 evaluation of a cache's candidate lists: text→video from the exact true ranks,
video→text and the dual-softmax (DSL) variant from the cache's own embeddings.

DSL re-weights scores with information from every query at once (it looks at the whole test
set), so it is always reported apart from the plain figures.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from tvrerank.cache.reader import CacheReader
from tvrerank.index.candidates import read_candidates
from tvrerank.index.store import read_gallery
from tvrerank.metrics import dual_softmax, retrieval_metrics, text_to_video_ranks, video_to_text_ranks

log = logging.getLogger(__name__)

DENSE_LIMIT = 400_000_000  # captions x videos above which v2t and DSL (dense matrices) are skipped


def stage1_evaluation(cache_path: str | Path, candidates_path: str | Path, *, dsl: bool = False) -> dict:
    """Stage-1 metrics; keys: stage1 (t2v), v2t.stage1, dsl.stage1 (if asked), counts."""
    with CacheReader(cache_path) as cache:
        lists = read_candidates(candidates_path, cache)
        valid = lists.true_rank > 0
        if not valid.any():
            raise ValueError(f"{candidates_path}: no caption's video is in the gallery")
        result = {
            "captions": int(len(valid)),
            "evaluated": int(valid.sum()),
            "k": int(lists.video.shape[1]),
            "source": lists.source,
            "recall_at_k": float((lists.true_rank[valid] <= lists.video.shape[1]).mean() * 100),
            "stage1": retrieval_metrics(lists.true_rank[valid]),
        }
        rows, video_emb = read_gallery(cache)
        text_emb = cache["texts/emb"][()].astype(np.float32)
        caption_video = cache["texts/video"][()]
        column_of = np.full(cache.num_videos, -1)
        column_of[rows] = np.arange(len(rows))
    if len(text_emb) * len(rows) > DENSE_LIMIT:
        log.warning("v2t and DSL need the dense %d x %d matrix: skipped", len(text_emb), len(rows))
        return result
    if not lists.source.startswith("faiss:"):
        log.info("v2t and DSL use the cache's own embeddings, not the external first stage: skipped")
        return result
    in_gallery = column_of[caption_video] >= 0
    similarity = text_emb[in_gallery] @ video_emb.T  # (M', N)
    columns = column_of[caption_video[in_gallery]]
    v2t_ranks, _ = video_to_text_ranks(similarity, columns)
    result["v2t"] = {"stage1": retrieval_metrics(v2t_ranks)}
    if dsl:
        result["dsl"] = {"stage1": retrieval_metrics(text_to_video_ranks(dual_softmax(similarity), columns))}
    return result
