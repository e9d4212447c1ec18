"""``tvrerank firststage train``: fit ``FirstStage`` on a cache's frame and caption embeddings.

Never touches the frozen encoder: the cache's ``videos/frame_emb`` and ``texts/emb`` are all it
reads (held in memory: 10k videos x 12 frames x 512 float32 is 250 MB). Each step draws
``batch`` distinct ok videos and one caption of each (from the seed and the step alone, so a
resumed run draws what an uninterrupted one would), and minimises the symmetric InfoNCE loss of
the in-batch pairs. Under torchrun every rank takes its share of the step's videos and
DistributedDataParallel averages the gradients. The schedule, optimizer, held-out split, DDP
set-up, ``log.csv`` and checkpoints are the shared ones of ``tvrerank.training``.

The validation split (``--val-fraction``: held-out videos of the training cache, by the rule every
trainer uses, so a re-ranker with the same seed and fraction holds out the same videos; or
``--val-cache``) picks the kept weights by ``metrics.selection_key``; with none, the last step is
kept. Run folder: ``firststage.pt`` (the kept weights, the model config, the cache's fingerprint,
the splits it was trained and validated on), ``checkpoint.pt`` (to resume), ``config.json``,
``metrics.json``, ``log.csv``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tvrerank.cache.identity import require_same_cache, split_identity
from tvrerank.cache.reader import CacheReader
from tvrerank.config import check_fields, check_model_options, load_options, to_dict
from tvrerank.errors import InputError
from tvrerank.files import write_text_atomic
from tvrerank.firststage.model import FirstStage, FirstStageConfig
from tvrerank.firststage.store import MODEL_FILE, save_first_stage
from tvrerank.metrics import retrieval_metrics, selection_key, text_to_video_ranks
from tvrerank.training import (OptimConfig, RunLog, build_optimizer, close_distributed, deterministic_on,
                               held_out_videos, init_distributed, is_due, load_checkpoint, lr_at, nest_optim_options,
                               refuse_finished, resolve_optim, restore_rng, save_checkpoint, set_lr)

log = logging.getLogger(__name__)

#: the first stage's optimisation defaults (``FirstStageTrainConfig.optim``)
FIRST_STAGE_OPTIM = OptimConfig(steps=600, lr=5e-4, min_lr_ratio=0.1, warmup=30, weight_decay=0.05, grad_clip=0.0)
#: log.csv's columns
LOG_HEADER = ["step", "lr", "loss", "seconds", "val_R1"]


@dataclass(frozen=True)
class FirstStageTrainConfig:
    optim: OptimConfig = FIRST_STAGE_OPTIM  # steps, lr, schedule, weight decay (a dict in JSON)
    batch: int = 128  # videos (and captions) per step: the InfoNCE negatives
    eval_every: int = 100
    checkpoint_every: int = 100
    val_fraction: float = 0.0
    seed: int = 0
    device: str = "auto"
    model: dict = field(default_factory=dict)  # FirstStageConfig overrides: pooling, layers, heads, text, ...

    def __post_init__(self):
        resolve_optim(self, FIRST_STAGE_OPTIM)
        check_fields(self, "first-stage training",
                     integers={"batch": 2, "eval_every": 1, "checkpoint_every": 1, "seed": 0},
                     numbers={"val_fraction": (0.0, 0.9)})
        check_model_options(self.model, FirstStageConfig, owner="first-stage", what="first-stage model",
                            derived=("embed_dim", "frames"))


def load_config(path: str | Path | None, **overrides) -> FirstStageTrainConfig:
    return load_options(FirstStageTrainConfig, path, "first-stage options", normalise=nest_optim_options, **overrides)


@dataclass
class Embeddings:
    """One split's ok videos and their captions, in memory."""

    frame_emb: np.ndarray  # (N, T, E) float32
    frame_mask: np.ndarray  # (N, T) bool
    text_emb: np.ndarray  # (M, E) float32, the captions of these videos
    caption_video: np.ndarray  # (M,) index into the N videos
    rows: np.ndarray  # (N,) the videos' rows in the cache

    @classmethod
    def read(cls, cache_path) -> "Embeddings":
        """The ok videos of a cache and their captions."""
        with CacheReader(cache_path) as cache:
            ok = cache.ok_rows()
            if len(ok) < 2:
                raise InputError(f"{cache_path}: {len(ok)} videos extracted ok; a first stage needs at least 2")
            every = cls(frame_emb=cache["videos/frame_emb"][()], frame_mask=cache["videos/frame_mask"][()],
                        text_emb=cache["texts/emb"][()], caption_video=cache["texts/video"][()],
                        rows=np.arange(cache.num_videos))
        return every.subset(ok)

    def subset(self, videos: np.ndarray) -> "Embeddings":
        """These videos (sorted indices), renumbered 0.., and their captions; embeddings as float32."""
        column = np.full(len(self.frame_emb), -1)
        column[videos] = np.arange(len(videos))
        keep = column[self.caption_video] >= 0
        return Embeddings(self.frame_emb[videos].astype(np.float32), self.frame_mask[videos],
                          self.text_emb[keep].astype(np.float32), column[self.caption_video[keep]], self.rows[videos])

    def captions_of(self) -> list[np.ndarray]:
        """Each video's caption indices, in caption order (one sort, not one scan per video)."""
        order = np.argsort(self.caption_video, kind="stable")
        counts = np.bincount(self.caption_video, minlength=len(self.frame_emb))
        return np.split(order, np.cumsum(counts)[:-1])


def draw_step(data: Embeddings, captions_of: list[np.ndarray], batch: int, seed: int, step: int):
    """(video indices (B,), caption indices (B,)) of one step, from the seed and step alone."""
    rng = np.random.default_rng([seed, step])
    videos = rng.choice(len(data.frame_emb), size=min(batch, len(data.frame_emb)), replace=False)
    captions = np.array([rng.choice(captions_of[v]) for v in videos])
    return videos, captions


@torch.no_grad()
def evaluate(model: FirstStage, data: Embeddings, device: torch.device) -> dict:
    """Text→video R@1/5/10, MdR, MnR over the split's own videos."""
    model.eval()
    video = model.videos(torch.from_numpy(data.frame_emb).to(device), torch.from_numpy(data.frame_mask).to(device))
    text = model.texts(torch.from_numpy(data.text_emb).to(device))
    ranks = text_to_video_ranks((text @ video.T).cpu().numpy(), data.caption_video)
    model.train()
    return retrieval_metrics(ranks)


def train_first_stage(cache_path: str | Path, out: str | Path, config: FirstStageTrainConfig, *,
                      val_cache: str | Path | None = None, resume: bool = False, progress: bool = True) -> dict:
    """Train into ``out``; returns the metrics (also ``out/metrics.json``)."""
    out, cache_path = Path(out), Path(cache_path)
    refuse_finished(out, MODEL_FILE, "first stage", resume)
    if val_cache is not None and config.val_fraction:
        raise InputError("give --val-cache or --val-fraction, not both")
    rank, world, device = init_distributed(config.device)
    with deterministic_on(device):
        return _train(cache_path, out, config, val_cache=val_cache, resume=resume, progress=progress and rank == 0,
                      rank=rank, world=world, device=device)


def split_data(cache_path: Path, config: FirstStageTrainConfig, val_cache) -> tuple[Embeddings, Embeddings | None, dict]:
    """(training videos, validation videos or None, the splits' identities as the run records them)."""
    data = Embeddings.read(cache_path)
    with CacheReader(cache_path) as cache:
        held_out = held_out_videos(config.seed, config.val_fraction, data.rows)  # the rule of every trainer
        splits = {"train": split_identity(cache), "validation": None}
        if config.val_fraction:
            splits["validation"] = split_identity(cache, videos=cache.strings("videos/id")[held_out].tolist())
    validation = None
    if config.val_fraction:
        inside = np.searchsorted(data.rows, held_out)
        validation = data.subset(inside)
        data = data.subset(np.setdiff1d(np.arange(len(data.rows)), inside))
        log.info("validation: %d of %d videos held out of %s", len(held_out), len(data.rows) + len(held_out),
                 cache_path)
    elif val_cache is not None:
        with CacheReader(cache_path) as cache:
            fingerprint = cache.header.fingerprint()
        with CacheReader(val_cache) as other:
            require_same_cache(other, f"training cache {cache_path}", fingerprint=fingerprint,
                               remedy="validate on a cache made with the same encoder, sampling and layout")
            splits["validation"] = split_identity(other)
        validation = Embeddings.read(val_cache)
    captioned = np.bincount(data.caption_video, minlength=len(data.frame_emb)) > 0
    if not captioned.all():  # a video with no caption cannot be a pair of the loss
        data = data.subset(np.flatnonzero(captioned))
    return data, validation, splits


def _train(cache_path: Path, out: Path, config: FirstStageTrainConfig, *, val_cache, resume: bool, progress: bool,
           rank: int, world: int, device: torch.device) -> dict:
    with CacheReader(cache_path) as cache:
        fingerprint, header = cache.header.fingerprint(), cache.header
    data, validation, splits = split_data(cache_path, config, val_cache)
    captions_of = data.captions_of()
    model_config = FirstStageConfig(embed_dim=header.layout.embed_dim, frames=header.sampling.frames, **config.model)
    torch.manual_seed(config.seed)
    model = FirstStage(config=model_config).to(device)
    trained = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer = build_optimizer(model, config.optim)
    state = load_checkpoint(out, model, optimizer, resume=resume)
    start, best, history = (0, None, []) if state is None else (state["step"], state["best"], state["history"])
    restore_rng(state)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "config.json", json.dumps({"train": to_dict(config), "model": to_dict(model_config),
                                                           "cache": str(cache_path), "val_cache": str(val_cache or ""),
                                                           "splits": splits}, indent=2))
    frame_emb, frame_mask = torch.from_numpy(data.frame_emb), torch.from_numpy(data.frame_mask)
    text_emb = torch.from_numpy(data.text_emb)
    steps = tqdm(range(start, config.optim.steps), initial=start, total=config.optim.steps, desc="first stage",
                 disable=not progress)
    run_log = RunLog(out / "log.csv", LOG_HEADER, append=state is not None, enabled=rank == 0)
    started = time.perf_counter()
    model.train()
    try:
        for step in steps:
            videos, captions = draw_step(data, captions_of, config.batch, config.seed, step)
            videos, captions = videos[rank::world], captions[rank::world]
            lr = lr_at(step, config.optim)
            set_lr(optimizer, lr)
            loss = trained(frame_emb[videos].to(device), frame_mask[videos].to(device), text_emb[captions].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss = float(loss.detach())
            steps.set_postfix(loss=f"{loss:.3f}")
            done = step + 1
            row = [done, f"{lr:.3e}", f"{loss:.4f}", f"{time.perf_counter() - started:.1f}", ""]
            if validation is not None and is_due(done, config.eval_every, config.optim.steps):
                metrics = evaluate(model, validation, device)
                history.append({"step": done, **metrics})
                row[4] = f"{metrics['R1']:.2f}"
                if best is None or selection_key(metrics) > selection_key(best):
                    best = {"step": done, **metrics, "state": {k: v.detach().cpu().clone()
                                                              for k, v in model.state_dict().items()}}
            run_log.end_step(row, done=done, every=config.checkpoint_every, steps=config.optim.steps, rank=rank,
                             save=lambda: save_checkpoint(out, model, optimizer, step=done, best=best, history=history))
    finally:
        run_log.close()
    kept = best["state"] if best is not None else model.state_dict()
    model.load_state_dict(kept)
    metrics = {"steps": config.optim.steps, "kept_step": best["step"] if best else config.optim.steps,
               "validation": None if best is None else {k: v for k, v in best.items() if k != "state"},
               "zero_shot_validation": None, "history": history, "splits": splits}
    if validation is not None:  # the same split, untrained: what training bought
        metrics["zero_shot_validation"] = evaluate(FirstStage(config=model_config).to(device), validation, device)
    if rank == 0:
        save_first_stage(out, model, fingerprint=fingerprint, cache=str(cache_path), metrics=metrics)
        write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    close_distributed(world)
    return metrics
