"""What the re-ranker looked at for one (caption, video) pair: the numbers the search page draws.

For one caption and one video, with the hard selection used at query time:

- ``kept_patches`` (T, M): per frame, the patch indices the frame selector kept (all P when the
  model keeps every patch, none when it reads each frame's global token only);
- ``video_picks`` (Nv,): the video selector's picks, as (frame, slot) over the T·F frame-level
  tokens, slot 0 being the frame's global token and slot i ≥ 1 its i-th kept patch;
- ``frame_attention`` (T, F): the frame level's cross attention, averaged over heads and the
  learnable queries (each frame's row sums to 1 over its kept tokens);
- ``frame_weight`` (T,): the video level's attention mass on each frame (its picked tokens plus
  its frame result X(t)), averaged over heads, learnable queries and blocks; sums to 1.

Attention weights come from the same projections the scoring path uses (``CrossBlock.attention``),
so they are the weights that produced ``score``; tests/test_explain.py checks both against the
model. Patch index i lies at row i // grid_w, column i % grid_w of the cache's token grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tvrerank.rerank.model import Reranker, SelectedVideos


@dataclass(frozen=True)
class Explanation:
    score: float  # the re-ranker's score of the pair
    frame_valid: np.ndarray  # (T,) bool
    kept_patches: np.ndarray  # (T, M) int patch indices per frame (M = 0: global tokens only)
    video_picks: np.ndarray  # (Nv, 2) int (frame, slot); slot 0 = the frame's global token
    video_pick_valid: np.ndarray  # (Nv,) bool, False for a pick that landed on a padded frame
    frame_attention: np.ndarray | None  # (T, F) float32, None without the frame level
    frame_weight: np.ndarray | None  # (T,) float32, None without the video level (or combine = joint)

    def patch_of(self, frame: int, slot: int) -> int | None:
        """The patch index behind a frame-level token, None for the frame's global token."""
        return None if slot == 0 else int(self.kept_patches[frame, slot - 1])

    def patch_heat(self, patches: int) -> np.ndarray:
        """(T, P) the frame level's attention on each patch (0 where the patch was not kept)."""
        heat = np.zeros((len(self.frame_valid), patches), dtype=np.float32)
        if self.frame_attention is not None and self.kept_patches.shape[1]:
            np.put_along_axis(heat, self.kept_patches, self.frame_attention[:, 1:], axis=1)
        return heat

    def to_json(self, patches: int) -> dict:
        return {
            "score": self.score,
            "frame_valid": self.frame_valid.tolist(),
            "kept_patches": self.kept_patches.tolist(),
            "video_picks": [{"frame": int(t), "slot": int(slot), "patch": self.patch_of(t, slot), "valid": bool(ok)}
                            for (t, slot), ok in zip(self.video_picks, self.video_pick_valid)],
            "frame_attention": None if self.frame_attention is None else _rounded(self.frame_attention),
            "global_attention": None if self.frame_attention is None else _rounded(self.frame_attention[:, 0]),
            "patch_heat": _rounded(self.patch_heat(patches)),
            "frame_weight": None if self.frame_weight is None else _rounded(self.frame_weight),
        }


def _rounded(array: np.ndarray) -> list:
    return np.round(array.astype(np.float64), 5).tolist()


@torch.no_grad()
def explain_pair(model: Reranker, text_tokens: torch.Tensor, text_length: torch.Tensor, tokens: torch.Tensor,
                 frame_emb: torch.Tensor, frame_mask: torch.Tensor, *,
                 selected: SelectedVideos | None = None) -> Explanation:
    """One caption and one video: text_tokens (1, L, Dt), text_length (1,), tokens (1, T, P, D),
    frame_emb (1, T, E), frame_mask (1, T) bool → what the model kept and attended to.

    ``selected``: the video's selected tokens as a search scored them (the gallery store's float16
    copy), so that the score and attention are the search's; else selected here from ``tokens``.
    """
    model.eval()
    c = model.config
    videos = model.select(tokens, frame_emb, frame_mask, soft=False) if selected is None else selected
    kept = model.kept_patches(tokens, frame_emb, frame_mask)  # (1, T, M)
    per_frame = videos.frame_tokens.shape[2]  # F
    picks = model.video_selector.picks(videos.frame_tokens, ~videos.frame_pad)[0].cpu()  # (Nv,)
    trace: dict = {}
    score = model.score(text_tokens, text_length, videos, None, trace=trace)
    frame_attention = None
    if "frame" in trace:  # (1, T, h, Q, F) → (T, F)
        frame_attention = trace["frame"][0].float().mean(dim=(1, 2)).cpu().numpy()
    frame_weight = None
    if trace.get("video"):  # per block (1, h, Q+L, Lv): the learnable queries' rows
        attention = torch.stack([a[0, :, : c.queries].float().mean(dim=(0, 1)) for a in trace["video"]]).mean(0)
        frame_weight = _mass_per_frame(attention.cpu(), picks, per_frame, tokens.shape[1])
    valid = frame_mask[0].cpu().numpy().astype(bool)
    return Explanation(
        score=float(score[0]), frame_valid=valid, kept_patches=kept[0].cpu().numpy(),
        video_picks=np.stack([(picks // per_frame).numpy(), (picks % per_frame).numpy()], axis=1),
        video_pick_valid=valid[(picks // per_frame).numpy()], frame_attention=frame_attention,
        frame_weight=frame_weight)


def _mass_per_frame(attention: torch.Tensor, picks: torch.Tensor, per_frame: int, frames: int) -> np.ndarray:
    """attention (Lv,) over [the Nv picked tokens; X(1..T) when fed] → (T,) the mass on each frame."""
    mass = torch.zeros(frames)
    mass.index_add_(0, picks // per_frame, attention[: len(picks)])
    results = attention[len(picks):]  # the frame results X(t), in frame order (hierarchical only)
    mass[: len(results)] += results
    return mass.numpy()
