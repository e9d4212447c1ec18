"""A trained re-ranker on disk: ``RUN_DIR/reranker.pt``, which loads with no flags.

``reranker.pt`` holds the model config, its weights, the fusion (``tuned`` with its weight, or
``sum``), the fingerprint of the
cache it was trained on and which data trained and validated it (``splits``), so
``load_reranker(RUN_DIR)`` rebuilds everything, a later stage can refuse a cache from another
encoder, and ``eval`` can say when it is shown the split the run was tuned on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from tvrerank.cache.identity import require_same_cache
from tvrerank.config import from_dict
from tvrerank.errors import CorruptFile, MissingInput
from tvrerank.files import atomic_save, read_torch_file
from tvrerank.rerank.model import Reranker, RerankerConfig
from tvrerank.rerank.variants import build_reranker

MODEL_FILE = "reranker.pt"
#: model options a checkpoint written before they existed was trained with (the earlier design)
LEGACY_MODEL = {"combine": "joint", "token_match": True, "token_match_init": 5.0}


@dataclass(frozen=True)
class TrainedReranker:
    model: Reranker
    fusion_alpha: float | None  # the tuned fusion's weight (None with fusion "sum")
    fingerprint: dict  # the training cache's encoder/sampling/layout fingerprint
    step: int
    train_config: dict
    # {"train": identity of the training cache, "validation": identity of the split that tuned alpha and
    # chose the checkpoint (None: not validated)}; an identity is {"cache", "video_ids_sha256", "videos"}
    splits: dict
    run_dir: str = ""
    fusion: str = "tuned"  # how stage-1 and re-ranker scores combine (rerank.ranking.fused_scores)

    def require_cache(self, cache) -> None:
        """Refuse an open cache from another encoder, sampling or token layout than the training cache's."""
        require_same_cache(cache, f"re-ranker {self.run_dir}", fingerprint=self.fingerprint,
                           remedy="extract that cache with the encoder and settings the re-ranker was trained on, "
                                  "or train a re-ranker on it")


def save_reranker(run_dir: str | Path, model: Reranker, *, fusion_alpha: float | None, fingerprint: dict, step: int,
                  train_config: dict, splits: dict | None = None, fusion: str = "tuned") -> Path:
    path = Path(run_dir) / MODEL_FILE
    atomic_save({
        "model_config": dataclasses.asdict(model.config),
        "state_dict": model.state_dict(),
        "fusion": fusion,
        "fusion_alpha": None if fusion_alpha is None else float(fusion_alpha),
        "fingerprint": fingerprint,
        "step": step,
        "train_config": train_config,
        "splits": splits or {},
    }, path)
    return path


def load_reranker(run_dir: str | Path, device: str | torch.device = "cpu") -> TrainedReranker:
    """Rebuild the trained re-ranker from ``RUN_DIR/reranker.pt`` (no other input needed)."""
    path = Path(run_dir) / MODEL_FILE
    if not path.is_file():
        raise MissingInput(f"{run_dir}: no {MODEL_FILE}; train one with `tvrerank train ... --out {run_dir}`")
    saved = read_torch_file(path, map_location=device,
                            remedy=f"train it again with `tvrerank train ... --out {run_dir}` (or use another run)")
    if not isinstance(saved, dict) or not {"model_config", "state_dict"} <= set(saved):
        raise CorruptFile(f"{path}: not a tvrerank re-ranker checkpoint; train one with `tvrerank train`")
    model = build_reranker(from_dict(RerankerConfig, {**LEGACY_MODEL, **saved["model_config"]}))
    model.load_state_dict(saved["state_dict"])
    model.to(device).eval()
    return TrainedReranker(model=model, fusion_alpha=saved["fusion_alpha"], fingerprint=saved["fingerprint"],
                           step=saved["step"], train_config=saved["train_config"], splits=saved.get("splits", {}),
                           run_dir=str(run_dir), fusion=saved.get("fusion", "tuned"))
