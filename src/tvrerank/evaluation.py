"""Evaluation: stage 1, and stage 1 vs re-ranked, on a cache's candidate lists.

* :func:`stage1_evaluation` — text→video from the exact stage-1 ranks in the candidates file,
  video→text and the dual-softmax (DSL) variant from the cache's own embeddings. DSL re-weights
  scores with information from every query at once (it looks at the whole test set), so it is
  always reported apart.
* :func:`compare_stages` — the re-ranker's scores of every caption's top K, ranked by the one
  rule of ``tvrerank.rerank.ranking`` (the rule ``retrieve`` serves with), reported four ways:
  stage 1, the re-ranker alone, the plain sum of the two scores, and the run's fusion (the
  tuned weight ``alpha``, or the plain sum). Training's validation and ``eval --reranker`` both
  call it.
* :func:`evaluate_run` — a saved run on a cache; says when that cache is the split the run was
  trained or tuned on, and, on a cache that knows where a toy world's detail is, how often the
  selectors keep it (``selector_recall.py``).

Ranks and metrics themselves come from ``tvrerank.metrics`` (pure numpy).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from tvrerank.cache.identity import cache_video_ids_digest
from tvrerank.cache.reader import CacheReader
from tvrerank.devices import resolve_device
from tvrerank.errors import InputError
from tvrerank.index.candidates import CandidateLists, read_candidates
from tvrerank.index.store import read_gallery
from tvrerank.metrics import dual_softmax, recall_curve, retrieval_metrics, text_to_video_ranks, video_to_text_ranks
from tvrerank.rerank.checkpoint import load_reranker
from tvrerank.rerank.inference import rerank_scores
from tvrerank.rerank.model import Reranker
from tvrerank.rerank.ranking import fuse, fused_scores, plain_sum, reranked_ranks, tune_alpha

log = logging.getLogger(__name__)

DENSE_LIMIT = 400_000_000  # captions x videos above which v2t and DSL (dense matrices) are skipped
VARIANTS = ("reranker_only", "plain_sum", "reranked")  # besides "stage1"; "reranked" is the run's fusion


def _counts(lists: CandidateLists, captions: np.ndarray) -> tuple[dict, np.ndarray]:
    valid = captions[lists.true_rank[captions] > 0]
    if len(valid) == 0:
        raise InputError("no caption's video is in the gallery: nothing to evaluate")
    k = lists.video.shape[1]
    return {"captions": int(len(captions)), "evaluated": int(len(valid)), "k": int(k),
            "recall_at_k": float((lists.true_rank[valid] <= k).mean() * 100)}, valid


def stage1_evaluation(cache_path: str | Path, candidates_path: str | Path, *, dsl: bool = False) -> dict:
    """Stage-1 metrics; keys: stage1 (t2v), v2t.stage1, dsl.stage1 (if asked), counts."""
    with CacheReader(cache_path) as cache:
        lists = read_candidates(candidates_path, cache)
        result, valid = _counts(lists, np.arange(len(lists.true_rank)))
        result.update(source=lists.source, stage1=retrieval_metrics(lists.true_rank[valid]))
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


def load_lists(cache_path: str | Path, candidates_path: str | Path) -> tuple[CandidateLists, np.ndarray]:
    """(candidate lists, true video row of each caption)."""
    with CacheReader(cache_path) as cache:
        return read_candidates(candidates_path, cache), cache["texts/video"][()]


def stage_metrics(lists: CandidateLists, true_video: np.ndarray, scores: np.ndarray, *,
                  alpha: float | None = None, fusion: str = "tuned", captions: np.ndarray | None = None,
                  keep_ranks: bool = False) -> dict:
    """Stage 1 vs re-ranked from the re-ranker's ``scores`` (M, K) of the lists (pure numpy).

    ``captions`` (caption rows) restricts the evaluation to them (a validation split). ``fusion``
    ``tuned``: "reranked" fuses with ``alpha`` (None: tuned here on those captions); ``sum``: it is
    the plain sum and "alpha" is None. Keys: the counts, "fusion", "alpha", "stage1", "reranker_only",
    "plain_sum", "reranked" (the run's fusion) and "recall_curve" of each; with ``keep_ranks``
    also "ranks": {"caption": caption rows, variant: each caption's rank} (-1: video not in the gallery).
    """
    captions = np.arange(len(lists.true_rank)) if captions is None else np.asarray(captions)
    result, _ = _counts(lists, captions)
    present = lists.video[captions] >= 0  # approximate indexes may return fewer than K
    stage1, rerank = lists.score[captions], scores[captions]
    video, truth, true_rank = lists.video[captions], true_video[captions], lists.true_rank[captions]
    if fusion == "sum":
        alpha = None
    elif alpha is None:
        alpha, _ = tune_alpha(stage1, rerank, video, truth, true_rank, present)
    ranks = {
        "stage1": true_rank,
        "reranker_only": reranked_ranks(fuse(stage1, rerank, 0.0, present), stage1, video, truth, true_rank),
        "plain_sum": reranked_ranks(plain_sum(stage1, rerank, present), stage1, video, truth, true_rank),
        "reranked": reranked_ranks(fused_scores(stage1, rerank, fusion=fusion, alpha=alpha, present=present),
                                   stage1, video, truth, true_rank),
    }
    evaluated = true_rank > 0
    result["fusion"], result["alpha"] = fusion, None if alpha is None else float(alpha)
    result.update({name: retrieval_metrics(r[evaluated]) for name, r in ranks.items()})
    result["recall_curve"] = {name: recall_curve(r[evaluated], result["k"]) for name, r in ranks.items()}
    if keep_ranks:
        result["ranks"] = {"caption": captions, **ranks}
    return result


def compare_stages(model: Reranker, cache_path: str | Path, lists: CandidateLists, true_video: np.ndarray, *,
                   device: torch.device, alpha: float | None = None, fusion: str = "tuned",
                   captions: np.ndarray | None = None, keep_ranks: bool = False) -> dict:
    """Score the lists with ``model``, then :func:`stage_metrics`."""
    scores = rerank_scores(model, cache_path, lists.video, device=device, captions=captions)
    return stage_metrics(lists, true_video, scores, alpha=alpha, fusion=fusion, captions=captions,
                         keep_ranks=keep_ranks)


def fusion_label(result: dict) -> str:
    """How the "reranked" row of a result is named in tables and plots."""
    return "fused (plain sum)" if result.get("fusion") == "sum" else f"fused (alpha {result['alpha']:.2f})"


def write_rank_table(path: str | Path, cache_path: str | Path, ranks: dict) -> None:
    """``ranks`` (from ``keep_ranks``) as CSV: one row per caption — its row, text, true video id and
    its rank under each variant (-1: its video is not in the gallery)."""
    import csv

    with CacheReader(cache_path) as cache:
        captions, video_ids = cache.strings("texts/caption"), cache.strings("videos/id")
        caption_video = cache["texts/video"][()]
    variants = [name for name in ranks if name != "caption"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["caption_row", "caption", "video_id", *variants])
        for i, row in enumerate(ranks["caption"]):
            writer.writerow([int(row), captions[row], video_ids[caption_video[row]],
                             *(int(ranks[name][i]) for name in variants)])


def evaluate_run(run_dir: str | Path, cache_path: str | Path, candidates_path: str | Path, *,
                 device: str = "auto", keep_ranks: bool = False) -> dict:
    """Stage 1 vs re-ranked for a saved run, with the fusion weight it was trained with.

    Adds ``tuned_on_this_split`` (this cache is the run's validation split, which chose alpha and
    the checkpoint) and ``trained_on_this_split``, each with a warning when true; and "selectors"
    (``selector_recall.selector_recalls``) when the cache carries a detail world's ground truth.
    """
    from tvrerank.selector_recall import selector_recalls

    torch_device = resolve_device(device)
    trained = load_reranker(run_dir, torch_device)
    with CacheReader(cache_path) as cache:
        trained.require_cache(cache)
        digest = cache_video_ids_digest(cache)
    lists, true_video = load_lists(cache_path, candidates_path)
    result = compare_stages(trained.model, cache_path, lists, true_video, device=torch_device,
                            alpha=trained.fusion_alpha, fusion=trained.fusion, keep_ranks=keep_ranks)
    for flag, split in (("tuned_on_this_split", "validation"), ("trained_on_this_split", "train")):
        identity = trained.splits.get(split) or {}
        result[flag] = identity.get("video_ids_sha256") == digest
        if result[flag]:
            log.warning("%s is the %s split of %s: %s numbers are not a held-out result", cache_path, split,
                        run_dir, "the fusion weight and the checkpoint were chosen on it, so these"
                        if split == "validation" else "the re-ranker was trained on it, so these")
    selectors = selector_recalls(trained.model, cache_path, device=torch_device)
    if selectors is not None:
        result["selectors"] = selectors
    return result
