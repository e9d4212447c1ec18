"""How a cache stores its patch and caption tokens: ``float16``, or 8 bits with a scale per token.

``TokenLayout.token_dtype`` names the encoding (``extract --token-dtype``, ``cache compact``):

* ``float16``: the tokens as they are (2 bytes a value; caches made before the field existed);
* ``int8``: ``codes = rint(token / scale)`` in [-127, 127] with ``scale = absmax(token) / 127``, one
  float16 scale per token (one frame patch, one caption position) in ``videos/token_scale`` /
  ``texts/token_scale``;
* ``float8``: the same scaled token (``scale = absmax / 448``) as float8 e4m3 (torch's
  ``float8_e4m3fn``; HDF5 has no 8-bit float, so the bytes are stored as uint8).

The scale is the absmax of the token itself: a token's direction is what the model reads (its
attention and the selectors' scores are dot products), and an absmax per token keeps every token's
largest value exact whatever its norm. ``benchmarks/bench_cache.py`` measures the cosine to float16.

Decoding happens where the tokens are used, on the device (``decode_tokens``): the host→device copy
moves the 8-bit codes. The stored dtype says which encoding codes are in (int8, uint8 = float8 bytes),
so a decoder needs no other argument.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where it is needed: the index and the cache tools read caches without it
    import torch

TOKEN_DTYPES = ("float16", "int8", "float8")
POOLS = ("none", "2x2")  # TokenLayout.pool
#: the HDF5 dtype of the token datasets for each encoding
STORED_DTYPE = {"float16": np.float16, "int8": np.int8, "float8": np.uint8}
#: the largest code of each 8-bit encoding (the scale maps a token's absmax onto it)
CODE_MAX = {"int8": 127.0, "float8": 448.0}


def has_scale(token_dtype: str) -> bool:
    """Whether the encoding stores a scale per token beside the codes."""
    return token_dtype != "float16"


def check_token_dtype(token_dtype: str, where: str = "token dtype") -> str:
    import torch

    from tvrerank.errors import InputError

    if token_dtype not in TOKEN_DTYPES:
        raise InputError(f"{where} must be one of {', '.join(TOKEN_DTYPES)}, got {token_dtype!r}")
    if token_dtype == "float8" and not hasattr(torch, "float8_e4m3fn"):
        raise InputError(f"{where} float8 needs torch's float8_e4m3fn (torch >= 2.1); use int8")
    return token_dtype


def encode_tokens(tokens: np.ndarray, token_dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """tokens (..., D) float → (codes (..., D) in ``STORED_DTYPE``, scale (...,) float16, or None for float16).

    An all-zero token (a padded frame or caption position) gets scale 0 and zero codes."""
    if not has_scale(token_dtype):
        return np.asarray(tokens, dtype=np.float16), None
    import torch

    values = np.asarray(tokens, dtype=np.float32)
    scale = (np.abs(values).max(axis=-1) / CODE_MAX[token_dtype]).astype(np.float16)  # (...,)
    exact = scale.astype(np.float32)[..., None]  # the stored scale is the one the decoder multiplies by
    scaled = np.divide(values, exact, out=np.zeros_like(values), where=exact > 0)
    if token_dtype == "int8":
        codes = np.clip(np.rint(scaled), -127, 127).astype(np.int8)
    else:
        codes = torch.from_numpy(np.clip(scaled, -448, 448)).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    return codes, scale


def without_padding(text_tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """text_tokens (M, L, D), lengths (M,) → a copy with the positions past each caption's length zeroed.

    The re-ranker masks those positions, so their values are never read; 8-bit caches store them as
    zeros (scale 0), which their compressed caption tokens then hold in next to no bytes."""
    positions = np.arange(text_tokens.shape[1])
    return np.where((positions[None, :] < np.asarray(lengths)[:, None])[..., None], text_tokens, 0).astype(
        text_tokens.dtype)


def decode_tokens(codes: torch.Tensor, scale: torch.Tensor | None, dtype=None) -> torch.Tensor:
    """codes (..., D) as stored, scale (...,) or None → tokens (..., D) in ``dtype`` (float32 by default),
    on the codes' device."""
    import torch

    dtype = dtype or torch.float32
    if codes.dtype == torch.uint8:
        values = codes.view(torch.float8_e4m3fn).to(torch.float32)
    else:
        values = codes.to(torch.float32)
    if scale is not None:
        values.mul_(scale.to(torch.float32).unsqueeze(-1))  # in place: one pass over the new float32 tensor
    return values.to(dtype)


def roundtrip_tokens(tokens: np.ndarray, token_dtype: str, lengths: np.ndarray | None = None) -> np.ndarray:
    """tokens (..., D) → the float32 values a cache of this encoding would give back: what a re-ranker
    trained on such a cache saw, for tokens computed at query time (float16: unchanged). ``lengths`` (M,):
    caption tokens (M, L, D), whose padding an 8-bit cache holds as zeros."""
    if not has_scale(token_dtype):
        return tokens
    import torch

    if lengths is not None:
        tokens = without_padding(tokens, lengths)
    codes, scale = encode_tokens(tokens, token_dtype)
    return decode_tokens(torch.from_numpy(codes), torch.from_numpy(scale)).numpy()


def pool_grid(tokens: torch.Tensor, pool: str) -> torch.Tensor:
    """(N, C, H, W) → (N, C, H', W'); ``2x2`` averages 2×2 windows, a partial window at odd edges
    (averaged over the cells it has). Extraction pools the tower's grid with it, ``cache compact``
    the stored tokens (the same values: the joint-space projection is linear)."""
    import torch.nn.functional as F

    from tvrerank.errors import InputError

    if pool == "none":
        return tokens
    if pool == "2x2":
        return F.avg_pool2d(tokens, kernel_size=2, stride=2, ceil_mode=True)
    raise InputError(f"token pool must be one of {', '.join(POOLS)}, got {pool!r}")


def pooled_grid(grid: tuple[int, int], pool: str) -> tuple[int, int]:
    """The grid ``pool_grid`` leaves of an (H, W) grid: (ceil(H/2), ceil(W/2)) for ``2x2``."""
    return tuple(grid) if pool == "none" else tuple(-(-int(side) // 2) for side in grid)


def pool_frame_tokens(tokens: torch.Tensor, grid: tuple[int, int], pool: str) -> torch.Tensor:
    """tokens (..., P, D) of frames on an (H, W) grid (P = H·W, row-major) → (..., P', D) pooled."""
    if pool == "none":
        return tokens
    *lead, p, d = tokens.shape
    h, w = grid
    frames = tokens.reshape(-1, h, w, d).permute(0, 3, 1, 2)  # (N, D, H, W)
    pooled = pool_grid(frames, pool)  # (N, D, H', W')
    return pooled.flatten(2).transpose(1, 2).reshape(*lead, -1, d)
