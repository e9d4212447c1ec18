"""What every trainer shares: the optimisation config, the schedule, the optimizer, the held-out split,
distributed set-up, determinism, the run log and checkpoints.

Three trainers use it: the re-ranker (``train/loop.py``), the trained first stage
(``firststage/train.py``) and the toy encoder's pretraining (``toy/pretrain.py``). It is a leaf like
``metrics.py``: any stage may import it, and it imports nothing of a stage.

- ``OptimConfig``: steps, learning rate, warmup, cosine floor, weight decay, gradient clipping; embedded
  as ``optim`` in each trainer's config, with that trainer's defaults (``resolve_optim``).
- ``lr_at(step, optim)``: linear warmup, then cosine decay to ``lr * min_lr_ratio`` (a pure function).
- ``build_optimizer``: AdamW; weight decay on weight matrices only (not on biases, norms, scalars or
  embedding tables), as open_clip and nanoGPT do.
- ``held_out_videos(seed, fraction, ok_rows)``: the one rule that holds videos out for validation, so
  two trainers given the same seed and fraction on one cache hold out the same videos.
- ``init_distributed`` (rank, world size, device; the process group under torchrun) and
  ``deterministic_on`` (deterministic algorithms while training on the CPU).
- ``RunLog``: ``RUN_DIR/log.csv``, one row per step, written by rank 0 only.
- ``save_checkpoint`` / ``load_checkpoint``: ``RUN_DIR/checkpoint.pt`` written atomically, with the
  optimizer and the torch RNG, so a killed run resumes bit-identical to an uninterrupted one.

The model-selection key (which of two validations is better) is ``metrics.selection_key``.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tvrerank.config import check_fields
from tvrerank.errors import InputError

log = logging.getLogger(__name__)

STATE_FILE = "checkpoint.pt"


@dataclass(frozen=True)
class OptimConfig:
    steps: int = 2000
    lr: float = 5e-4
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio at the last step
    warmup: int = 100  # steps of linear warmup
    weight_decay: float = 0.05  # AdamW's, on weight matrices only
    grad_clip: float = 0.0  # the gradients' global norm is clipped to this (0: not clipped)

    def __post_init__(self):
        check_fields(self, "optimisation", integers={"steps": 1, "warmup": 0},
                     numbers={"lr": (0.0, math.inf), "min_lr_ratio": (0.0, 1.0), "weight_decay": (0.0, math.inf),
                              "grad_clip": (0.0, math.inf)})


OPTIM_FIELDS = tuple(f.name for f in dataclasses.fields(OptimConfig))


def resolve_optim(config, defaults: OptimConfig) -> None:
    """In a trainer config's ``__post_init__``: an ``optim`` given as a dict (from JSON) becomes an
    OptimConfig over ``defaults`` (the trainer's), each field checked."""
    optim = config.optim
    if isinstance(optim, dict):
        if unknown := set(optim) - set(OPTIM_FIELDS):
            raise InputError(f"unknown optimisation options {sorted(unknown)} (known: {list(OPTIM_FIELDS)})")
        optim = dataclasses.replace(defaults, **optim)
    if not isinstance(optim, OptimConfig):
        raise InputError(f"option 'optim' must be an object of optimisation options, got {optim!r}")
    object.__setattr__(config, "optim", optim)


def nest_optim_options(options: dict) -> dict:
    """Options as a trainer's JSON gives them, with flat optimisation keys (``"steps": 600``, the format
    before ``optim`` existed, and the command line's ``--steps``) moved under ``"optim"``."""
    flat = {k: options[k] for k in OPTIM_FIELDS if k in options}
    if not flat:
        return options
    nested = options.get("optim", {})
    if not isinstance(nested, dict):
        raise InputError(f"option 'optim' must be an object of optimisation options, got {nested!r}")
    rest = {k: v for k, v in options.items() if k not in OPTIM_FIELDS}
    return {**rest, "optim": {**nested, **flat}}


# --------------------------------------------------------------------------- schedule and optimizer
def lr_at(step: int, optim: OptimConfig) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at the last step."""
    if step < optim.warmup:
        return optim.lr * (step + 1) / optim.warmup
    progress = min(1.0, (step - optim.warmup) / max(1, optim.steps - optim.warmup))
    low = optim.lr * optim.min_lr_ratio
    return low + 0.5 * (optim.lr - low) * (1 + math.cos(math.pi * progress))


def decayed_parameters(model) -> set[str]:
    """The names of the parameters weight decay applies to: weight matrices, not biases, norms, scalars or
    embedding tables (``nn.Embedding`` modules, and parameters named ``*embedding*`` as open_clip's
    positional and class embeddings are)."""
    import torch

    tables = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    return {n for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n and id(p) not in tables}


def build_optimizer(model, optim: OptimConfig, lr_scales: dict[str, float] | None = None):
    """AdamW over the model's trainable parameters (in their order), weight decay on ``decayed_parameters``;
    ``lr_scales`` {name prefix: factor}: the parameters under a prefix learn at ``factor`` times the schedule's
    rate (their own groups, with ``lr_scale``, which ``set_lr`` applies)."""
    import torch

    scales = {prefix: factor for prefix, factor in (lr_scales or {}).items() if factor != 1.0}

    def scale_of(name: str) -> float:
        return next((factor for prefix, factor in scales.items() if name.startswith(prefix + ".")), 1.0)

    decayed, named = decayed_parameters(model), [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = []
    for factor in (1.0, *sorted(set(scales.values()))):
        mine = [(n, p) for n, p in named if scale_of(n) == factor]
        groups += [{"params": [p for n, p in mine if n in decayed], "weight_decay": optim.weight_decay, "lr_scale": factor},
                   {"params": [p for n, p in mine if n not in decayed], "weight_decay": 0.0, "lr_scale": factor}]
    return torch.optim.AdamW([group for group in groups if group["params"] or group["lr_scale"] == 1.0], lr=optim.lr)


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def clip_gradients(model, optim: OptimConfig) -> None:
    import torch

    if optim.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)


# --------------------------------------------------------------------------- the held-out split
def held_out_videos(seed: int, fraction: float, ok_rows: np.ndarray) -> np.ndarray:
    """The videos held out for validation: ``round(fraction * len(ok_rows))`` (at least 1) of the ok
    cache rows ``ok_rows`` (sorted), drawn from the seed alone → sorted rows. Every trainer holds out by
    this rule, so the same seed and fraction on one cache hold out the same videos."""
    if not fraction:
        return np.zeros(0, dtype=np.int64)
    ok_rows = np.asarray(ok_rows, dtype=np.int64)
    count = max(1, round(fraction * len(ok_rows)))
    if count >= len(ok_rows):
        raise InputError(f"--val-fraction {fraction} holds out {count} of {len(ok_rows)} videos, leaving none "
                         "to train on; lower it")
    return np.sort(np.random.default_rng([seed, 0x5A1]).choice(ok_rows, count, replace=False))


# --------------------------------------------------------------------------- processes
def init_distributed(device_name: str):
    """(rank, world size, this rank's device); joins the process group under torchrun."""
    import torch

    from tvrerank.devices import resolve_device

    world = int(os.environ.get("WORLD_SIZE", 1))
    device = resolve_device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before NCCL: each rank on its own GPU
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return int(os.environ.get("RANK", 0)), world, device


def close_distributed(world: int) -> None:
    """Every rank waits for the others, then leaves the process group (no-op alone)."""
    import torch

    if world > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def deterministic_on(device):
    """Deterministic algorithms while training on the CPU (restored afterwards)."""
    import torch

    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(device.type == "cpu" or before)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def is_due(done: int, every: int, steps: int) -> bool:
    """Whether a validation or checkpoint that comes every ``every`` steps is due after ``done`` of ``steps``
    steps (always after the last)."""
    return done % every == 0 or done == steps


def refuse_finished(out: Path, model_file: str, what: str, resume: bool) -> None:
    """A run folder that already holds a trained model is only continued with --resume."""
    if (Path(out) / model_file).exists() and not resume:
        raise InputError(f"{out} already holds a trained {what}; pass --resume to continue or another --out")


# --------------------------------------------------------------------------- run files
class RunLog:
    """``RUN_DIR/log.csv``: one row per step under ``header``. Only rank 0 opens the file (``enabled``);
    ``append`` continues the file of a resumed run."""

    def __init__(self, path: Path, header: list[str], *, append: bool, enabled: bool):
        self.file = None
        if enabled:
            append = append and path.exists()
            self.file = open(path, "a" if append else "w", newline="")
            self.writer = csv.writer(self.file)
            if not append:
                self.writer.writerow(header)

    def row(self, values: list) -> None:
        if self.file is not None:
            self.writer.writerow(values)

    def flush(self) -> None:
        if self.file is not None:
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()

    def end_step(self, row: list, *, done: int, every: int, steps: int, rank: int, save) -> None:
        """Log the step's ``row``; at a checkpoint step (``is_due``) rank 0 flushes the log, then calls
        ``save()``: a checkpoint never lags the rows before it."""
        self.row(row)
        if rank == 0 and is_due(done, every, steps):
            self.flush()
            save()


def save_checkpoint(out: Path, model, optimizer, *, step: int, **extra) -> None:
    """``out/checkpoint.pt``, atomically: the weights, the optimizer, the torch RNG, the step and ``extra``."""
    import torch

    from tvrerank.files import atomic_save

    atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "torch_rng": torch.get_rng_state(), "step": step, **extra}, Path(out) / STATE_FILE)


def load_checkpoint(out: Path, model, optimizer, *, resume: bool) -> dict | None:
    """With ``resume``: the weights and optimizer of ``out/checkpoint.pt`` restored into ``model`` and
    ``optimizer``; returns the checkpoint (its ``step`` and the trainer's extras), None without one. The
    torch RNG is the caller's to restore (``restore_rng``), after anything that draws from it at start."""
    from tvrerank.files import read_torch_file

    path = Path(out) / STATE_FILE
    if not resume:
        return None
    if not path.is_file():
        log.warning("%s has no checkpoint to resume from: starting at step 0", out)
        return None
    state = read_torch_file(path, weights_only=False,
                            remedy=f"delete it to train {out} from the start (or from its last good copy)")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    log.info("resuming %s at step %d", out, state["step"])
    return state


def restore_rng(state: dict | None) -> None:
    """The torch RNG as a checkpoint recorded it (checkpoints written before it was recorded: unchanged)."""
    import torch

    if state is not None and "torch_rng" in state:
        torch.set_rng_state(state["torch_rng"])
