"""The frozen open_clip encoder: frames → (pooled embedding, patch tokens), captions → (embedding, token features).

Patch tokens come from ``forward_intermediates`` (last block, final norm applied), so any
image tower open_clip wraps (its own ViT, timm towers such as EVA) works. In the ``joint``
token space the tokens also go through the tower's projection into the E-dim space the text
lives in; ``raw`` keeps the tower width. Text token features follow the same choice.

No I/O here: arrays in, arrays out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from tvrerank.cache.encoding import pool_grid
from tvrerank.config import EncoderConfig, TokenLayout
from tvrerank.devices import resolve_device
from tvrerank.errors import InputError
from tvrerank.extract.models import create_clip, hugging_face_parts, preprocess_config

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pad_token_id(tokenizer) -> int:
    """The id a tokenizer pads with: open_clip's BPE tokenizer pads with 0; its Hugging Face and
    SigLIP tokenizers with their own ``pad_token_id`` (1 for SigLIP's T5-style vocabulary)."""
    pad = getattr(getattr(tokenizer, "tokenizer", None), "pad_token_id", None)
    return 0 if pad is None else int(pad)


def image_projection_of(visual):
    """The image tower's per-token projection into the joint space: open_clip's ``proj`` matrix, a
    timm tower's ``head``, or (PE-Core and other towers whose head sits inside the trunk) the trunk's
    ``head``; None when there is none (e.g. ResNets' attention pooling)."""
    for owner, name in ((visual, "proj"), (visual, "head"), (getattr(visual, "trunk", None), "head")):
        candidate = getattr(owner, name, None) if owner is not None else None
        if candidate is None or isinstance(candidate, torch.nn.Identity) or (
                isinstance(candidate, torch.nn.Sequential) and len(candidate) == 0):
            continue  # an empty head projects nothing: look further in
        return candidate
    return None


def _linear_projection(projection) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A per-token projection from a parameter matrix or a module; None if there is none."""
    if projection is None:
        return None
    if isinstance(projection, torch.Tensor):
        return lambda x: x @ projection.to(x.dtype)
    return projection


def _torch_float(dtype) -> torch.dtype:
    """The torch dtype outputs are made in on the device for a requested numpy ``dtype``: float16 stays
    float16 (half the bytes to the host), anything else is float32."""
    return torch.float16 if dtype == np.float16 else torch.float32


@dataclass(frozen=True)
class TextLayout:
    """What ``encode_texts`` gives per caption: token features (text_tokens, text_token_dim), an embedding
    of embed_dim; the text side of ``TokenLayout``."""

    text_tokens: int
    text_token_dim: int
    embed_dim: int

    @classmethod
    def of(cls, layout: TokenLayout) -> "TextLayout":
        return cls(layout.text_tokens, layout.text_token_dim, layout.embed_dim)


def device_clock(device: torch.device) -> torch.cuda.Event | None:
    """A timing event recorded now on ``device``'s current stream (it fires when the work queued before
    it is done); None off CUDA. Give it to ``PendingArrays(started=)`` to time the work queued after it."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event(enable_timing=True)
    event.record(torch.cuda.current_stream(device))
    return event


class PendingArrays:
    """Device tensors on their way to the host: the copy is queued at once (into pinned memory on a
    GPU, so it does not hold up the caller); ``result()`` waits for it and gives numpy arrays.

    ``started``: a ``device_clock`` event recorded before the work that made the tensors was queued;
    ``device_seconds()`` then says how long the device spent on that work and the copy.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], *, started: torch.cuda.Event | None = None):
        cuda = tensors[0].device.type == "cuda"
        self._host = []
        for tensor in tensors:
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=cuda)
            host.copy_(tensor, non_blocking=cuda)
            self._host.append(host)
        self._started, self._done = started, None
        if cuda:
            self._done = torch.cuda.Event(enable_timing=started is not None)
            self._done.record(torch.cuda.current_stream(tensors[0].device))

    def result(self) -> tuple[np.ndarray, ...]:
        if self._done is not None:
            self._done.synchronize()
        return tuple(host.numpy() for host in self._host)

    def device_seconds(self) -> float | None:
        """Seconds between the ``started`` event and the copy's end on the device (work queued behind
        other work is timed from when the device reached it); None off CUDA or without ``started``."""
        if self._started is None or self._done is None:
            return None
        self._done.synchronize()
        return self._started.elapsed_time(self._done) / 1000.0


class FrozenClipEncoder:
    """Wraps a frozen open_clip model; outputs are CPU arrays, float32 unless a caller asks for float16
    (extraction, made on the device)."""

    def __init__(
        self,
        *,
        model: str,
        pretrained: str | None,
        token_space: str = "joint",
        token_pool: str = "none",
        text_tokens: int = 32,
        precision: str = "fp32",
        device: str = "auto",
        text_only: bool = False,
    ):
        """``text_only``: drop the image tower once its preprocessing settings are read (retrieval
        encodes captions only: ViT-bigG-14's image tower is ~1.8 B of its ~2.5 B parameters); ``layout``
        is then None and ``text_layout`` says what the captions give."""
        if token_space not in ("joint", "raw"):
            raise InputError(f"token space must be joint or raw, got {token_space!r}")
        self.device = resolve_device(device)
        if precision == "fp16" and self.device.type == "cpu":
            log.warning("fp16 is slow or unsupported on CPU; consider --precision bf16 or fp32")
        self.dtype = DTYPES[precision]
        self.clip, name, model_config, sha = create_clip(  # a text-only model reaches the device without its image tower
            model, pretrained, precision=precision, device="cpu" if text_only else str(self.device)
        )
        import open_clip

        with hugging_face_parts(name):
            self.tokenizer = open_clip.get_tokenizer(name)
        self.token_space, self.token_pool, self.text_tokens = token_space, token_pool, text_tokens
        self.config = EncoderConfig(
            model=name,
            model_config=model_config,
            pretrained=pretrained,
            pretrained_sha256=sha,
            precision=precision,
            **preprocess_config(self.clip),
        )
        mean = torch.tensor(self.config.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.config.std, device=self.device).view(1, 3, 1, 1)
        self._scale, self._shift = 1.0 / (255.0 * std), mean / std
        self._text_projection = self._find_text_projection()
        if text_only:
            self.clip.visual = None  # its settings are in self.config
            self.clip.to(self.device)
            self._image_projection, self.layout = None, None
            emb, tokens, _ = self.encode_texts(["probe"])
            self.text_layout = TextLayout(self.text_tokens, text_token_dim=tokens.shape[-1], embed_dim=emb.shape[-1])
        else:
            self._image_projection = self._find_image_projection()
            self.layout = self._probe_layout()
            self.text_layout = TextLayout.of(self.layout)

    # --------------------------------------------------------------------------- set-up
    def _find_image_projection(self):
        if self.token_space == "raw":
            return None
        projection = _linear_projection(image_projection_of(self.clip.visual))
        if projection is None:
            raise InputError(
                f"{self.config.model}: its image tower has no per-token projection into the joint "
                "space; use --token-space raw"
            )
        return projection

    def _find_text_projection(self):
        if self.token_space == "raw":
            return None
        for owner in (self.clip, getattr(self.clip, "text", None)):
            projection = getattr(owner, "text_projection", None) if owner is not None else None
            if projection is not None:
                return _linear_projection(projection)
        raise InputError(
            f"{self.config.model}: its text tower has no per-token projection; use --token-space raw"
        )

    def _probe_layout(self) -> TokenLayout:
        size = self.config.image_size
        frames = np.zeros((1, size, size, 3), dtype=np.uint8)
        with torch.no_grad():
            frame_emb, tokens, grid = self.frames_on_device(frames)
        text_emb, text_tokens, _ = self.encode_texts(["probe"])
        try:
            tokens_pooled = tokens.shape[1]
            if self.token_space == "joint" and tokens.shape[-1] != frame_emb.shape[-1]:
                raise ValueError("projection output does not match the embedding width")
        except (IndexError, ValueError) as exc:
            raise InputError(f"{self.config.model}: cannot project patch tokens ({exc}); "
                             "use --token-space raw") from exc
        return TokenLayout(
            space=self.token_space,
            pool=self.token_pool,
            text_tokens=self.text_tokens,
            grid=grid,
            tokens_per_frame=tokens_pooled,
            token_dim=tokens.shape[-1],
            text_token_dim=text_tokens.shape[-1],
            embed_dim=frame_emb.shape[-1],
        )

    # --------------------------------------------------------------------------- frames
    def staged(self, host: torch.Tensor) -> torch.Tensor:
        """A CPU tensor ready to go to the device without waiting for the work queued there: pinned on a
        GPU (a copy from pageable memory would first wait for the queued batches), else itself."""
        if self.device.type != "cuda" or host.is_pinned():
            return host
        return host.pin_memory()

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        """A CPU tensor on the device without waiting for the work queued there (``staged``)."""
        return self.staged(host).to(self.device, non_blocking=self.device.type == "cuda")

    def preprocess(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(N, S, S, 3) uint8 RGB (an array or a CPU tensor) → (N, 3, S, S) normalised, on the device, in
        the model dtype."""
        host = frames if isinstance(frames, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(frames))
        x = self.to_device(host)
        x = x.permute(0, 3, 1, 2).float()
        return (x * self._scale - self._shift).to(self.dtype)

    @torch.no_grad()
    def frames_on_device(self, frames: np.ndarray | torch.Tensor, dtype=torch.float32):
        """(N, S, S, 3) uint8 → frame_emb (N, E) L2-normalised, tokens (N, P, D) as ``dtype``, and the
        token grid (H', W'), the tensors still on the device (its work may still be queued)."""
        if self.clip.visual is None:
            raise InputError(f"{self.config.model}: this encoder was built for captions only (text_only)")
        out = self.clip.visual.forward_intermediates(
            self.preprocess(frames),
            indices=1,
            normalize_intermediates=True,
            output_fmt="NCHW",
        )
        grid_tokens = pool_grid(out["image_intermediates"][-1].float(), self.token_pool)  # (N, C, H, W)
        grid = tuple(grid_tokens.shape[-2:])
        tokens = grid_tokens.flatten(2).transpose(1, 2)  # (N, P, C)
        if self._image_projection is not None:
            tokens = self._image_projection(tokens.to(self.dtype)).float()  # (N, P, E)
        frame_emb = F.normalize(out["image_features"].float(), dim=-1)  # (N, E)
        return frame_emb.to(dtype), tokens.to(dtype), grid

    def submit_frames(self, frames: np.ndarray, *, dtype=np.float32) -> "PendingArrays":
        """Queue ``encode_frames`` on the device and return at once; ``.result()`` gives its arrays.

        On a GPU the copy to the host is queued too (into pinned memory), so the caller can prepare
        the next batch, or store the previous one, while this one runs; on a GPU its
        ``device_seconds()`` is the device's time on the batch (copies included).
        """
        # staged before the clock starts: the device is not at work while the host pins
        host = self.staged(torch.from_numpy(np.ascontiguousarray(frames)))
        started = device_clock(self.device)
        frame_emb, tokens, _ = self.frames_on_device(host, _torch_float(dtype))
        return PendingArrays((frame_emb, tokens), started=started)

    def encode_frames(self, frames: np.ndarray, *, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
        """(N, S, S, 3) uint8 → frame_emb (N, E) L2-normalised, tokens (N, P, D), as ``dtype``.

        ``np.float16`` (what extraction stores) is made on the device: half the bytes to the host and
        no host-side conversion (its cost at ViT-bigG-14 is in benchmarks/README.md); the values are
        the ones a host conversion gives (both round to nearest even).
        """
        return self.submit_frames(frames, dtype=dtype).result()

    # --------------------------------------------------------------------------- text
    @torch.no_grad()
    def submit_texts(self, texts: Sequence[str], *, dtype=np.float32) -> PendingArrays:
        """Queue ``encode_texts`` on the device and return at once; ``.result()`` gives emb (M, E) and
        tokens (M, L, Dt) as ``dtype`` (``np.float16`` made on the device, as for frames) and lengths
        (M,) int64."""
        ids = self.tokenizer(list(texts))  # (M, context)
        lengths = (ids[:, : self.text_tokens] != pad_token_id(self.tokenizer)).sum(dim=1)
        out = self.clip.forward_intermediates(
            text=self.to_device(ids), text_indices=1, normalize_intermediates=True, normalize=True
        )
        tokens = out["text_intermediates"][-1][:, : self.text_tokens]  # (M, L, W)
        if self._text_projection is not None:
            tokens = self._text_projection(tokens.to(self.dtype))  # (M, L, E)
        wanted = _torch_float(dtype)
        return PendingArrays((out["text_features"].float().to(wanted), tokens.float().to(wanted), lengths))

    def encode_texts(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Captions → emb (M, E) L2-normalised, tokens (M, L, Dt), lengths (M,) int.

        The embedding uses the model's whole context; the token features keep the first
        ``text_tokens`` positions (start token included); ``lengths`` counts the real tokens
        among them.
        """
        emb, tokens, lengths = self.submit_texts(texts).result()
        return emb, tokens, lengths.astype(np.int16)
