"""Candidates from another first stage (a vector database, clip-retrieval, one's own FAISS), read for
``tvrerank retrieve --candidates-file``: one JSON object per line,

    {"q": "a man plays guitar", "video_ids": ["v12", "v7", ...]}            # optional "stage1": [scores]

Every line is checked before anything is scored; a bad one is a one-line error naming the file and
the line. The ids themselves are checked against the gallery by ``retriever.candidate_rows``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from tvrerank.errors import InputError

EXAMPLE = '{"q": "a man plays guitar", "video_ids": ["v12", "v7"]}'


@dataclass(frozen=True)
class CandidateQuery:
    where: str  # "FILE line N", for messages
    query: str
    video_ids: tuple[str, ...]
    stage1: tuple[float, ...] | None  # the caller's first-stage scores, one per id; None: computed


def parse_candidate_line(line: str, where: str) -> CandidateQuery:
    """One JSON line → a CandidateQuery; InputError naming ``where`` when it is not one."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: not JSON ({exc.msg}); each line is one object like {EXAMPLE}") from None
    if not isinstance(data, dict):
        raise InputError(f"{where}: a JSON object is expected, like {EXAMPLE}")
    unknown = sorted(set(data) - {"q", "video_ids", "stage1"})
    if unknown:
        raise InputError(f"{where}: unknown field {unknown[0]!r}; the fields are q, video_ids and stage1 (optional)")
    query, ids, stage1 = data.get("q"), data.get("video_ids"), data.get("stage1")
    if not isinstance(query, str) or not query.strip():
        raise InputError(f"{where}: \"q\" must be a non-empty string (the query)")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise InputError(f"{where}: \"video_ids\" must be a list of video id strings")
    if stage1 is not None:
        if (not isinstance(stage1, list) or len(stage1) != len(ids)
                or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s)
                           for s in stage1)):
            raise InputError(f"{where}: \"stage1\" must be a list of {len(ids)} finite numbers, one per video id")
        stage1 = tuple(float(s) for s in stage1)
    return CandidateQuery(where=where, query=query, video_ids=tuple(ids), stage1=stage1)


def parse_candidate_lines(lines: list[str], where: str) -> list[CandidateQuery]:
    """The lines of a candidates file (blank ones skipped) → one CandidateQuery each."""
    out = [parse_candidate_line(line, f"{where} line {number}")
           for number, line in enumerate(lines, start=1) if line.strip()]
    if not out:
        raise InputError(f"{where}: no candidates; give one JSON line per query, like {EXAMPLE}")
    return out
