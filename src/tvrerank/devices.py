"""Which torch device a command runs on (one resolver for extraction, training and serving)."""

from __future__ import annotations

import os

import torch

from tvrerank.errors import InputError


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
        name = f"cuda:{local_rank}"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise InputError(f"--device {name!r}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        remedy = "check the driver (nvidia-smi)" if torch.version.cuda else "install a CUDA build of torch"
        raise InputError(f"--device {name}: torch sees no GPU here (torch {torch.__version__}); use --device cpu, "
                         f"or {remedy}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise InputError(f"--device {name}: there are {torch.cuda.device_count()} GPU(s), numbered from 0")
    return device
