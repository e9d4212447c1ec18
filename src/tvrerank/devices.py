"""Which torch device a command runs on (one resolver for extraction, training and serving)."""

from __future__ import annotations

import os

import torch


def resolve_device(name: str = "auto", local_rank: int | None = None) -> torch.device:
    """``auto`` → this process's GPU when there is one, else the CPU; any other name as torch reads it.

    Under ``torchrun`` (``LOCAL_RANK`` set, or ``local_rank`` given) ``auto`` and a bare ``cuda``
    mean this rank's GPU, ``cuda:LOCAL_RANK``.
    """
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device(f"cuda:{local_rank}")
    return torch.device(name)
