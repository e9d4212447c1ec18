"""Resolving ``--model`` / ``--pretrained`` into an open_clip model, and describing it without weights.

``--model`` is an open_clip model name, the name of a config shipped with this package
(``model_configs/``), or a path to an open_clip model-config JSON (registered at run time
under the file's stem). ``--pretrained`` is an open_clip tag, a tag of weights shipped with
this package, a local checkpoint file, ``local-dir:DIR`` (open_clip's folder layout), or
nothing (random weights, with a loud warning).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import pickle
import tempfile
from pathlib import Path
from typing import Any

from tvrerank.errors import TvrerankError, reason_of

log = logging.getLogger(__name__)

PACKAGE_CONFIGS = Path(__file__).parent / "model_configs"
PACKAGE_WEIGHTS = Path(__file__).parent / "weights"
#: (model name, tag) → weights file shipped inside the package.
SHIPPED_WEIGHTS: dict[tuple[str, str], Path] = {
    ("tvr-toy", "toy"): PACKAGE_WEIGHTS / "tvr-toy.safetensors",
    # pretrained with the detail world's glyph in frames but never in captions (tvrerank.toy.pretrain)
    ("tvr-toy", "toy-detail"): PACKAGE_WEIGHTS / "tvr-toy-detail.safetensors",
}
LOCAL_DIR = "local-dir:"
RANDOM_WEIGHTS_SEED = 0


class ModelError(TvrerankError, ValueError):
    """A model or weights that cannot be resolved; the message says what to pass instead."""


def _open_clip():
    import open_clip

    if PACKAGE_CONFIGS.is_dir() and PACKAGE_CONFIGS not in getattr(_open_clip, "_registered", set()):
        open_clip.add_model_config(PACKAGE_CONFIGS)
        _open_clip._registered = {PACKAGE_CONFIGS}  # type: ignore[attr-defined]
    return open_clip


def register_model_config(name: str, model_config: dict[str, Any]) -> None:
    """Make ``name`` known to open_clip with this config (for configs stored inside artifacts)."""
    open_clip = _open_clip()
    if open_clip.get_model_config(name) == model_config:
        return
    folder = Path(tempfile.mkdtemp(prefix="tvrerank-model-"))
    (folder / f"{name}.json").write_text(json.dumps(model_config))
    open_clip.add_model_config(folder)


def resolve_model_config(model: str, pretrained: str | None = None) -> tuple[str, dict[str, Any]]:
    """(name, open_clip model config) for ``--model``; registers JSON configs with open_clip."""
    open_clip = _open_clip()
    if pretrained and pretrained.startswith(LOCAL_DIR):
        config_path = Path(pretrained[len(LOCAL_DIR):]) / "open_clip_config.json"
        if not config_path.is_file():
            raise ModelError(f"--pretrained {pretrained}: no open_clip_config.json in that folder")
        config = json.loads(config_path.read_text())
        config = config.get("model_cfg", config)
        register_model_config(model, config)  # so the tokenizer finds the context length
        return model, config
    path = Path(model)
    if model.endswith(".json") or path.is_file():
        if not path.is_file():
            raise ModelError(f"--model {model}: no such model-config file")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ModelError(f"--model {model}: not valid JSON ({exc})") from exc
        config = config.get("model_cfg", config)
        missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in config]
        if missing:
            raise ModelError(f"--model {model}: an open_clip model config needs {missing}")
        register_model_config(path.stem, config)
        return path.stem, config
    config = open_clip.get_model_config(model)
    if config is None:
        raise ModelError(
            f"--model {model}: unknown open_clip model. Pass a model name "
            f"(`python -c 'import open_clip; print(open_clip.list_models())'`) "
            f"or a path to a model-config JSON."
        )
    return model, config


def sha256_file(path: str | Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


HF_EXTRA = "pip install 'tvrerank[hf]'"


@contextlib.contextmanager
def hugging_face_parts(name: str):
    """Turn open_clip's "install transformers" failures (text towers and tokenizers from Hugging Face:
    RoBERTa, mT5, NLLB, SigLIP's tokenizers) into one line saying what to install."""
    try:
        yield
    except (RuntimeError, ImportError) as exc:
        missing = getattr(exc, "name", None) or ""
        if "transformers" not in str(exc) and missing not in ("transformers", "sentencepiece", "tokenizers"):
            raise
        raise ModelError(f"{name}: its text tower or tokenizer comes from Hugging Face; install it with "
                         f"`{HF_EXTRA}` (the transformers package), then run the same command again") from None


def create_clip(model: str, pretrained: str | None, *, precision: str = "fp32", device: str = "cpu"):
    """Build the open_clip model with weights. Returns (model, name, model_config, pretrained_sha256)."""
    open_clip = _open_clip()
    name, config = resolve_model_config(model, pretrained)
    with hugging_face_parts(name):
        return _create_clip(open_clip, name, config, pretrained, precision=precision, device=device)


def _create_clip(open_clip, name: str, config: dict, pretrained: str | None, *, precision: str, device: str):
    sha = None
    if pretrained is None:
        log.warning(
            "!!! no --pretrained given: %s has RANDOM weights (seed %d). The cache is only good for "
            "tests. !!!", name, RANDOM_WEIGHTS_SEED,
        )
        import torch

        # Seeded, so that every process (a resumed run, each torchrun rank) builds the same model.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            clip = open_clip.create_model(name, pretrained=None, precision=precision, device=device)
    elif pretrained.startswith(LOCAL_DIR):
        clip = open_clip.create_model(pretrained, precision=precision, device=device)
    else:
        shipped = SHIPPED_WEIGHTS.get((name, pretrained))
        weights = str(shipped) if shipped is not None else pretrained
        if shipped is not None and not shipped.is_file():
            raise ModelError(f"--pretrained {pretrained}: the shipped weights {shipped} are missing")
        if Path(weights).is_file():
            sha = sha256_file(weights)
        elif "/" in weights and not weights.startswith("hf-hub:") \
                and weights not in open_clip.list_pretrained_tags_by_model(name):
            # a path that is not there: say so before open_clip logs its own error line
            raise ModelError(f"--pretrained {pretrained}: no such file; pass the path of {name}'s checkpoint "
                             f"(.pt/.bin/.safetensors), an open_clip tag, or local-dir:FOLDER")
        try:
            clip = open_clip.create_model(name, pretrained=weights, precision=precision, device=device)
        except (RuntimeError, EOFError, KeyError, ValueError, pickle.UnpicklingError) as exc:
            if Path(weights).is_file():
                raise ModelError(f"--pretrained {pretrained}: not a checkpoint of {name}'s weights "
                                 f"({reason_of(exc)}); pass the model's .pt/.bin/.safetensors file or an open_clip "
                                 "tag") from None
            raise ModelError(
                f"--pretrained {pretrained} for {name}: {exc}. Without network access, download the "
                f"checkpoint elsewhere and pass its file path (or local-dir:FOLDER)."
            ) from exc
    clip.eval()
    for parameter in clip.parameters():
        parameter.requires_grad_(False)
    return clip, name, config, sha


def preprocess_config(clip) -> dict[str, Any]:
    """image_size, mean, std, interpolation, resize mode and fill open_clip attached to the model's image tower."""
    cfg = getattr(clip.visual, "preprocess_cfg", {}) or {}
    size = cfg.get("size", getattr(clip.visual, "image_size", 224))
    size = size[0] if isinstance(size, (tuple, list)) else size
    return {
        "image_size": int(size),
        "mean": tuple(float(v) for v in cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))),
        "std": tuple(float(v) for v in cfg.get("std", (0.26862954, 0.26130258, 0.27577711))),
        "interpolation": str(cfg.get("interpolation", "bicubic")),
        "resize_mode": str(cfg.get("resize_mode", "shortest")),
        "fill_color": int(cfg.get("fill_color", 0)),
    }


def build_meta_model(model: str):
    """The open_clip model on the ``meta`` device: shapes without memory or weights (for ``plan``)."""
    import torch

    open_clip = _open_clip()
    name, _ = resolve_model_config(model)
    with torch.device("meta"), hugging_face_parts(name):
        return open_clip.create_model(name, pretrained=None, device="meta")
