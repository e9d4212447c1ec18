"""Running a trained re-ranker over a cache's candidate lists (no gradients)."""

from __future__ import annotations

import numpy as np
import torch

from tvrerank.train.data import CacheRows
from tvrerank.train.model import Reranker, SelectedVideos


@torch.no_grad()
def select_videos(model: Reranker, rows_source: CacheRows, rows: np.ndarray, *, device: torch.device,
                  batch: int = 128) -> SelectedVideos:
    """The selectors' output for video ``rows`` (unique, any order), in that order, on ``device``."""
    parts = []
    for start in range(0, len(rows), batch):
        data = {k: v.to(device) for k, v in rows_source.videos(rows[start : start + batch]).items()}
        parts.append(model.select(data["tokens"], data["frame_emb"], data["frame_mask"]))
    return SelectedVideos.concatenate(parts)


@torch.no_grad()
def rerank_scores(model: Reranker, cache_path, candidate_video: np.ndarray, *, device: torch.device,
                  caption_batch: int = 64, memory_budget: int = 2 << 30) -> np.ndarray:
    """Re-ranker scores of every caption's candidates: candidate_video (M, K) rows → (M, K) float32.

    Each candidate video goes through the selectors once; -1 padding scores -inf.
    """
    model.eval()
    source = CacheRows(cache_path, memory_budget=memory_budget)
    needed = np.unique(candidate_video[candidate_video >= 0])
    selected = select_videos(model, source, needed, device=device)
    m, k = candidate_video.shape
    scores = np.full((m, k), -np.inf, dtype=np.float32)
    for start in range(0, m, caption_batch):
        captions = np.arange(start, min(start + caption_batch, m))
        text = {n: v.to(device) for n, v in source.texts(captions).items()}
        block = candidate_video[captions]  # (b, K)
        valid = block >= 0
        pair_caption, pair_slot = np.nonzero(valid)
        pair_video = torch.from_numpy(np.searchsorted(needed, block[valid])).to(device)
        out = model.score(text["text_tokens"], text["text_length"], selected, pair_video,
                          pair_text=torch.from_numpy(pair_caption).to(device))
        scores[captions[pair_caption], pair_slot] = out.float().cpu().numpy()
    return scores
