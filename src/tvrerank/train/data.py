"""Training batches from the cache and the candidate lists alone (the backbone never runs).

``TrainingBatches`` is a map-style dataset whose item ``i`` is a whole training step: B captions,
each with its positive video, hard negatives from its top-K candidates (drawn uniformly, or in
proportion to softmax(stage-1 score / temperature) as in ALBEF) and in-batch negatives (other
captions' videos); optionally negative captions per positive video (other captions of the batch,
uniformly or by similarity to the video); plus the tokens of every video the step needs, each
read once (through ``cache.rows.CacheRows``). A micro-batch depends only on (seed, step, slot), where
slot = micro-step x world size + rank: a resumed run sees the same batches, and N ranks with
one micro-batch each see exactly the batches one process sees with N micro-batches. Videos held
out for validation never appear in a batch, as positive or negative.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tvrerank.cache.reader import CacheReader
from tvrerank.cache.rows import CacheRows
from tvrerank.cache.schema import OK
from tvrerank.errors import InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchSpec:
    captions: int = 32  # B
    negatives: int = 7  # hard negatives from each caption's top-K
    in_batch: int = 4  # other captions' videos
    negative_captions: int = 0  # Nc: other captions of the batch paired with each caption's positive video
    sampling: str = "uniform"  # uniform | similarity: how hard negatives (videos and captions) are drawn
    temperature: float = 0.07  # of the similarity sampler's softmax

    @property
    def group(self) -> int:
        """G: videos per caption (the positive and its negatives, all distinct)."""
        return 1 + self.negatives + self.in_batch


class TrainingBatches(torch.utils.data.Dataset):
    """Item ``i`` → one micro-batch's tensors (see module docstring). Length = steps x grad_accum.

    ``held_out`` (video rows) are kept out of training entirely: their captions are not trained
    on and they are never drawn as negatives.
    """

    def __init__(self, cache_path: str | Path, candidate_video: np.ndarray, *, spec: BatchSpec, steps: int,
                 seed: int = 0, rank: int = 0, world: int = 1, grad_accum: int = 1, memory_budget: int | None = None,
                 in_memory: str = "auto", device=None, held_out: np.ndarray | None = None, candidate_score: np.ndarray | None = None):
        with CacheReader(cache_path) as cache:
            self.caption_video = cache["texts/video"][()]
            ok = cache["videos/status"][()] == OK
        self.usable = ok.copy()  # (N,) videos a batch may contain
        if held_out is not None:
            self.usable[held_out] = False
        self.candidates = candidate_video  # (M, K) cache rows
        self.candidate_score = candidate_score  # (M, K) stage-1 scores (the similarity sampler's weights)
        if spec.sampling == "similarity" and candidate_score is None:
            raise ValueError("the similarity sampler needs the candidates' stage-1 scores")
        self.trainable = np.flatnonzero(self.usable[self.caption_video])
        self.pool = np.flatnonzero(self.usable)  # random negatives come from here
        if len(self.trainable) < 2:
            raise InputError(f"{cache_path}: fewer than 2 captions have an ok video (outside the validation "
                             "split); nothing to train on")
        if len(self.pool) < spec.group:
            raise InputError(
                f"{cache_path}: {len(self.pool)} videos can be trained on, but each caption needs "
                f"{spec.group} distinct videos (1 positive + negatives {spec.negatives} + in_batch {spec.in_batch}); "
                "lower 'negatives' and 'in_batch' in --config, or train on a larger cache")
        skipped = int((~ok[self.caption_video]).sum())
        if skipped:
            log.warning("%d captions belong to videos that failed extraction: skipped", skipped)
        self.spec, self.steps, self.seed, self.rank = spec, steps, seed, rank
        self.world, self.grad_accum = world, grad_accum
        self.rows = CacheRows(cache_path, memory_budget=memory_budget, in_memory=in_memory, device=device)

    def __len__(self) -> int:
        return self.steps * self.grad_accum

    def group_rows(self, captions: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(B,) caption ids → (B, G) distinct video rows each: the positive first, then hard negatives
        (its top-K), in-batch negatives (other captions' positives), then random usable videos if short."""
        spec = self.spec
        positives = self.caption_video[captions]
        groups = np.empty((len(captions), spec.group), dtype=np.int64)
        for i, (caption, positive) in enumerate(zip(captions, positives)):
            chosen = self.hard_negatives(caption, positive, rng)
            others = np.setdiff1d(positives, np.append(chosen, positive))  # sorted, unique
            chosen = np.concatenate([chosen, rng.permutation(others)[: spec.in_batch]])
            if len(chosen) < spec.group - 1:  # small galleries: distinct random videos fill the group
                spare = np.setdiff1d(self.pool, np.append(chosen, positive))
                chosen = np.concatenate([chosen, rng.choice(spare, spec.group - 1 - len(chosen), replace=False)])
            groups[i, 0], groups[i, 1:] = positive, chosen
        return groups

    def hard_negatives(self, caption: int, positive: int, rng: np.random.Generator) -> np.ndarray:
        """Up to ``negatives`` distinct usable videos of the caption's top-K other than its own."""
        listed = self.candidates[caption]
        keep = (listed >= 0) & (listed != positive)
        keep[keep] &= self.usable[listed[keep]]
        hard, first = np.unique(listed[keep], return_index=True)
        count = min(self.spec.negatives, len(hard))
        if self.spec.sampling == "uniform" or count == 0:
            return rng.permutation(hard)[:count]
        return draw_by_score(rng, hard, self.candidate_score[caption][keep][first] / self.spec.temperature, count)

    def negative_texts(self, captions: np.ndarray, positives: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(B, Nc) indices into the batch's captions, each pairing caption b's positive video with a
        caption of another video: uniformly, or by softmax(cos(caption, video) / temperature)."""
        spec, b = self.spec, len(captions)
        other = positives[None, :] != positives[:, None]  # (B, B): row b's video vs caption b'
        if spec.sampling == "similarity":
            text = self.rows.embeddings("texts/emb", captions)  # (B, E)
            videos, inverse = np.unique(positives, return_inverse=True)
            video = self.rows.embeddings("videos/video_emb", videos)[inverse]  # (B, E)
            similarity = video @ text.T  # (B, B)
        else:
            similarity = np.zeros((b, b))
        chosen = np.empty((b, spec.negative_captions), dtype=np.int64)
        for i in range(b):
            pool = np.flatnonzero(other[i])
            if len(pool) < spec.negative_captions:
                raise InputError(f"{self.rows.path}: a batch has {len(pool)} captions of other videos, fewer than "
                                 f"negative_captions ({spec.negative_captions}); lower it in --config")
            chosen[i] = draw_by_score(rng, pool, similarity[i, pool] / spec.temperature, spec.negative_captions)
        return chosen

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        """Micro-batch ``item % grad_accum`` of step ``item // grad_accum`` for this rank."""
        step, micro = divmod(item, self.grad_accum)
        rng = np.random.default_rng([self.seed, step, micro * self.world + self.rank])
        count = min(self.spec.captions, len(self.trainable))
        captions = np.sort(rng.choice(self.trainable, count, replace=False))
        groups = self.group_rows(captions, rng)
        rows, pair_video = np.unique(groups, return_inverse=True)  # each video read once
        batch = {**self.rows.videos(rows), **self.rows.texts(captions)}
        batch["pair_video"] = torch.from_numpy(pair_video.reshape(groups.shape))  # (B, G) into rows
        if self.spec.negative_captions:
            batch["negative_text"] = torch.from_numpy(self.negative_texts(captions, groups[:, 0], rng))
        return batch


def draw_by_score(rng: np.random.Generator, items: np.ndarray, logits: np.ndarray, count: int) -> np.ndarray:
    """``count`` distinct items drawn without replacement with probabilities ∝ exp(logit), by the
    Gumbel-top-k trick (exact for any temperature, where probabilities would underflow)."""
    keys = np.asarray(logits, dtype=np.float64) + rng.gumbel(size=len(items))
    return np.asarray(items)[np.argsort(-keys, kind="stable")[:count]]


def collate_single(items: list[dict]) -> dict:
    """The dataset already yields whole batches."""
    (item,) = items
    return item
