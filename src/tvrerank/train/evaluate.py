"""Stage 1 vs re-ranked, side by side, on a cache's candidate lists."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tvrerank.cache.reader import CacheReader
from tvrerank.index.candidates import CandidateLists, read_candidates
from tvrerank.metrics import recall_curve, retrieval_metrics
from tvrerank.train.fusion import fuse, reranked_ranks, tune_alpha
from tvrerank.train.inference import rerank_scores
from tvrerank.train.model import Reranker


class CacheMismatch(ValueError):
    """A re-ranker used on a cache from another encoder, sampling or token layout."""


def check_cache_matches(fingerprint: dict, cache: CacheReader, where: str) -> None:
    if fingerprint != cache.header.fingerprint():
        model = fingerprint.get("encoder", {}).get("model")
        raise CacheMismatch(
            f"{where} was trained on a cache from another encoder, sampling or token layout "
            f"(trained with {model}; {cache.path} holds {cache.header.encoder.model}); "
            "extract the cache with the same settings or train a re-ranker on this one"
        )


def _below_the_rest(scores: np.ndarray, present: np.ndarray) -> np.ndarray:
    """(M, K) scores with missing slots set just below the lowest present score (finite, for fusion)."""
    floor = scores[present].min() - 1 if present.any() else 0.0
    return np.where(present, scores, floor)


def load_lists(cache_path: str | Path, candidates_path: str | Path) -> tuple[CandidateLists, np.ndarray]:
    """(candidate lists, true video row of each caption)."""
    with CacheReader(cache_path) as cache:
        return read_candidates(candidates_path, cache), cache["texts/video"][()]


def compare_stages(model: Reranker, cache_path: str | Path, lists: CandidateLists, true_video: np.ndarray, *,
                   device: torch.device, alpha: float | None = None) -> dict:
    """{"stage1", "reranked": metrics, "alpha", "recall_at_k", ...}; alpha tuned here when None."""
    valid = lists.true_rank > 0
    if not valid.any():
        raise ValueError("no caption's video is in the gallery: nothing to evaluate")
    present = lists.video >= 0  # approximate indexes may return fewer than K
    stage1 = _below_the_rest(lists.score, present)
    scores = _below_the_rest(rerank_scores(model, cache_path, lists.video, device=device), present)
    if alpha is None:
        alpha, _ = tune_alpha(stage1, scores, lists.video, true_video, lists.true_rank)
    ranks = reranked_ranks(fuse(stage1, scores, alpha), lists.video, true_video, lists.true_rank)
    only_rerank = reranked_ranks(fuse(stage1, scores, 0.0), lists.video, true_video, lists.true_rank)
    return {
        "captions": int(len(valid)),
        "evaluated": int(valid.sum()),
        "k": int(lists.video.shape[1]),
        "recall_at_k": float((lists.true_rank[valid] <= lists.video.shape[1]).mean() * 100),
        "alpha": float(alpha),
        "stage1": retrieval_metrics(lists.true_rank[valid]),
        "reranked": retrieval_metrics(ranks[valid]),
        "reranker_only": retrieval_metrics(only_rerank[valid]),
        "recall_curve": {"stage1": recall_curve(lists.true_rank[valid], lists.video.shape[1]),
                         "reranked": recall_curve(ranks[valid], lists.video.shape[1])},
    }


def evaluate_run(run_dir: str | Path, cache_path: str | Path, candidates_path: str | Path, *,
                 device: str = "auto") -> dict:
    """Stage 1 vs re-ranked for a saved run, with the fusion weight it was trained with."""
    from tvrerank.train.checkpoint import device_for, load_reranker

    torch_device = device_for(device)
    trained = load_reranker(run_dir, torch_device)
    with CacheReader(cache_path) as cache:
        check_cache_matches(trained.fingerprint, cache, f"re-ranker {run_dir}")
    lists, true_video = load_lists(cache_path, candidates_path)
    return compare_stages(trained.model, cache_path, lists, true_video, device=torch_device,
                          alpha=trained.fusion_alpha)
