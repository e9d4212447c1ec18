"""Running a trained re-ranker over a cache's candidate lists (no gradients)."""

from __future__ import annotations

import numpy as np
import torch

from tvrerank.cache.rows import CacheRows, on_device
from tvrerank.rerank.model import Reranker, SelectedVideos
from tvrerank.rerank.ranking import check_finite


@torch.no_grad()
def select_videos(model: Reranker, rows_source: CacheRows, rows: np.ndarray, *, device: torch.device,
                  batch: int = 128, soft: bool = False) -> SelectedVideos:
    """The selectors' output for video ``rows`` (unique, any order), in that order, on ``device``.

    ``soft``: the training-time perturbed selection instead of the hard top-k (to measure the gap).
    """
    parts = []
    for start in range(0, len(rows), batch):
        data = on_device(rows_source.videos(rows[start : start + batch]), device)
        parts.append(model.select(data["tokens"], data["frame_emb"], data["frame_mask"], soft=soft))
    return SelectedVideos.concatenate(parts)


@torch.no_grad()
def rerank_scores(model: Reranker, cache_path, candidate_video: np.ndarray, *, device: torch.device,
                  captions: np.ndarray | None = None, caption_batch: int = 64,
                  memory_budget: int | None = None, in_memory: str = "auto",
                  soft_selection: bool = False) -> np.ndarray:
    """Re-ranker scores of the captions' candidates: candidate_video (M, K) rows → (M, K) float32.

    ``captions`` (sorted caption rows) limits the work to those rows (the others stay NaN; used to
    split validation across ranks); ``soft_selection`` scores with the training-time selection.
    Each needed video goes through the selectors once; -1 padding
    scores -inf. Raises NonFiniteScores if the model outputs NaN or inf for a real candidate.
    """
    model.eval()
    source = CacheRows(cache_path, memory_budget=memory_budget, in_memory=in_memory, device=device)
    m, k = candidate_video.shape
    captions = np.arange(m) if captions is None else np.asarray(captions)
    scores = np.full((m, k), np.nan, dtype=np.float32)
    scores[captions] = -np.inf
    block = candidate_video[captions]
    needed = np.unique(block[block >= 0])
    if len(needed) == 0:
        return scores
    selected = select_videos(model, source, needed, device=device, soft=soft_selection)
    for start in range(0, len(captions), caption_batch):
        rows = captions[start : start + caption_batch]
        text = on_device(source.texts(rows), device)
        lists = candidate_video[rows]  # (b, K)
        valid = lists >= 0
        pair_caption, pair_slot = np.nonzero(valid)
        pair_video = torch.from_numpy(np.searchsorted(needed, lists[valid])).to(device)
        out = model.score(text["text_tokens"], text["text_length"], selected, pair_video,
                          pair_text=torch.from_numpy(pair_caption).to(device))
        scores[rows[pair_caption], pair_slot] = out.float().cpu().numpy()
    check_finite(scores[captions], candidate_video[captions] >= 0)
    return scores
