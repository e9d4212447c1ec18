""""Was this artifact made from that cache?" — one check for every artifact.

Two things identify what a cache holds:

* its **fingerprint** (``CacheHeader.fingerprint()``): encoder, sampling and token layout. Arrays
  from caches with equal fingerprints live in the same space, so a re-ranker trained on one
  cache may score another with the same fingerprint (train → test).
* its **video ids digest** (``video_ids_digest``): which videos, in which row order. An index,
  a candidates file or a gallery store addresses videos by row, so it must also match this.

Every artifact records both; :func:`require_same_cache` refuses a mismatch with a message that
names the artifact, the cache and the command that rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Iterable

from tvrerank.errors import CacheMismatch


def video_ids_digest(video_ids: Iterable[str]) -> str:
    """sha256 of the newline-joined video ids (row order matters)."""
    return hashlib.sha256("\n".join(video_ids).encode()).hexdigest()


def cache_video_ids_digest(cache) -> str:
    """``video_ids_digest`` of an open cache's ``videos/id``."""
    return video_ids_digest(cache.strings("videos/id"))


def split_identity(cache, videos: list[str] | None = None) -> dict:
    """What identifies a run's training or validation split: its cache, that cache's video-ids digest,
    and the held-out video ids when the split is part of the cache (None: all of it)."""
    return {"cache": str(cache.path), "video_ids_sha256": cache_video_ids_digest(cache), "videos": videos}


def held_out_record(splits: dict | None) -> dict:
    """What a run's ``splits`` ({"train": identity, "validation": identity or None}, as ``split_identity``
    gives them) say about the videos it held out of its training cache, in a few fields: the training
    cache's video-ids digest, the number of held-out videos and the digest of their ids (0 and "" when
    none were held out of it: no validation, or a validation cache of its own)."""
    splits = splits or {}
    train, validation = splits.get("train") or {}, splits.get("validation") or {}
    videos = validation.get("videos") if validation.get("video_ids_sha256") == train.get("video_ids_sha256") else None
    return {"train_video_ids_sha256": train.get("video_ids_sha256", ""), "held_out": len(videos or []),
            "held_out_sha256": video_ids_digest(videos) if videos else ""}


def as_read_today(fingerprint: dict) -> dict:
    """A recorded fingerprint with the fields it predates filled in with their defaults, as the cache it was
    made from reads today (``SamplingConfig.resize`` and ``TokenLayout.token_dtype`` arrived after the
    first caches)."""
    from tvrerank.config import SamplingConfig, TokenLayout, to_dict

    if not isinstance(fingerprint, dict):
        return fingerprint
    filled = dict(fingerprint)
    for name, defaults in (("sampling", SamplingConfig()), ("layout", TokenLayout())):
        if isinstance(fingerprint.get(name), dict):
            filled[name] = {**to_dict(defaults), **fingerprint[name]}
    return filled


def cache_mismatch(cache, *, fingerprint: dict, video_ids_sha256: str | None = None) -> str | None:
    """Why an artifact with this fingerprint (and video-ids digest, when given) does not belong to ``cache``;
    None when it does."""
    fingerprint = as_read_today(fingerprint)
    if fingerprint != cache.header.fingerprint():
        return ("it was made from a cache with other settings: "
                + "; ".join(fingerprint_differences(fingerprint, cache.header.fingerprint(), cache.path)))
    if video_ids_sha256 is not None and video_ids_sha256 != cache_video_ids_digest(cache):
        return f"it was made from another cache, with other videos than {cache.path}"
    return None


def fingerprint_differences(made_with: dict, held: dict, path, limit: int = 4, label: str = "it") -> list[str]:
    """The settings two fingerprints differ in, each named with both values, e.g.
    ``sampling.frames 8 (it) vs 12 (CACHE)`` (``label`` names the first); long values (model
    configs, digests) are shortened."""

    def flat(tree, prefix=""):
        if isinstance(tree, dict) and not prefix.endswith("model_config"):
            return {k: v for key, value in tree.items() for k, v in flat(value, f"{prefix}{key}.").items()}
        return {prefix.rstrip("."): tree}

    def short(value):
        text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
        return text if len(text) <= 40 else text[:37] + "..."

    a, b = flat(made_with), flat(held)
    differ = [f"{key} {short(a.get(key))} ({label}) vs {short(b.get(key))} ({path})" for key in sorted(a.keys() | b.keys())
              if a.get(key) != b.get(key)]
    return differ[:limit] + ([f"and {len(differ) - limit} more"] if len(differ) > limit else [])


def require_same_cache(cache, what: str, *, fingerprint: dict, video_ids_sha256: str | None = None,
                       remedy: str) -> None:
    """Raise CacheMismatch naming ``what`` (e.g. "index runs/idx") and ``remedy`` when it is not ``cache``'s."""
    reason = cache_mismatch(cache, fingerprint=fingerprint, video_ids_sha256=video_ids_sha256)
    if reason is not None:
        raise CacheMismatch(f"{what} does not belong to {cache.path}: {reason}; {remedy}")
