"""``tvrerank train``: the re-ranker's training loop, from the cache and candidate lists alone.

What every trainer shares (the optimisation config, ``lr_at``, AdamW's groups, the held-out split,
DDP set-up, determinism, ``log.csv``, checkpoints and resume) is ``tvrerank.training``; this module
adds the re-ranker's step (AMP (bf16) on GPU, gradient accumulation), its validation and its run files.

Validation (stage 1 vs re-ranked by the ranking rule of ``rerank.ranking``; the fusion weight
tuned) runs each epoch when a validation split is given, and ``reranker.pt`` is then the best
validated model. The split is either held out of the training cache (``val_fraction``: whole
videos, drawn with the seed, never trained on) or a cache of its own (``--val-cache``); never
the split that is reported. Under DDP every rank scores its share of the validation captions
and the scores are gathered, so no rank idles into a collective timeout.

On the CPU a run is deterministic for its seed and config at any thread count: training runs under
``torch.use_deterministic_algorithms`` (the backward of the per-pair gather, an ``index_put`` with
accumulation, otherwise adds in thread order). On a GPU it is not forced (cuBLAS needs an
environment variable set before start, and the cost is real); ``metrics.json`` records which.

Only rank 0 writes RUN_DIR: ``reranker.pt``, ``checkpoint.pt``, ``config.json``,
``metrics.json`` and ``log.csv``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tvrerank.cache.identity import held_out_record, require_same_cache, split_identity
from tvrerank.cache.reader import CacheReader
from tvrerank.cache.rows import IN_MEMORY, on_device
from tvrerank.config import check_fields, check_model_options, load_options, to_dict
from tvrerank.errors import InputError, NonFiniteScores
from tvrerank.evaluation import load_lists, stage_metrics
from tvrerank.files import write_text_atomic
from tvrerank.index.candidates import CandidateLists, read_candidates
from tvrerank.metrics import selection_key
from tvrerank.rerank.checkpoint import MODEL_FILE, save_reranker
from tvrerank.rerank.inference import rerank_scores
from tvrerank.rerank.model import Reranker, RerankerConfig
from tvrerank.rerank.variants import build_reranker
from tvrerank.rerank.ranking import FUSIONS
from tvrerank.train.data import BatchSpec, TrainingBatches, collate_single
from tvrerank.training import (OptimConfig, RunLog, build_optimizer, clip_gradients, close_distributed,
                               deterministic_on, held_out_videos, init_distributed, is_due, load_checkpoint, lr_at,
                               nest_optim_options, refuse_finished, resolve_optim, restore_rng, save_checkpoint,
                               set_lr)

log = logging.getLogger(__name__)

#: log.csv's columns
LOG_HEADER = ["step", "lr", "loss", "seconds", "val_stage1_R1", "val_reranked_R1"]


#: RerankerConfig fields that model_config_for takes from the cache, never from the training config
CACHE_LAYOUT = ("frames", "tokens_per_frame", "token_dim", "embed_dim", "text_token_dim", "text_tokens")


#: the selectors' scorers (parameter-name prefixes), which ``selector_lr_scale`` applies to
SCORERS = ("frame_selector.score", "video_selector.score")
#: the re-ranker's optimisation defaults (``TrainConfig.optim``)
RERANKER_OPTIM = OptimConfig(steps=2000, lr=5e-4, min_lr_ratio=0.1, warmup=100, weight_decay=0.05, grad_clip=1.0)


@dataclass(frozen=True)
class TrainConfig:
    optim: OptimConfig = RERANKER_OPTIM  # steps, lr, schedule, weight decay, clipping (a dict in JSON)
    captions: int = 32  # captions per step (B)
    negatives: int = 7  # hard negatives per caption from its top-K
    in_batch: int = 4  # other captions' videos per caption
    grad_accum: int = 1
    loss: str = "listwise"  # listwise | binary | both
    negative_sampling: str = "uniform"  # uniform | similarity (ALBEF: softmax of the stage-1 similarity)
    negative_captions: int = 0  # negative captions per positive video (other captions of the batch)
    negative_temperature: float = 0.07  # the similarity sampler's softmax temperature
    fusion: str = "tuned"  # tuned (alpha chosen on validation) | sum (stage-1 score + re-ranker score)
    checkpoint_every: int = 500
    eval_every: int = 0  # steps between validations; 0: once per epoch of the training captions
    fusion_alpha: float = 0.3  # used when no validation split tunes it
    val_fraction: float = 0.0  # videos of the training cache held out for validation (0: none)
    seed: int = 0
    workers: int = 0  # DataLoader worker processes
    device: str = "auto"
    memory_budget_gb: float = 0.0  # host memory the cache's arrays may fill (in_memory auto); 0: half the available
    in_memory: str = "auto"  # auto | on | off: gather every step from arrays loaded once (cache.rows.CacheRows)
    model: dict = field(default_factory=dict)  # RerankerConfig overrides: width, layers, heads, ...
    selector_lr_scale: float = 1.0  # the selectors' scorers learn at this times the schedule's rate
    # the frame selector's warm start: for the first selector_warmup share of the steps every frame keeps all
    # its patches (the attention reads them all); selector_distill > 0 adds that weight times the frame
    # scorer's cross-entropy against the frame level's attention over every patch (Reranker.selector_distillation)
    selector_warmup: float = 0.0
    selector_distill: float = 0.0

    def __post_init__(self):
        resolve_optim(self, RERANKER_OPTIM)
        check_fields(
            self, "training",
            integers={"captions": 2, "negatives": 0, "in_batch": 0, "grad_accum": 1,
                      "checkpoint_every": 1, "eval_every": 0, "seed": 0, "workers": 0, "negative_captions": 0},
            numbers={"fusion_alpha": (0.0, 1.0), "val_fraction": (0.0, 0.9), "negative_temperature": (1e-4, 100.0),
                     "memory_budget_gb": (0.0, math.inf), "selector_lr_scale": (1e-3, 1e3),
                     "selector_distill": (0.0, 1e3), "selector_warmup": (0.0, 1.0)},
            choices={"loss": ("listwise", "binary", "both"), "negative_sampling": ("uniform", "similarity"),
                     "fusion": FUSIONS, "in_memory": IN_MEMORY})
        # types and ranges, before anything is read or written
        check_model_options(self.model, RerankerConfig, owner="training", what="model", derived=CACHE_LAYOUT)


def load_train_config(path: str | Path | None, **overrides) -> TrainConfig:
    """A TrainConfig from a JSON file (optional) with command-line overrides on top."""
    return load_options(TrainConfig, path, "training options", normalise=nest_optim_options, **overrides)


def model_config_for(cache: CacheReader, overrides: dict) -> RerankerConfig:
    layout = cache.header.layout  # the overrides were checked with the TrainConfig
    return RerankerConfig(frames=cache.header.sampling.frames, tokens_per_frame=layout.tokens_per_frame,
                          token_dim=layout.token_dim, embed_dim=layout.embed_dim,
                          text_token_dim=layout.text_token_dim, text_tokens=layout.text_tokens, **overrides)


def warmup_steps(config: TrainConfig) -> int:
    """How many of the first steps read every patch (``selector_warmup`` of ``optim.steps``, rounded)."""
    return round(config.selector_warmup * config.optim.steps)


def pair_loss(scores: torch.Tensor, kind: str, text_scores: torch.Tensor | None = None) -> torch.Tensor:
    """scores (B, G): each caption against its videos, the positive in column 0; text_scores (B, Nc) or
    None: each caption's positive video against other captions → listwise cross-entropy (over the
    videos, and over the captions when given) and/or the binary matching loss over every pair."""
    losses = []
    first = torch.zeros(len(scores), dtype=torch.long, device=scores.device)
    if kind in ("listwise", "both"):
        losses.append(F.cross_entropy(scores, first))
        if text_scores is not None:  # video → text: the positive caption against the negative captions
            losses.append(F.cross_entropy(torch.cat([scores[:, :1], text_scores], dim=1), first))
    if kind in ("binary", "both"):
        every = scores if text_scores is None else torch.cat([scores, text_scores], dim=1)  # (B, G [+ Nc])
        labels = torch.zeros_like(every)
        labels[:, 0] = 1
        weights = torch.ones_like(every)
        weights[:, 0] = every.shape[1] - 1  # balance the one positive against the negatives
        losses.append(F.binary_cross_entropy_with_logits(every, labels, weight=weights / weights.mean()))
    if not losses:
        raise InputError(f"loss must be listwise, binary or both, got {kind!r}")
    return sum(losses)


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA, nothing elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def train_step(trained: torch.nn.Module, optimizer: torch.optim.Optimizer, micro_batches, *, config: TrainConfig,
               lr: float, device: torch.device, step: int) -> float:
    """One optimizer step over ``config.grad_accum`` micro-batches (dicts of tensors); returns the loss.

    ``trained`` is the model or its DistributedDataParallel wrapper: gradients are all-reduced on
    the last micro-batch only. A non-finite loss (on any rank) raises NonFiniteScores naming the
    step, before the weights are touched.
    """
    set_lr(optimizer, lr)
    total = torch.zeros((), device=device)
    for i in range(config.grad_accum):
        batch = on_device(next(micro_batches), device, non_blocking=True)
        last = i == config.grad_accum - 1
        skip_sync = trained.no_sync() if hasattr(trained, "no_sync") and not last else contextlib.nullcontext()
        b, g = batch["pair_video"].shape
        pair_video, pair_caption = batch["pair_video"].reshape(-1), torch.arange(b, device=device).repeat_interleave(g)
        negative_text = batch.get("negative_text")  # (B, Nc): caption b's positive video with other captions
        if negative_text is not None:
            nc = negative_text.shape[1]
            pair_video = torch.cat([pair_video, batch["pair_video"][:, 0].repeat_interleave(nc)])
            pair_caption = torch.cat([pair_caption, negative_text.reshape(-1)])
        distill = torch.arange(b, device=device) * g if config.selector_distill else None  # the positive pairs
        with skip_sync:
            with autocast_for(device):
                scores = trained(batch["text_tokens"], batch["text_length"], batch["tokens"], batch["frame_emb"],
                                 batch["frame_mask"], pair_video, pair_caption,
                                 **({} if distill is None else {"distill_pairs": distill}))
                scores, distilled = scores if distill is not None else (scores, 0.0)
                scores = scores.float()
                text_scores = None if negative_text is None else scores[b * g :].view(b, -1)
                loss = (pair_loss(scores[: b * g].view(b, g), config.loss, text_scores)
                        + config.selector_distill * distilled) / config.grad_accum
            loss.backward()
        total += loss.detach()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)  # every rank stops together on a non-finite loss
        total /= torch.distributed.get_world_size()
    total = float(total)
    if not math.isfinite(total):
        raise NonFiniteScores(f"training step {step + 1}: the loss is {total}; the model diverged. The last "
                              f"checkpoint is kept: lower 'lr' in --config and train again")
    clip_gradients(trained, config.optim)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


# --------------------------------------------------------------------------- validation
@dataclass
class Validation:
    """The captions that choose the fusion weight and the kept checkpoint, and their lists."""

    cache: Path
    lists: CandidateLists
    true_video: np.ndarray  # (M,) of the cache
    captions: np.ndarray  # (m,) sorted caption rows of the cache that are validated
    held_out: np.ndarray  # (h,) video rows of the training cache kept out of training
    identity: dict  # split_identity(...), recorded in the run
    reads: dict = field(default_factory=dict)  # CacheRows' memory_budget and in_memory (the training's)


def validation_split(config: TrainConfig, cache_path: Path, lists: CandidateLists, *,
                     val_cache: Path | None, val_candidates: Path | None) -> Validation | None:
    """A validation split held out of the training cache (``val_fraction``), one of its own, or None."""
    if val_cache is not None and config.val_fraction:
        raise InputError("give either --val-fraction or --val-cache/--val-candidates, not both")
    if val_cache is not None:
        val_lists, true_video = load_lists(val_cache, val_candidates)
        with CacheReader(val_cache) as cache:
            identity = split_identity(cache)
        return Validation(Path(val_cache), val_lists, true_video, np.arange(len(true_video)),
                          np.empty(0, np.int64), identity, reads_of(config))
    if not config.val_fraction:
        return None
    with CacheReader(cache_path) as cache:
        ok_rows, true_video = cache.ok_rows(), cache["texts/video"][()]
        held_out = held_out_videos(config.seed, config.val_fraction, ok_rows)  # the rule of every trainer
        identity = split_identity(cache, videos=cache.strings("videos/id")[held_out].tolist())
    captions = np.flatnonzero(np.isin(true_video, held_out))
    log.info("validation: %d of %d videos held out of %s (%d captions)", len(held_out), len(ok_rows), cache_path,
             len(captions))
    return Validation(Path(cache_path), lists, true_video, captions, held_out, identity, reads_of(config))


def reads_of(config: TrainConfig) -> dict:
    """How a run's cache is read (``CacheRows``' options), for training and validation alike."""
    budget = int(config.memory_budget_gb * 2**30) if config.memory_budget_gb > 0 else None
    return {"memory_budget": budget, "in_memory": config.in_memory}


def refuse_leaked_validation(lists: CandidateLists, splits: dict, candidates_path, out: Path) -> None:
    """Refuse candidates of a trained first stage that held out other videos of this cache than this run's
    validation split: that first stage was trained on videos this run validates on, so alpha and the kept
    checkpoint would be tuned on candidates it has seen (a first stage trained on another cache is fine)."""
    ours = held_out_record(splits)
    if lists.first_stage is None or not ours["held_out"]:
        return
    theirs, run = lists.first_stage.get("trained"), lists.first_stage.get("run", "?")
    if theirs is None:
        log.warning("candidates %s come from the first stage %s, whose record predates held-out splits: it cannot "
                    "be checked that it was not trained on this run's validation videos", candidates_path, run)
        return
    if theirs["train_video_ids_sha256"] == ours["train_video_ids_sha256"] and \
            theirs["held_out_sha256"] != ours["held_out_sha256"]:
        raise InputError(
            f"candidates {candidates_path} come from the first stage {run}, which held out {theirs['held_out']} "
            f"videos of this cache, not the {ours['held_out']} that this run ({out}) validates on, so it was trained "
            "on validation videos; train the first stage with the same --val-fraction and seed (both hold out by "
            "one rule), or validate on a --val-cache")


def validate(model: Reranker, validation: Validation, *, device: torch.device, rank: int, world: int,
             fusion: str = "tuned", soft_selection: bool = False) -> dict:
    """``stage_metrics`` on the validation captions; each rank scores a share, then all ranks gather.

    ``soft_selection``: with the training-time (perturbed) token selection, to measure its gap to
    the hard top-k used at inference.
    """
    mine = validation.captions[rank::world]
    scores = rerank_scores(model, validation.cache, validation.lists.video, device=device, captions=mine,
                           soft_selection=soft_selection, **validation.reads)
    if world > 1:
        shares = [None] * world
        torch.distributed.all_gather_object(shares, (mine, scores[mine]))
        for rows, block in shares:
            scores[rows] = block
    return stage_metrics(validation.lists, validation.true_video, scores, fusion=fusion,
                         captions=validation.captions)


# --------------------------------------------------------------------------- the loop
def train(
    cache_path: str | Path,
    candidates_path: str | Path,
    out: str | Path,
    config: TrainConfig,
    *,
    val_cache: str | Path | None = None,
    val_candidates: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict:
    """Train a re-ranker into ``out``; returns the final metrics (also in ``out/metrics.json``)."""
    out, cache_path = Path(out), Path(cache_path)
    refuse_finished(out, MODEL_FILE, "re-ranker", resume)  # every rank refuses, before any collective
    rank, world, device = init_distributed(config.device)
    with deterministic_on(device):
        return _train(cache_path, candidates_path, out, config, rank=rank, world=world, device=device,
                      val_cache=val_cache, val_candidates=val_candidates, resume=resume, progress=progress)


def _train(cache_path: Path, candidates_path, out: Path, config: TrainConfig, *, rank: int, world: int,
           device: torch.device, val_cache, val_candidates, resume: bool, progress: bool) -> dict:
    from tqdm.auto import tqdm

    with CacheReader(cache_path) as cache:
        lists = read_candidates(candidates_path, cache)
        fingerprint = cache.header.fingerprint()
        model_config = model_config_for(cache, config.model)
        train_identity = split_identity(cache)
    if val_cache is not None:
        with CacheReader(val_cache) as val:
            require_same_cache(val, f"training cache {cache_path}", fingerprint=fingerprint,
                               remedy="validate on a cache extracted with the same settings")
    validation = validation_split(config, cache_path, lists, val_cache=val_cache, val_candidates=val_candidates)
    splits = {"train": train_identity, "validation": validation.identity if validation else None}
    refuse_leaked_validation(lists, splits, candidates_path, out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(config.seed)
    model = build_reranker(model_config).to(device)
    optimizer = build_optimizer(model, config.optim, lr_scales=dict.fromkeys(SCORERS, config.selector_lr_scale))
    state = load_checkpoint(out, model, optimizer, resume=resume)
    start_step, history, best = (0, [], None) if state is None else (state["step"], state["history"], state.get("best"))
    trained = model if world == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)

    spec = BatchSpec(captions=config.captions, negatives=config.negatives, in_batch=config.in_batch,
                     negative_captions=config.negative_captions, sampling=config.negative_sampling,
                     temperature=config.negative_temperature)
    batches = TrainingBatches(cache_path, lists.video, spec=spec, steps=config.optim.steps, seed=config.seed, rank=rank,
                              world=world, grad_accum=config.grad_accum,
                              **reads_of(config), device=device, held_out=validation.held_out if validation else None, candidate_score=lists.score)
    eval_every = config.eval_every or max(1, len(batches.trainable) // (config.captions * world))
    items = torch.utils.data.Subset(batches, range(start_step * config.grad_accum, len(batches)))
    workers = 0 if batches.rows.on_device else config.workers  # batches gathered on the GPU need no workers
    if workers != config.workers:
        log.info("the cache is held on %s: batches are gathered there, without DataLoader workers", device)
    loader = iter(torch.utils.data.DataLoader(items, batch_size=1, collate_fn=collate_single,
                                              num_workers=workers, persistent_workers=workers > 0,
                                              pin_memory=device.type == "cuda" and not batches.rows.on_device))
    restore_rng(state)  # restored last: building the DataLoader above draws from the generator
    run_log = RunLog(out / "log.csv", LOG_HEADER, append=state is not None, enabled=rank == 0)
    started, final_val = time.perf_counter(), None  # the validation of the last step
    try:
        bar = tqdm(range(start_step, config.optim.steps), desc="train", disable=not progress or rank != 0,
                   initial=start_step, total=config.optim.steps)
        for step in bar:
            model.train()
            model.frame_selector.reads_all = step < warmup_steps(config)
            lr = lr_at(step, config.optim)
            loss = train_step(trained, optimizer, loader, config=config, lr=lr, device=device, step=step)
            history.append(loss)
            bar.set_postfix(loss=f"{np.mean(history[-20:]):.3f}")
            done = step + 1
            row = [done, f"{lr:.3e}", f"{loss:.4f}", f"{time.perf_counter() - started:.1f}", "", ""]
            model.frame_selector.reads_all = False  # validated (and saved) as it will be used
            if validation is not None and is_due(done, eval_every, config.optim.steps):
                result = final_val = validate(model, validation, device=device, rank=rank, world=world,
                                         fusion=config.fusion)
                row[4:] = [f"{result['stage1']['R1']:.2f}", f"{result['reranked']['R1']:.2f}"]
                log.info("step %d: val R@1 stage 1 %.1f -> re-ranked %.1f (fusion %s, alpha %s)", done,
                         result["stage1"]["R1"], result["reranked"]["R1"], config.fusion, result["alpha"])
                if best is None or selection_key(result["reranked"]) > selection_key(best["val"]["reranked"]):
                    best = {"step": done, "val": result}  # the best validated model is kept
                    if rank == 0:
                        save_reranker(out, model, fusion_alpha=result["alpha"], fingerprint=fingerprint, step=done,
                                      train_config=to_dict(config), splits=splits, fusion=config.fusion)
            run_log.end_step(row, done=done, every=config.checkpoint_every, steps=config.optim.steps, rank=rank,
                             save=lambda: save_checkpoint(out, model, optimizer, step=done, history=history, best=best))
    finally:
        run_log.close()
    gap = None if validation is None else selection_gap(model, validation, final_val, device=device, rank=rank,
                                                        world=world, fusion=config.fusion)
    return _finish(model, out, config, fingerprint, splits, best, history, rank, world, gap)


def selection_gap(model: Reranker, validation: Validation, final_val: dict | None, **how) -> dict:
    """Validation R@1 of the last model with hard (inference) vs soft (training) token selection;
    ``final_val``: that model's (hard) validation when the loop already ran it (None: run it here)."""
    hard = (final_val or validate(model, validation, **how))["reranked"]["R1"]
    soft = validate(model, validation, soft_selection=True, **how)["reranked"]["R1"]
    log.info("selection gap on validation: R@1 hard %.2f, soft %.2f", hard, soft)
    return {"hard_R1": hard, "soft_R1": soft, "hard_minus_soft": hard - soft}


def _finish(model, out, config, fingerprint, splits, best, history, rank, world, gap) -> dict:
    """reranker.pt (the best validated model, else the last), config.json, metrics.json (rank 0)."""
    metrics = {"steps": config.optim.steps, "final_loss": float(np.mean(history[-20:])) if history else None,
               "splits": splits, "fusion": config.fusion, "deterministic": torch.are_deterministic_algorithms_enabled()}
    alpha = config.fusion_alpha if config.fusion == "tuned" else None
    if best is not None:
        metrics.update(val=best["val"], best_step=best["step"], selection_gap=gap)
        alpha = best["val"]["alpha"]
    if rank == 0:
        if best is None:
            save_reranker(out, model, fusion_alpha=alpha, fingerprint=fingerprint, step=config.optim.steps,
                          train_config=to_dict(config), splits=splits, fusion=config.fusion)
        write_text_atomic(out / "config.json", json.dumps({"train": to_dict(config),
                                                     "model": dataclasses.asdict(model.config),
                                                     "fusion": config.fusion, "fusion_alpha": alpha,
                                                     "splits": splits},
                                                    indent=2, sort_keys=True) + "\n")
        write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    close_distributed(world)
    return metrics
