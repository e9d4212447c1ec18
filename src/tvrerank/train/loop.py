"""``tvrerank train``: the re-ranker's training loop, from the cache and candidate lists alone.

AdamW with warmup + cosine (``lr_at``, a pure function of the step), AMP (bf16) on GPU,
gradient accumulation, checkpoints every N steps and at the end, ``--resume`` after a kill,
and DistributedDataParallel under ``torchrun``.

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
import csv
import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tvrerank.cache.identity import require_same_cache, split_identity
from tvrerank.cache.reader import CacheReader
from tvrerank.config import check_fields, check_model_options, load_options, to_dict
from tvrerank.devices import resolve_device
from tvrerank.errors import InputError, NonFiniteScores
from tvrerank.evaluation import load_lists, stage_metrics
from tvrerank.files import write_text_atomic
from tvrerank.index.candidates import CandidateLists, read_candidates
from tvrerank.files import atomic_save, read_torch_file
from tvrerank.rerank.checkpoint import MODEL_FILE, save_reranker
from tvrerank.rerank.inference import rerank_scores
from tvrerank.rerank.model import Reranker, RerankerConfig
from tvrerank.rerank.ranking import FUSIONS, selection_key
from tvrerank.train.data import BatchSpec, TrainingBatches, collate_single

log = logging.getLogger(__name__)

STATE_FILE = "checkpoint.pt"


#: RerankerConfig fields that model_config_for takes from the cache, never from the training config
CACHE_LAYOUT = ("frames", "tokens_per_frame", "token_dim", "embed_dim", "text_token_dim", "text_tokens")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 2000
    captions: int = 32  # captions per step (B)
    negatives: int = 7  # hard negatives per caption from its top-K
    in_batch: int = 4  # other captions' videos per caption
    lr: float = 5e-4
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.05
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
    memory_budget_gb: float = 2.0
    model: dict = field(default_factory=dict)  # RerankerConfig overrides: width, layers, heads, ...

    def __post_init__(self):
        check_fields(
            self, "training",
            integers={"steps": 1, "captions": 2, "negatives": 0, "in_batch": 0, "warmup": 0, "grad_accum": 1,
                      "checkpoint_every": 1, "eval_every": 0, "seed": 0, "workers": 0, "negative_captions": 0},
            numbers={"lr": (0.0, math.inf), "min_lr_ratio": (0.0, 1.0), "weight_decay": (0.0, math.inf),
                     "fusion_alpha": (0.0, 1.0), "val_fraction": (0.0, 0.9), "negative_temperature": (1e-4, 100.0),
                     "memory_budget_gb": (0.0, math.inf)},
            choices={"loss": ("listwise", "binary", "both"), "negative_sampling": ("uniform", "similarity"),
                     "fusion": FUSIONS})
        # types and ranges, before anything is read or written
        check_model_options(self.model, RerankerConfig, owner="training", what="model", derived=CACHE_LAYOUT)


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at the last step."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = min(1.0, (step - config.warmup) / max(1, config.steps - config.warmup))
    low = config.lr * config.min_lr_ratio
    return low + 0.5 * (config.lr - low) * (1 + math.cos(math.pi * progress))


def load_train_config(path: str | Path | None, **overrides) -> TrainConfig:
    """A TrainConfig from a JSON file (optional) with command-line overrides on top."""
    return load_options(TrainConfig, path, "training options", **overrides)


def model_config_for(cache: CacheReader, overrides: dict) -> RerankerConfig:
    layout = cache.header.layout  # the overrides were checked with the TrainConfig
    return RerankerConfig(frames=cache.header.sampling.frames, tokens_per_frame=layout.tokens_per_frame,
                          token_dim=layout.token_dim, embed_dim=layout.embed_dim,
                          text_token_dim=layout.text_token_dim, text_tokens=layout.text_tokens, **overrides)


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


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on biases, norms, queries or scalars)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)


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
    for group in optimizer.param_groups:
        group["lr"] = lr
    total = torch.zeros((), device=device)
    for i in range(config.grad_accum):
        batch = {k: v.to(device, non_blocking=True) for k, v in next(micro_batches).items()}
        last = i == config.grad_accum - 1
        skip_sync = trained.no_sync() if hasattr(trained, "no_sync") and not last else contextlib.nullcontext()
        b, g = batch["pair_video"].shape
        pair_video, pair_caption = batch["pair_video"].reshape(-1), torch.arange(b, device=device).repeat_interleave(g)
        negative_text = batch.get("negative_text")  # (B, Nc): caption b's positive video with other captions
        if negative_text is not None:
            nc = negative_text.shape[1]
            pair_video = torch.cat([pair_video, batch["pair_video"][:, 0].repeat_interleave(nc)])
            pair_caption = torch.cat([pair_caption, negative_text.reshape(-1)])
        with skip_sync:
            with autocast_for(device):
                scores = trained(batch["text_tokens"], batch["text_length"], batch["tokens"], batch["frame_emb"],
                                 batch["frame_mask"], pair_video, pair_caption).float()
                text_scores = None if negative_text is None else scores[b * g :].view(b, -1)
                loss = pair_loss(scores[: b * g].view(b, g), config.loss, text_scores) / config.grad_accum
            loss.backward()
        total += loss.detach()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)  # every rank stops together on a non-finite loss
        total /= torch.distributed.get_world_size()
    total = float(total)
    if not math.isfinite(total):
        raise NonFiniteScores(f"training step {step + 1}: the loss is {total}; the model diverged. The last "
                              f"checkpoint is kept: lower 'lr' in --config and train again")
    torch.nn.utils.clip_grad_norm_(trained.parameters(), 1.0)
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
                          np.empty(0, np.int64), identity)
    if not config.val_fraction:
        return None
    with CacheReader(cache_path) as cache:
        ok_rows, true_video = cache.ok_rows(), cache["texts/video"][()]
        rng = np.random.default_rng([config.seed, 0x5A1])  # the split depends on the seed alone
        count = max(1, round(config.val_fraction * len(ok_rows)))
        held_out = np.sort(rng.choice(ok_rows, count, replace=False))
        identity = split_identity(cache, videos=cache.strings("videos/id")[held_out].tolist())
    captions = np.flatnonzero(np.isin(true_video, held_out))
    log.info("validation: %d of %d videos held out of %s (%d captions)", count, len(ok_rows), cache_path,
             len(captions))
    return Validation(Path(cache_path), lists, true_video, captions, held_out, identity)


def validate(model: Reranker, validation: Validation, *, device: torch.device, rank: int, world: int,
             fusion: str = "tuned", soft_selection: bool = False) -> dict:
    """``stage_metrics`` on the validation captions; each rank scores a share, then all ranks gather.

    ``soft_selection``: with the training-time (perturbed) token selection, to measure its gap to
    the hard top-k used at inference.
    """
    mine = validation.captions[rank::world]
    scores = rerank_scores(model, validation.cache, validation.lists.video, device=device, captions=mine,
                           soft_selection=soft_selection)
    if world > 1:
        shares = [None] * world
        torch.distributed.all_gather_object(shares, (mine, scores[mine]))
        for rows, block in shares:
            scores[rows] = block
    return stage_metrics(validation.lists, validation.true_video, scores, fusion=fusion,
                         captions=validation.captions)


# --------------------------------------------------------------------------- run files
class RunLog:
    """``RUN_DIR/log.csv``: one row per step. Only rank 0 opens the file; other ranks write nothing."""

    HEADER = ["step", "lr", "loss", "seconds", "val_stage1_R1", "val_reranked_R1"]

    def __init__(self, path: Path, *, append: bool, enabled: bool):
        self.file = None
        if enabled:
            append = append and path.exists()
            self.file = open(path, "a" if append else "w", newline="")
            self.writer = csv.writer(self.file)
            if not append:
                self.writer.writerow(self.HEADER)

    def row(self, values: list) -> None:
        if self.file is not None:
            self.writer.writerow(values)

    def flush(self) -> None:
        if self.file is not None:
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, this rank's device); joins the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    device = resolve_device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before NCCL: each rank on its own GPU
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return int(os.environ.get("RANK", 0)), world, device


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
    if (out / MODEL_FILE).exists() and not resume:  # every rank refuses, before any collective
        raise InputError(f"{out} already holds a trained re-ranker; pass --resume to continue or another --out")
    rank, world, device = _distributed(config.device)
    with deterministic_on(device):
        return _train(cache_path, candidates_path, out, config, rank=rank, world=world, device=device,
                      val_cache=val_cache, val_candidates=val_candidates, resume=resume, progress=progress)


@contextlib.contextmanager
def deterministic_on(device: torch.device):
    """Deterministic algorithms while training on the CPU (restored afterwards)."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(device.type == "cpu" or before)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


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
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(config.seed)
    model = Reranker(config=model_config).to(device)
    optimizer = build_optimizer(model, config)
    state = read_torch_file(out / STATE_FILE, weights_only=False,
                            remedy=f"delete it to train {out} from the start (or from its last good copy)") \
        if resume and (out / STATE_FILE).is_file() else None
    start_step, history, best = 0, [], None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step, history, best = state["step"], state["history"], state.get("best")
        log.info("resuming %s at step %d", out, start_step)
    elif resume:
        log.warning("%s has no checkpoint to resume from: starting at step 0", out)
    trained = model if world == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)

    spec = BatchSpec(captions=config.captions, negatives=config.negatives, in_batch=config.in_batch,
                     negative_captions=config.negative_captions, sampling=config.negative_sampling,
                     temperature=config.negative_temperature)
    batches = TrainingBatches(cache_path, lists.video, spec=spec, steps=config.steps, seed=config.seed, rank=rank,
                              world=world, grad_accum=config.grad_accum,
                              memory_budget=int(config.memory_budget_gb * 2**30),
                              held_out=validation.held_out if validation else None, candidate_score=lists.score)
    eval_every = config.eval_every or max(1, len(batches.trainable) // (config.captions * world))
    items = torch.utils.data.Subset(batches, range(start_step * config.grad_accum, len(batches)))
    loader = iter(torch.utils.data.DataLoader(items, batch_size=1, collate_fn=collate_single,
                                              num_workers=config.workers, persistent_workers=config.workers > 0,
                                              pin_memory=device.type == "cuda"))
    if state is not None:  # restored last: building the DataLoader above draws from the generator
        torch.set_rng_state(state["torch_rng"])
    run_log = RunLog(out / "log.csv", append=state is not None, enabled=rank == 0)
    started, final_val = time.perf_counter(), None  # the validation of the last step
    try:
        bar = tqdm(range(start_step, config.steps), desc="train", disable=not progress or rank != 0,
                   initial=start_step, total=config.steps)
        for step in bar:
            model.train()
            loss = train_step(trained, optimizer, loader, config=config, lr=lr_at(step, config), device=device,
                              step=step)
            history.append(loss)
            bar.set_postfix(loss=f"{np.mean(history[-20:]):.3f}")
            done = step + 1
            row = [done, f"{lr_at(step, config):.3e}", f"{loss:.4f}", f"{time.perf_counter() - started:.1f}", "", ""]
            if validation is not None and (done % eval_every == 0 or done == config.steps):
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
            run_log.row(row)
            if rank == 0 and (done % config.checkpoint_every == 0 or done == config.steps):
                run_log.flush()
                atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "torch_rng": torch.get_rng_state(), "step": done, "history": history, "best": best},
                            out / STATE_FILE)
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
    metrics = {"steps": config.steps, "final_loss": float(np.mean(history[-20:])) if history else None,
               "splits": splits, "fusion": config.fusion, "deterministic": torch.are_deterministic_algorithms_enabled()}
    alpha = config.fusion_alpha if config.fusion == "tuned" else None
    if best is not None:
        metrics.update(val=best["val"], best_step=best["step"], selection_gap=gap)
        alpha = best["val"]["alpha"]
    if rank == 0:
        if best is None:
            save_reranker(out, model, fusion_alpha=alpha, fingerprint=fingerprint, step=config.steps,
                          train_config=to_dict(config), splits=splits, fusion=config.fusion)
        write_text_atomic(out / "config.json", json.dumps({"train": to_dict(config),
                                                     "model": dataclasses.asdict(model.config),
                                                     "fusion": config.fusion, "fusion_alpha": alpha,
                                                     "splits": splits},
                                                    indent=2, sort_keys=True) + "\n")
        write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return metrics
