"""Known-answer checks of the re-ranker's selectors on a cache that knows where the detail is.

A detail-world cache (``cache/truth.py``) says which patches of which sampled frames show a small
glyph the captions name and the frame embeddings do not carry. Three figures follow, each beside
what a selector that ignores the content would score:

- ``frame_selector_recall``: over frames that show the detail, the fraction whose kept top-M
  patches include a detail patch; chance (M patches drawn at random) is 1 - C(P-a, M) / C(P, M) for
  a detail of a patches, about M·a/P;
- ``video_selector_recall``: the fraction of the video selector's picks (over the T·F frame-level
  tokens) that come from frames showing the detail; chance is the share of such frames;
- ``detail_attention_mass``: over (caption, its video) pairs and frames showing the detail, the
  frame level's attention (mean over heads and learnable queries) on kept detail patches; beside it
  the mass a uniform attention over the F kept tokens would give them.

The first three functions are pure (numpy in, dicts out); ``selector_recalls`` runs a trained
re-ranker over a cache with hard selection, as at query time. Part of evaluation: it imports no
trainer, and the serving path does not import it.
"""

from __future__ import annotations

from math import comb

import numpy as np
import torch

from tvrerank.cache.reader import CacheReader
from tvrerank.cache.rows import CacheRows, on_device
from tvrerank.cache.schema import OK
from tvrerank.cache.truth import read_truth
from tvrerank.rerank.model import Reranker, SelectedVideos


def kept_any_chance(patches: int, keep: int, area: np.ndarray) -> np.ndarray:
    """Chance that ``keep`` of ``patches`` drawn at random include one of ``area`` (any shape) given
    ones: 1 - C(P-a, M) / C(P, M), elementwise."""
    area = np.asarray(area, dtype=np.int64)
    keep = min(keep, patches)
    miss = np.array([comb(patches - int(a), keep) / comb(patches, keep) for a in area.ravel()], dtype=np.float64)
    return (1.0 - miss).reshape(area.shape)


def frame_selector_recall(kept: np.ndarray, detail: np.ndarray) -> dict:
    """kept (N, T, M) patch indices the frame selector keeps, detail (N, T, P) bool → {"recall": the
    fraction of frames showing the detail whose kept patches include a detail patch, "chance" (exact),
    "chance_approx" (mean M·a/P), "frames": how many frames show the detail}; recall None without any."""
    n, t, p = detail.shape
    m = kept.shape[-1]
    shows = detail.any(-1)  # (N, T)
    hit = np.take_along_axis(detail, np.asarray(kept, dtype=np.int64), axis=-1).any(-1)  # (N, T)
    area = detail.sum(-1)[shows]  # (frames,)
    frames = int(shows.sum())
    if frames == 0:
        return {"recall": None, "chance": None, "chance_approx": None, "frames": 0, "keep": m, "patches": p}
    return {"recall": float(hit[shows].mean()), "chance": float(kept_any_chance(p, m, area).mean()),
            "chance_approx": float(np.minimum(1.0, m * area / p).mean()), "frames": frames, "keep": m, "patches": p}


def video_selector_recall(picks: np.ndarray, pick_valid: np.ndarray, detail_frames: np.ndarray,
                          frame_valid: np.ndarray, per_frame: int) -> dict:
    """picks (N, Nv) indices into each video's T·F frame-level tokens (frame = index // F), pick_valid
    (N, Nv) bool, detail_frames (N, T) bool, frame_valid (N, T) bool → {"recall": the fraction of
    valid picks, over videos with a detail frame, that come from a detail frame; "chance": that
    fraction for picks drawn uniformly over the valid frames' tokens; "picks"}."""
    frame = np.asarray(picks, dtype=np.int64) // per_frame  # (N, Nv)
    videos = detail_frames.any(-1)  # (N,)
    from_detail = np.take_along_axis(detail_frames, frame, axis=1) & pick_valid  # (N, Nv)
    counted = pick_valid[videos]
    total = int(counted.sum())
    if total == 0:
        return {"recall": None, "chance": None, "picks": 0}
    share = detail_frames.sum(-1) / np.maximum(frame_valid.sum(-1), 1)  # (N,) detail frames among valid ones
    chance = float((pick_valid.sum(-1) * share)[videos].sum() / total)
    return {"recall": float(from_detail[videos].sum() / total), "chance": chance, "picks": total}


def detail_attention_mass(attention: np.ndarray, kept: np.ndarray, detail: np.ndarray) -> dict:
    """attention (C, T, F) of each pair's frame level over its kept tokens (slot 0 the frame's global
    token, slot i its i-th kept patch), kept (C, T, M), detail (C, T, P) bool of the pair's video →
    {"mass": the mean, over frames showing the detail, of the attention on kept detail patches,
    "uniform": the same for attention spread evenly over the F slots, "frames"}."""
    shows = detail.any(-1)  # (C, T)
    frames = int(shows.sum())
    if frames == 0 or kept.shape[-1] == 0:
        return {"mass": None, "uniform": None, "frames": frames}
    on_detail = np.take_along_axis(detail, np.asarray(kept, dtype=np.int64), axis=-1)  # (C, T, M)
    mass = (attention[..., 1:] * on_detail).sum(-1)  # (C, T)
    uniform = on_detail.sum(-1) / attention.shape[-1]
    return {"mass": float(mass[shows].mean()), "uniform": float(uniform[shows].mean()), "frames": frames}


@torch.no_grad()
def selector_outputs(model: Reranker, source: CacheRows, rows: np.ndarray, *, device: torch.device,
                     batch: int = 64) -> tuple[np.ndarray, np.ndarray, SelectedVideos]:
    """Hard selection of video ``rows``: kept patches (N, T, M), video picks (N, Nv) and the selected
    videos (on ``device``)."""
    kept, picks, parts = [], [], []
    for start in range(0, len(rows), batch):
        data = on_device(source.videos(rows[start : start + batch]), device)
        videos = model.select(data["tokens"], data["frame_emb"], data["frame_mask"], soft=False)
        kept.append(model.kept_patches(data["tokens"], data["frame_emb"], data["frame_mask"]).cpu().numpy())
        picks.append(model.video_selector.picks(videos.frame_tokens, ~videos.frame_pad).cpu().numpy())
        parts.append(videos)
    return np.concatenate(kept), np.concatenate(picks), SelectedVideos.concatenate(parts)


@torch.no_grad()
def selector_recalls(model: Reranker, cache_path, *, device: torch.device, caption_batch: int = 64) -> dict | None:
    """The three known-answer figures of ``model`` on a detail-world cache (its ok videos, each caption
    with its own video); None when the cache knows no detail."""
    model.eval()
    with CacheReader(cache_path) as cache:
        truth = read_truth(cache)
        if truth is None or truth.detail is None:
            return None
        ok = np.flatnonzero(cache["videos/status"][()] == OK)
        caption_video = cache["texts/video"][()]
    source = CacheRows(cache_path, device=device)
    kept, picks, selected = selector_outputs(model, source, ok, device=device)
    detail = truth.detail[ok]  # (N, T, P)
    frame_valid = ~selected.frame_pad.cpu().numpy()
    per_frame = selected.frame_tokens.shape[2]
    pick_valid = np.take_along_axis(frame_valid, picks // per_frame, axis=1)
    result = {
        "frame_selector": frame_selector_recall(kept, detail) if kept.shape[-1] else None,
        "video_selector": video_selector_recall(picks, pick_valid, detail.any(-1), frame_valid, per_frame),
        "videos": int(len(ok)), "frame_tokens": model.config.frame_tokens,
    }
    captions = np.flatnonzero(np.isin(caption_video, ok))
    position = np.searchsorted(ok, caption_video[captions])  # each caption's video among the ok rows
    masses = []
    for start in range(0, len(captions), caption_batch):
        rows = captions[start : start + caption_batch]
        text = on_device(source.texts(rows), device)
        pair_video = position[start : start + caption_batch]
        trace: dict = {}
        model.score(text["text_tokens"], text["text_length"], selected, torch.from_numpy(pair_video).to(device),
                    pair_text=torch.arange(len(rows), device=device), trace=trace)
        if "frame" in trace:
            masses.append(trace["frame"].float().mean(dim=(2, 3)).cpu().numpy())  # (C, T, F)
    result["attention"] = None
    if masses and kept.shape[-1]:
        result["attention"] = detail_attention_mass(np.concatenate(masses), kept[position], detail[position])
    return result


def format_recalls(recalls: dict) -> str:
    """``selector_recalls``' figures as lines for a terminal or a report."""
    def pct(value):
        return "-" if value is None else f"{100 * value:.1f}%"

    lines = [f"known-answer checks on {recalls['videos']} videos (frame tokens: {recalls['frame_tokens']})"]
    frame = recalls.get("frame_selector")
    if frame is None:
        lines.append("  frame selector: keeps no patch (global tokens only)")
    else:
        lines.append(f"  frame selector recall: {pct(frame['recall'])} of {frame['frames']} detail frames keep a detail "
                     f"patch in their top {frame['keep']} of {frame['patches']} (chance {pct(frame['chance'])})")
    video = recalls["video_selector"]
    lines.append(f"  video selector recall: {pct(video['recall'])} of its picks come from detail frames "
                 f"(chance {pct(video['chance'])})")
    attention = recalls.get("attention")
    if attention is not None and attention["mass"] is not None:
        lines.append(f"  frame attention on detail patches: {pct(attention['mass'])} of each detail frame's "
                     f"(uniform {pct(attention['uniform'])})")
    return "\n".join(lines)
