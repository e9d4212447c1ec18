"""The run folder: ``reranker.pt`` (loads with no flags), ``checkpoint.pt`` (to resume), ``config.json``.

``reranker.pt`` holds the model config, its weights, the fusion weight and the fingerprint of the
cache it was trained on, so ``load_reranker(RUN_DIR)`` rebuilds everything and a later stage can
refuse a cache from another encoder.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from tvrerank.config import from_dict
from tvrerank.train.model import Reranker, RerankerConfig

MODEL_FILE, STATE_FILE = "reranker.pt", "checkpoint.pt"


@dataclass(frozen=True)
class TrainedReranker:
    model: Reranker
    fusion_alpha: float
    fingerprint: dict  # the training cache's encoder/sampling/layout fingerprint
    step: int
    train_config: dict


def device_for(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` → this process's GPU when there is one (LOCAL_RANK under torchrun), else the CPU."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_reranker(run_dir: str | Path, model: Reranker, *, fusion_alpha: float, fingerprint: dict, step: int,
                  train_config: dict) -> Path:
    path = Path(run_dir) / MODEL_FILE
    _atomic_save({
        "model_config": dataclasses.asdict(model.config),
        "state_dict": model.state_dict(),
        "fusion_alpha": float(fusion_alpha),
        "fingerprint": fingerprint,
        "step": step,
        "train_config": train_config,
    }, path)
    return path


def load_reranker(run_dir: str | Path, device: str | torch.device = "cpu") -> TrainedReranker:
    """Rebuild the trained re-ranker from ``RUN_DIR/reranker.pt`` (no other input needed)."""
    path = Path(run_dir) / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {MODEL_FILE}; train one with `tvrerank train ... --out {run_dir}`")
    saved = torch.load(path, map_location=device, weights_only=True)
    model = Reranker(config=from_dict(RerankerConfig, saved["model_config"]))
    model.load_state_dict(saved["state_dict"])
    model.to(device).eval()
    return TrainedReranker(model=model, fusion_alpha=saved["fusion_alpha"], fingerprint=saved["fingerprint"],
                           step=saved["step"], train_config=saved["train_config"])


def save_state(run_dir: str | Path, state: dict) -> None:
    _atomic_save(state, Path(run_dir) / STATE_FILE)


def load_state(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / STATE_FILE
    return torch.load(path, map_location="cpu", weights_only=False) if path.is_file() else None
