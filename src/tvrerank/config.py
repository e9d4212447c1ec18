"""The cache header's frozen configs (encoder, sampling, token layout, an extraction run) and what every
config uses: JSON load/save, field checks, options files with command-line overrides. The trainers' and
the models' configs live beside their code (``train/loop.py``, ``firststage/``, ``rerank/model.py``,
``training.OptimConfig``).

Every artifact stores the resolved config it was made with (HDF5 root attributes or a
``config.json`` next to it), so a later stage can check that its inputs are compatible and
a user can always tell how a file was made.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (nested) config dataclass; tuples become lists."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build ``cls`` from a dict, ignoring unknown keys and turning lists back into tuples.

    Unknown keys are ignored so that files written by a newer minor version still load.
    """
    known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs = {}
    for name, value in data.items():
        if name not in known:
            continue
        if isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def check_fields(config: Any, what: str, *, integers: dict[str, int] | None = None,
                 numbers: dict[str, tuple[float, float]] | None = None, flags: tuple[str, ...] = (),
                 choices: dict[str, tuple[str, ...]] | None = None) -> None:
    """Refuse a field of ``config`` of the wrong type or out of range with InputError naming it
    ("{what} option 'x' must be ..."): ``integers`` {name: least value}, ``numbers`` {name: (low,
    high)} inclusive, ``flags`` booleans, ``choices`` {name: allowed strings}."""
    from tvrerank.errors import InputError

    for name, low in (integers or {}).items():
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise InputError(f"{what} option {name!r} must be an integer >= {low}, got {value!r}")
    for name, (low, high) in (numbers or {}).items():
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise InputError(f"{what} option {name!r} must be a number in [{low}, {high}], got {value!r}")
    for name in flags:
        if not isinstance(getattr(config, name), bool):
            raise InputError(f"{what} option {name!r} must be true or false, got {getattr(config, name)!r}")
    for name, allowed in (choices or {}).items():
        if getattr(config, name) not in allowed:
            raise InputError(f"{what} option {name!r} must be one of {', '.join(allowed)}, "
                             f"got {getattr(config, name)!r}")


def save_json(config: Any, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_dict(config), indent=2, sort_keys=True) + "\n")


def load_json(cls: type[T], path: str | Path) -> T:
    return from_dict(cls, json.loads(Path(path).read_text()))


@dataclass(frozen=True)
class EncoderConfig:
    """The frozen open_clip encoder that made a cache.

    ``model_config`` is the full open_clip model config (the JSON open_clip would read), so a
    later stage can rebuild the same text encoder even for architectures registered at run time.
    """

    model: str
    model_config: dict = field(default_factory=dict, compare=True)
    pretrained: str | None = None
    pretrained_sha256: str | None = None
    image_size: int = 224
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    interpolation: str = "bicubic"
    precision: str = "fp32"
    resize_mode: str = "shortest"  # open_clip's eval resize: shortest (crop), squash, longest (pad)
    fill_color: int = 0  # the padding of resize_mode "longest"

    def identity(self) -> dict[str, Any]:
        """What must match between two artifacts for their embeddings to be comparable."""
        return {
            "model": self.model,
            "model_config": self.model_config,
            "pretrained_sha256": self.pretrained_sha256 or self.pretrained,
            "image_size": self.image_size,
        }


@dataclass(frozen=True)
class SamplingConfig:
    """How frames are sampled from a video.

    ``uniform``: ``frames`` timestamps at the centres of equal segments of the video's
    duration; each takes the frame on screen at that time (largest pts <= t). Videos with
    fewer distinct frames are padded and masked.

    ``resize``: how a frame became the encoder's input (``extract.preprocess.RESIZE_METHODS``);
    ``extract`` writes ``torchvision``. The default is what caches written before the field
    existed used, so they (and what was made from them) read as what they are.
    """

    frames: int = 12
    strategy: str = "uniform"
    resize: str = "libswscale"


@dataclass(frozen=True)
class TokenLayout:
    """What the cached token arrays hold, resolved against the encoder.

    space: ``joint`` (patch tokens through the visual projection, E-dim) or ``raw`` (tower width).
    pool: ``none`` or ``2x2`` (average pooling of the patch grid, partial windows at odd edges).
    token_dtype: how patch and caption tokens are stored (``cache.encoding``): ``float16``, ``int8`` or
    ``float8``; caches made before the field existed are float16.
    """

    space: str = "joint"
    pool: str = "none"
    token_dtype: str = "float16"
    text_tokens: int = 32
    grid: tuple[int, int] = (0, 0)
    tokens_per_frame: int = 0
    token_dim: int = 0
    text_token_dim: int = 0
    embed_dim: int = 0


@dataclass(frozen=True)
class ExtractConfig:
    """A resolved ``tvrerank extract`` run (what the runner needs beyond the encoder)."""

    annotations: tuple[str, ...]
    format: str | None
    videos: str
    out: str
    model: str
    pretrained: str | None = None
    frames: int = 12
    token_space: str = "joint"
    token_pool: str = "none"
    token_dtype: str = "float16"  # TokenLayout.token_dtype
    text_tokens: int = 32
    batch_size: int = 64
    workers: int = 2
    device: str = "auto"
    precision: str = "fp32"
    shard_index: int = 0
    shard_count: int = 1
    part_videos: int = 0  # 0: chosen from the batch size and token size
    overwrite: bool = False
    resize: str = "torchvision"  # SamplingConfig.resize; "libswscale" continues caches made before it


def check_model_options(options: Any, cls: type, *, owner: str, what: str, derived: tuple[str, ...] = ()) -> None:
    """Refuse a trainer's ``model`` field unless it is an object of ``cls``'s fields (less the ``derived``
    ones, which come from the cache) with valid values: "{owner} option 'model' must be an object of
    {what} options" or "unknown {what} options [...]"; ``cls(**options)`` checks the values."""
    from tvrerank.errors import InputError

    if not isinstance(options, dict):
        raise InputError(f"{owner} option 'model' must be an object of {what} options, got {options!r}")
    if given := set(options) & set(derived):
        raise InputError(f"{what} options {sorted(given)} come from the cache (its layout and sampling); "
                         "remove them from the config")
    known = {f.name for f in dataclasses.fields(cls)} - set(derived)
    if unknown := set(options) - known:
        raise InputError(f"unknown {what} options {sorted(unknown)} (known: {sorted(known)})")
    cls(**options)


def load_options(cls: type[T], path: str | Path | None, what: str, *, normalise=None, **overrides) -> T:
    """A frozen config ``cls`` from a JSON file of options (optional), with command-line overrides
    (None: not given) on top; every error names the file and says what is wrong. ``normalise``: a
    function of the options dict applied before they are checked (e.g. ``training.nest_optim_options``)."""
    from tvrerank.errors import InputError

    where = path or "the command line"
    try:
        data = json.loads(Path(path).read_text()) if path else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a readable JSON file of {what} ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object of {what}, got {type(data).__name__}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    if normalise is not None:
        try:
            data = normalise(data)
        except InputError as exc:
            raise InputError(f"{where}: {exc}") from None
    if unknown := set(data) - {f.name for f in dataclasses.fields(cls)}:
        raise InputError(f"{where}: unknown {what} {sorted(unknown)}")
    try:
        return from_dict(cls, data)
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None
