"""``tvrerank train``: the re-ranker's training loop, from the cache and candidate lists alone.

AdamW with warmup + cosine (``lr_at``, a pure function of the step), AMP (bf16) on GPU,
gradient accumulation, checkpoints every N steps and at the end, ``--resume`` after a kill,
validation (stage 1 vs re-ranked, fusion weight tuned) each epoch when a validation split is
given — ``reranker.pt`` is then the best validated model — and DistributedDataParallel under
``torchrun``. RUN_DIR gets ``reranker.pt``,
``checkpoint.pt``, ``config.json``, ``metrics.json`` and ``log.csv``.
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

from tvrerank.cache.reader import CacheReader
from tvrerank.config import from_dict, to_dict
from tvrerank.index.candidates import read_candidates
from tvrerank.train.checkpoint import device_for, load_state, save_reranker, save_state
from tvrerank.train.data import BatchSpec, TrainingBatches, collate_single
from tvrerank.train.evaluate import check_cache_matches, compare_stages, load_lists
from tvrerank.train.model import Reranker, RerankerConfig

log = logging.getLogger(__name__)


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
    checkpoint_every: int = 500
    eval_every: int = 0  # steps between validations; 0: once per epoch of the training captions
    fusion_alpha: float = 0.3  # used when no validation split tunes it
    seed: int = 0
    workers: int = 0  # DataLoader worker processes
    device: str = "auto"
    memory_budget_gb: float = 2.0
    model: dict = field(default_factory=dict)  # RerankerConfig overrides: width, layers, heads, ...


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at the last step."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = min(1.0, (step - config.warmup) / max(1, config.steps - config.warmup))
    low = config.lr * config.min_lr_ratio
    return low + 0.5 * (config.lr - low) * (1 + math.cos(math.pi * progress))


def load_train_config(path: str | Path | None, **overrides) -> TrainConfig:
    """A TrainConfig from a JSON file (optional) with command-line overrides on top."""
    data = json.loads(Path(path).read_text()) if path else {}
    unknown = set(data) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise ValueError(f"{path}: unknown training options {sorted(unknown)}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return from_dict(TrainConfig, data)


def model_config_for(cache: CacheReader, overrides: dict) -> RerankerConfig:
    layout = cache.header.layout
    known = {f.name for f in dataclasses.fields(RerankerConfig)}
    if unknown := set(overrides) - known:
        raise ValueError(f"unknown model options {sorted(unknown)}")
    return RerankerConfig(frames=cache.header.sampling.frames, tokens_per_frame=layout.tokens_per_frame,
                          token_dim=layout.token_dim, embed_dim=layout.embed_dim,
                          text_token_dim=layout.text_token_dim, text_tokens=layout.text_tokens, **overrides)


def pair_loss(scores: torch.Tensor, kind: str) -> torch.Tensor:
    """scores (B, G), positive in column 0 → listwise cross-entropy and/or binary matching loss."""
    losses = []
    if kind in ("listwise", "both"):
        losses.append(F.cross_entropy(scores, torch.zeros(len(scores), dtype=torch.long, device=scores.device)))
    if kind in ("binary", "both"):
        labels = torch.zeros_like(scores)
        labels[:, 0] = 1
        weights = torch.ones_like(scores)
        weights[:, 0] = scores.shape[1] - 1  # balance the one positive against the negatives
        losses.append(F.binary_cross_entropy_with_logits(scores, labels, weight=weights / weights.mean()))
    if not losses:
        raise ValueError(f"loss must be listwise, binary or both, got {kind!r}")
    return sum(losses)


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    return int(os.environ.get("RANK", 0)), world


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
    from tqdm.auto import tqdm

    rank, world = _distributed()
    device = device_for(config.device, int(os.environ.get("LOCAL_RANK", 0)))
    out = Path(out)
    if (out / "reranker.pt").exists() and not resume and rank == 0:
        raise ValueError(f"{out} already holds a trained re-ranker; pass --resume to continue or another --out")
    out.mkdir(parents=True, exist_ok=True)
    with CacheReader(cache_path) as cache:
        lists = read_candidates(candidates_path, cache)
        fingerprint = cache.header.fingerprint()
        model_config = model_config_for(cache, config.model)
    if val_cache is not None:
        with CacheReader(val_cache) as val:
            check_cache_matches(fingerprint, val, f"validation cache {val_cache}: the training cache")
    torch.manual_seed(config.seed)
    model = Reranker(config=model_config).to(device)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
    start_step, history = 0, []
    state = load_state(out) if resume else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step, history = state["step"], state["history"]
        log.info("resuming %s at step %d", out, start_step)
    elif resume:
        log.warning("%s has no checkpoint to resume from: starting at step 0", out)
    trained = model
    if world > 1:
        trained = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    spec = BatchSpec(captions=config.captions, negatives=config.negatives, in_batch=config.in_batch)
    batches = TrainingBatches(cache_path, lists.video, spec=spec, steps=config.steps * config.grad_accum,
                              seed=config.seed, rank=rank,
                              memory_budget=int(config.memory_budget_gb * 2**30))
    epoch = max(1, len(batches.trainable) // (config.captions * world))
    eval_every = config.eval_every or epoch
    items = torch.utils.data.Subset(batches, range(start_step * config.grad_accum, len(batches)))
    loader = iter(torch.utils.data.DataLoader(items, batch_size=1, collate_fn=collate_single,
                                              num_workers=config.workers, persistent_workers=config.workers > 0))
    validation = load_lists(val_cache, val_candidates) if val_cache is not None and rank == 0 else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    log_path = out / "log.csv"
    new_log = not log_path.exists() or state is None
    with open(log_path, "w" if new_log else "a", newline="") as log_file:
        writer = csv.writer(log_file)
        if new_log:
            writer.writerow(["step", "lr", "loss", "seconds", "val_stage1_R1", "val_reranked_R1"])
        bar = tqdm(range(start_step, config.steps), desc="train", disable=not progress or rank != 0,
                   initial=start_step, total=config.steps)
        started = time.perf_counter()
        best = state.get("best") if state is not None else None
        if state is not None:  # restored last: building the DataLoader above draws from the generator
            torch.set_rng_state(state["torch_rng"])
        for step in bar:
            model.train()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, config)
            total = 0.0
            for _ in range(config.grad_accum):
                batch = {k: v.to(device, non_blocking=True) for k, v in next(loader).items()}
                b, g = batch["pair_video"].shape
                pair_caption = torch.arange(b, device=device).repeat_interleave(g)
                with autocast:
                    scores = trained(batch["text_tokens"], batch["text_length"], batch["tokens"], batch["frame_emb"],
                                     batch["frame_mask"], batch["pair_video"].reshape(-1),
                                     pair_caption).float().view(b, g)
                    loss = pair_loss(scores, config.loss) / config.grad_accum
                loss.backward()
                total += float(loss.detach())
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            history.append(total)
            bar.set_postfix(loss=f"{np.mean(history[-20:]):.3f}")
            done = step + 1
            row = [done, f"{lr_at(step, config):.3e}", f"{total:.4f}", f"{time.perf_counter() - started:.1f}", "", ""]
            if validation is not None and (done % eval_every == 0 or done == config.steps):
                result = compare_stages(model, val_cache, *validation, device=device)
                row[4:] = [f"{result['stage1']['R1']:.2f}", f"{result['reranked']['R1']:.2f}"]
                log.info("step %d: val R@1 stage 1 %.1f -> re-ranked %.1f (alpha %.2f)", done,
                         result["stage1"]["R1"], result["reranked"]["R1"], result["alpha"])
                if best is None or _better(result, best["val"]):  # keep the best validated model
                    best = {"step": done, "val": result}
                    save_reranker(out, model, fusion_alpha=result["alpha"], fingerprint=fingerprint, step=done,
                                  train_config=to_dict(config))
            if rank == 0:
                writer.writerow(row)
                if done % config.checkpoint_every == 0 or done == config.steps:
                    log_file.flush()
                    save_state(out, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                     "torch_rng": torch.get_rng_state(), "step": done, "history": history,
                                     "best": best})
    return _finish(model, out, config, fingerprint, best, history, rank, world)


def _better(result: dict, than: dict) -> bool:
    """Higher re-ranked R@1, then R@5, then lower mean rank."""
    key = lambda r: (r["reranked"]["R1"], r["reranked"]["R5"], -r["reranked"]["MnR"])  # noqa: E731
    return key(result) > key(than)


def _finish(model, out, config, fingerprint, best, history, rank, world) -> dict:
    """reranker.pt (the best validated model, else the last), config.json, metrics.json (rank 0)."""
    metrics = {"steps": config.steps, "final_loss": float(np.mean(history[-20:])) if history else None}
    alpha = config.fusion_alpha
    if best is not None:
        metrics.update(val=best["val"], best_step=best["step"])
        alpha = best["val"]["alpha"]
    if rank == 0:
        if best is None:
            save_reranker(out, model, fusion_alpha=alpha, fingerprint=fingerprint, step=config.steps,
                          train_config=to_dict(config))
        (out / "config.json").write_text(json.dumps({"train": to_dict(config),
                                                     "model": dataclasses.asdict(model.config),
                                                     "fusion_alpha": alpha}, indent=2, sort_keys=True) + "\n")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return metrics
