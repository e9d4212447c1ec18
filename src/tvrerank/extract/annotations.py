"""Read text-to-video retrieval annotations in each dataset's published format.

Every reader turns annotation files into a flat list of :class:`Caption` records
(one per caption, or one paragraph per video for DiDeMo and ActivityNet) and
locates each video file under ``videos_root``. A missing video never raises:
its usual relative path is returned so the extractor records it as failed.
Broken annotation files raise :class:`AnnotationError`, whose message names the
file and the line or JSON key and says what to do.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import os
import pickle
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from tvrerank.errors import TvrerankError

logger = logging.getLogger(__name__)

#: Extensions probed, in order, when a dataset names a video without its file.
PROBE_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mts", ".wmv")
#: Suffixes treated as a video extension (stripped before probing); "." is DiDeMo's empty one.
_VIDEO_SUFFIXES = frozenset(PROBE_EXTENSIONS + (
    ".", ".3gp", ".3g2", ".mpg", ".mpeg", ".flv", ".ogv", ".m2ts", ".ts", ".vob", ".asf", ".divx",
    ".dv", ".qt", ".rm", ".rmvb", ".f4v", ".mod", ".mxf"))
_MSVD_CAPTION_FILES = ("captions_msvd.json", "raw-captions.pkl")
_LSMDC_COLUMNS = "clip_id, start_aligned, end_aligned, start_extracted, end_extracted, sentence"


class AnnotationError(TvrerankError, ValueError):
    """Unreadable annotations. The message always names the file and the line number (1-based)
    or the JSON key/field, and says what to do."""


@dataclass(frozen=True)
class Caption:
    """One caption (or one paragraph) of one video."""

    video_id: str  # the dataset's video id
    video_path: str  # POSIX path of the video file relative to the videos root
    text: str  # the caption (a paragraph for didemo/activitynet)


# --------------------------------------------------------------------------- small helpers


def _strip_video_ext(name: str) -> str:
    """``name`` without a trailing video extension (``a.mts`` -> ``a``, ``a.`` -> ``a``); else unchanged."""
    stem, dot, suffix = name.rpartition(".")
    if dot and stem and "/" not in suffix and f".{suffix}".lower() in _VIDEO_SUFFIXES:
        return stem
    return name


def _read_text(path: Path) -> str:
    """The file's text (UTF-8, BOM dropped, newlines untouched); AnnotationError if unreadable."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise AnnotationError(f"{path}: byte {e.start}: not UTF-8 text; re-save the file as UTF-8") from None
    except OSError as e:
        raise AnnotationError(f"{path}: cannot read ({e.strerror}); check the --annotations path") from None


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its newline) for each non-blank line."""
    for number, line in enumerate(_read_text(path).split("\n"), 1):
        line = line.rstrip("\r")
        if line.strip():
            yield number, line


def _load_json(path: Path) -> Any:
    """Parsed JSON document; AnnotationError with the line number if it is not valid JSON."""
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise AnnotationError(
            f"{path}: line {e.lineno}: invalid JSON ({e.msg}); is this file complete and in the "
            "dataset's published format?") from None


def _no_nul(value: str, path: Path | str, where: str) -> str:
    """``value``; AnnotationError naming ``path`` and ``where`` when it holds a NUL byte (the cache's
    strings cannot store one: refused here, before any model loads or any file is written)."""
    if "\x00" in value:
        raise AnnotationError(f"{path}: {where}: holds a NUL byte (\\u0000) at character {value.index(chr(0))}; "
                              "remove it from that entry")
    return value


def _text(value: object, path: Path | str, where: str) -> str:
    """``value`` stripped; AnnotationError naming ``path`` and ``where`` unless a non-empty string
    without NUL bytes."""
    if isinstance(value, str) and value.strip():
        return _no_nul(value.strip(), path, where)
    got = "nothing" if value is None else "an empty string" if isinstance(value, str) else type(value).__name__
    raise AnnotationError(f"{path}: {where}: expected a non-empty string, got {got}; fix or remove that entry")


def _texts(value: object, path: Path, where: str, tokens: bool = False) -> list[str]:
    """Non-blank stripped strings of a JSON/pickle list; with ``tokens`` items may be token lists."""
    if not isinstance(value, list):
        raise AnnotationError(
            f"{path}: {where}: expected a list of captions, got {type(value).__name__}; fix that entry")
    out = []
    for i, item in enumerate(value):
        if tokens and isinstance(item, (list, tuple)) and all(isinstance(t, str) for t in item):
            item = " ".join(item)
        if not isinstance(item, str):
            raise AnnotationError(
                f"{path}: {where}[{i}]: expected a caption string, got {type(item).__name__}; fix that entry")
        if item.strip():
            out.append(_no_nul(item.strip(), path, f"{where}[{i}]"))
    return out


def _paragraph(texts: Sequence[str]) -> list[str]:
    """The texts joined with single spaces as a one-item list; [] if there are none."""
    return [" ".join(texts)] if texts else []


def _read_ids(path: Path) -> list[str]:
    """A split list: one video id per non-blank line."""
    ids = [line.strip() for _, line in _lines(path)]
    if not ids:
        raise AnnotationError(f"{path}: the split list is empty; it should hold one video id per line")
    return ids


def _csv_table(path: Path, required: Sequence[str], layout: str) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header and (line number, row) pairs of a ``,``- (or ``;``-) separated file with a header."""
    text = _read_text(path)
    first = text.split("\n", 1)[0]
    delimiter = ";" if ";" in first and "," not in first else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in required if c not in header]
        if missing:
            raise AnnotationError(
                f"{path}: line 1: header {delimiter.join(header)!r} lacks column(s) {', '.join(missing)}; "
                f"the first line must be {layout!r}")
        rows = []
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise AnnotationError(
                    f"{path}: line {reader.line_num}: {len(row)} fields but the header has {len(header)}; "
                    f"quote fields that contain {delimiter!r}")
            rows.append((reader.line_num, dict(zip(header, row))))
    except csv.Error as e:
        raise AnnotationError(f"{path}: line {reader.line_num}: malformed CSV ({e}); fix the quoting") from None
    return header, rows


def _load_pickle(path: Path) -> Any:
    """Unpickle plain containers only (dict/list/str); class references are refused."""

    class _PlainUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")

    try:
        with open(path, "rb") as f:
            return _PlainUnpickler(f, encoding="utf-8").load()
    except OSError as e:
        raise AnnotationError(f"{path}: cannot read ({e.strerror}); check the --annotations path") from None
    except Exception as e:  # pickle raises many types for corrupt input
        raise AnnotationError(
            f"{path}: not a plain pickle of {{video_id: [token lists]}} ({e}); pass CLIP4Clip's "
            "raw-captions.pkl or X-Pool's captions_msvd.json") from None


def _companion(given: Sequence[Path], near: Path, names: Sequence[str], what: str) -> Path:
    """The one passed companion file, else the first of ``names`` found next to ``near``."""
    if len(given) > 1:
        raise AnnotationError(f"{', '.join(map(str, given))}: several {what} files given; pass only one")
    if given:
        return given[0]
    for name in names:
        if (near.parent / name).is_file():
            return near.parent / name
    looked = ", ".join(str(near.parent / n) for n in names)
    raise AnnotationError(
        f"{near}: needs {what}, but found none (looked for {looked}); "
        "pass it as another --annotations file")


def _expand(ids: Sequence[str], table: Mapping[str, list[str]], ids_src: Path | str, texts_src: Path | str,
            video_path: Callable[[str], str]) -> list[Caption]:
    """One Caption per text of each id in ``ids``; AnnotationError for an id without texts."""
    out: list[Caption] = []
    for vid in ids:
        texts = table.get(vid)
        if not texts:
            raise AnnotationError(
                f"{texts_src}: video {vid!r} (listed in {ids_src}) has no captions; "
                "pass the caption file that belongs to this split")
        path = video_path(vid)
        out.extend(Caption(vid, path, text) for text in texts)
    return out


# --------------------------------------------------------------------------- video files


def _candidates(bases: Sequence[str], default: str) -> list[str]:
    """Relative paths to probe: the default, then each base as is, plus each probe extension
    (also after dropping the base's own video extension)."""
    out = [default]
    for base in bases:
        stem = _strip_video_ext(base)
        out += [base, *(base + e for e in PROBE_EXTENSIONS), *(stem + e for e in PROBE_EXTENSIONS)]
    return list(dict.fromkeys(out))


class _VideoResolver:
    """Finds video files under a root: direct probes first, then one lazy ``os.walk`` index."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._root_exists = root.is_dir()
        self._index: tuple[set[str], dict[str, str], dict[str, str]] | None = None  # (paths, by name, by stem)
        self._cache: dict[tuple[tuple[str, ...], str], str] = {}
        self.missing = 0
        self.first_seen: dict[str, tuple[str, str]] = {}  # video id → (video path, "FILE: line N") of user formats

    def resolve(self, bases: Sequence[str], default: str) -> str:
        """Relative POSIX path of the first existing file for ``bases``, else ``default``."""
        key = (tuple(bases), default)
        if key not in self._cache:
            found = self._find(_candidates(bases, default), bases) if self._root_exists else None
            self.missing += found is None
            self._cache[key] = found or default
        return self._cache[key]

    def _find(self, candidates: Sequence[str], bases: Sequence[str]) -> str | None:
        """The first candidate that exists, else an indexed file with a candidate's name or a base's stem.
        Once the tree has been indexed, the index replaces the per-candidate file probes."""
        exists = self._index[0].__contains__ if self._index else lambda c: (self.root / c).is_file()
        found = next((c for c in candidates if exists(c)), None)
        if found:
            return found
        _, by_name, by_stem = self._index or self._build_index()
        names = [posixpath.basename(c) for c in candidates]
        stems = [s for b in map(posixpath.basename, bases) for s in (b, _strip_video_ext(b))]
        return next((by_name[n] for n in names if n in by_name), None) or next(
            (by_stem[s] for s in stems if s in by_stem), None)

    def _build_index(self) -> tuple[set[str], dict[str, str], dict[str, str]]:
        """Walk the root once: all paths, file name -> path and name-without-video-extension -> path."""
        logger.info("some videos are not at their usual path; indexing %s", self.root)
        paths: set[str] = set()
        by_name: dict[str, str] = {}
        by_stem: dict[str, str] = {}
        for dirpath, dirs, files in os.walk(self.root):
            dirs.sort()
            rel_dir = Path(dirpath).relative_to(self.root)
            for name in sorted(files):
                rel = (rel_dir / name).as_posix()
                paths.add(rel)
                by_name.setdefault(name, rel)
                if _strip_video_ext(name) != name:
                    by_stem.setdefault(_strip_video_ext(name), rel)
        self._index = (paths, by_name, by_stem)
        return self._index


# --------------------------------------------------------------------------- one reader per format

Reader = Callable[[list[Path], _VideoResolver], list[Caption]]


def _per_file(read_one: Callable[[Path, _VideoResolver], list[Caption]]) -> Reader:
    """A reader applying ``read_one`` to each file in order."""
    return lambda paths, resolver: [c for p in paths for c in read_one(p, resolver)]


def _partition(paths: Sequence[Path], suffix: str) -> tuple[list[Path], list[Path]]:
    """(paths with that suffix, the other paths), both in the given order."""
    hit = [p for p in paths if p.suffix.lower() == suffix]
    return hit, [p for p in paths if p.suffix.lower() != suffix]


def _user_caption(record: Mapping[str, Any], path: Path, where: str) -> Caption:
    """A jsonl/csv record {video, caption[, video_id]}; the video path is used as given."""
    video = _text(record.get("video"), path, f"{where}, field 'video'")
    text = _text(record.get("caption"), path, f"{where}, field 'caption'")
    vid = record.get("video_id")
    video_id = posixpath.splitext(video)[0] if vid in (None, "") else _text(vid, path, f"{where}, field 'video_id'")
    return Caption(video_id, video, text)


def _read_jsonl_file(path: Path, resolver: _VideoResolver) -> list[Caption]:
    """jsonl: one {video, caption[, video_id]} object per line."""
    out = []
    for number, line in _lines(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise AnnotationError(
                f"{path}: line {number}: invalid JSON ({e.msg}); each line must be one object like "
                '{"video": "a.mp4", "caption": "..."}') from None
        if not isinstance(record, dict):
            raise AnnotationError(f"{path}: line {number}: expected a JSON object, got {type(record).__name__}; "
                                  'write {"video": ..., "caption": ...}')
        out.append(_one_path_per_id(_user_caption(record, path, f"line {number}"), f"{path}: line {number}",
                                    resolver))
    return out


def _read_csv_file(path: Path, resolver: _VideoResolver) -> list[Caption]:
    """csv: header ``video,caption[,video_id]``, one caption per row."""
    _, rows = _csv_table(path, ("video", "caption"), "video,caption[,video_id]")
    return [_one_path_per_id(_user_caption(row, path, f"line {number}"), f"{path}: line {number}", resolver)
            for number, row in rows]


def _one_path_per_id(caption: Caption, where: str, resolver: _VideoResolver) -> Caption:
    """Refuse a video id that names two different video files (their captions would be mixed up)."""
    seen = resolver.first_seen.setdefault(caption.video_id, (caption.video_path, where))
    if seen[0] != caption.video_path:
        raise AnnotationError(
            f"{where}: video_id {caption.video_id!r} is {caption.video_path!r} here but {seen[0]!r} at {seen[1]}; "
            "give each video file its own video_id (or drop the field to use the file name)")
    return caption


def _load_msrvtt_json(path: Path) -> tuple[list[str], dict[str, list[str]]]:
    """(video ids in 'videos' order, sentences per video id) of an MSRVTT_data.json."""
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("sentences"), list):
        raise AnnotationError(f"{path}: key 'sentences': missing; pass the official MSRVTT_data.json")
    table: dict[str, list[str]] = {}
    for i, s in enumerate(data["sentences"]):
        s = s if isinstance(s, dict) else {}
        vid = _text(s.get("video_id"), path, f"key sentences[{i}].video_id")
        table.setdefault(vid, []).append(_text(s.get("caption"), path, f"key sentences[{i}].caption"))
    videos = data.get("videos")
    if not isinstance(videos, list):
        return list(table), table
    ids = [_text(v.get("video_id") if isinstance(v, dict) else v, path, f"key videos[{i}].video_id")
           for i, v in enumerate(videos)]
    return ids, table


def _read_msrvtt(paths: list[Path], resolver: _VideoResolver) -> list[Caption]:
    """msrvtt: the JSFUSION test csv, a train split csv (+ MSRVTT_data.json), or the json alone."""
    jsons, csvs = _partition(paths, ".json")
    load = functools.lru_cache(maxsize=None)(_load_msrvtt_json)  # each json parsed once per call

    def video_path(vid: str) -> str:
        return resolver.resolve([vid], f"{vid}.mp4")

    if not csvs:
        return [c for j in jsons for c in _expand(*load(j), j, j, video_path)]
    out: list[Caption] = []
    for path in csvs:
        header, rows = _csv_table(path, ("video_id",), "key,vid_key,video_id,sentence  or  video_id")
        ids = [_text(row["video_id"], path, f"line {n}, column 'video_id'") for n, row in rows]
        if "sentence" in header:  # JSFUSION test csv: one caption per row
            out += [Caption(vid, video_path(vid), _text(row["sentence"], path, f"line {n}, column 'sentence'"))
                    for vid, (n, row) in zip(ids, rows)]
        else:  # train split: ids only, sentences from MSRVTT_data.json
            data = _companion(jsons, path, ("MSRVTT_data.json",), "the MSR-VTT captions file MSRVTT_data.json")
            out += _expand(ids, load(data)[1], path, data, video_path)
    return out


def _load_msvd_captions(path: Path) -> dict[str, list[str]]:
    """{video id: captions} from captions_msvd.json (strings) or raw-captions.pkl (token lists)."""
    is_pickle = path.suffix.lower() == ".pkl"
    data = _load_pickle(path) if is_pickle else _load_json(path)
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: top level: expected a mapping of video id to captions, got "
                              f"{type(data).__name__}; pass captions_msvd.json or raw-captions.pkl")
    return {str(k): _texts(v, path, f"key {k!r}", tokens=is_pickle) for k, v in data.items()}


def _read_msvd(paths: list[Path], resolver: _VideoResolver) -> list[Caption]:
    """msvd: ``*_list.txt`` splits + captions_msvd.json / raw-captions.pkl, or a caption file alone."""
    lists, caption_files = _partition(paths, ".txt")
    load = functools.lru_cache(maxsize=None)(_load_msvd_captions)  # each file parsed once per call

    def video_path(vid: str) -> str:
        return resolver.resolve([vid], f"{vid}.avi")

    if not lists:
        return [c for p in caption_files for c in _expand(list(load(p)), load(p), p, p, video_path)]
    out: list[Caption] = []
    for lst in lists:
        source = _companion(caption_files, lst, _MSVD_CAPTION_FILES, "an MSVD caption file")
        out += _expand(_read_ids(lst), load(source), lst, source, video_path)
    return out


def _didemo_json_name(split_list: Path) -> str:
    """DiDeMo's json name for a split list: ``test_list.txt`` -> ``test_data.json``."""
    return split_list.name.removesuffix(".txt").removesuffix("_list") + "_data.json"


def _didemo_descriptions(path: Path, into: dict[str, list[str]]) -> None:
    """Append each annotation's stripped description to ``into[video]`` (LocalizingMoments json)."""
    data = _load_json(path)
    if not isinstance(data, list):
        raise AnnotationError(f"{path}: top level: expected a list of LocalizingMoments annotations, got "
                              f"{type(data).__name__}; pass DiDeMo's {{train,val,test}}_data.json")
    for i, item in enumerate(data):
        item = item if isinstance(item, dict) else {}
        video = _text(item.get("video"), path, f"key [{i}].video")
        description = item.get("description")
        if not isinstance(description, str):
            raise AnnotationError(f"{path}: key [{i}].description: expected a string, got "
                                  f"{type(description).__name__}; fix or remove that entry")
        into.setdefault(video, []).extend([description.strip()] if description.strip() else [])


def _read_didemo(paths: list[Path], resolver: _VideoResolver) -> list[Caption]:
    """didemo: one paragraph per video from ``*_data.json``, optionally ordered by ``*_list.txt``."""
    lists, jsons = _partition(paths, ".txt")
    if not jsons:
        jsons = [_companion([], lst, (_didemo_json_name(lst),), "a DiDeMo json") for lst in lists]
    descriptions: dict[str, list[str]] = {}
    for path in jsons:
        _didemo_descriptions(path, descriptions)
    table = {video: _paragraph(texts) for video, texts in descriptions.items()}
    source = ", ".join(map(str, jsons))

    def video_path(video: str) -> str:
        return resolver.resolve([video], video)

    if not lists:
        return _expand(list(table), table, source, source, video_path)
    by_stem = {_strip_video_ext(video): video for video in table}
    out: list[Caption] = []
    for lst in lists:
        ids = [name if name in table else by_stem.get(name, name) for name in _read_ids(lst)]
        out += _expand(ids, table, lst, source, video_path)
    return out


def _read_lsmdc_file(path: Path, resolver: _VideoResolver) -> list[Caption]:
    """lsmdc: six tab-separated columns per line, no header; videos in ``<movie>/<clip_id>.avi``."""
    out = []
    for number, line in _lines(path):
        columns = [c.strip() for c in line.split("\t", 5)]
        if len(columns) != 6:
            raise AnnotationError(
                f"{path}: line {number}: {len(columns)} tab-separated columns, expected 6 "
                f"({_LSMDC_COLUMNS}); check the file is LSMDC's tab-separated layout")
        clip = _text(columns[0], path, f"line {number}, column 'clip_id'")
        text = _text(columns[5], path, f"line {number}, column 'sentence'")
        movie = clip.rpartition("_")[0]
        stored = f"{movie}/{clip}" if movie else clip
        out.append(Caption(clip, resolver.resolve([clip, stored], f"{stored}.avi"), text))
    return out


def _read_activitynet_file(path: Path, resolver: _VideoResolver) -> list[Caption]:
    """activitynet: {key: {duration, timestamps, sentences}}, one paragraph per video."""
    data = _load_json(path)
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: top level: expected a mapping of video key to {{duration, timestamps, "
                              "sentences}; pass ActivityNet Captions' train.json, val_1.json or val_2.json")
    table = {}
    for key, item in data.items():
        sentences = item.get("sentences") if isinstance(item, dict) else None
        table[key] = _paragraph(_texts(sentences, path, f"key {key!r}.sentences"))

    def video_path(key: str) -> str:
        return resolver.resolve([key, key[2:]] if key.startswith("v_") else [key], f"{key}.mp4")

    return _expand(list(table), table, path, path, video_path)


_READERS: dict[str, Reader] = {
    "jsonl": _per_file(_read_jsonl_file),
    "csv": _per_file(_read_csv_file),
    "msrvtt": _read_msrvtt,
    "msvd": _read_msvd,
    "didemo": _read_didemo,
    "lsmdc": _per_file(_read_lsmdc_file),
    "activitynet": _per_file(_read_activitynet_file),
}
#: The annotation formats ``--format`` takes (one reader each).
FORMATS = tuple(_READERS)


# --------------------------------------------------------------------------- public API


def _sniff_json(path: Path) -> str | None:
    """The format of a JSON annotation file from its structure, or None."""
    data = _load_json(path)
    if isinstance(data, list) and data and isinstance(data[0], dict) and {"description", "times"} <= data[0].keys():
        return "didemo"
    if isinstance(data, dict) and data:
        if {"videos", "sentences"} <= data.keys():
            return "msrvtt"
        first = next(iter(data.values()))
        if isinstance(first, dict) and {"sentences", "timestamps"} <= first.keys():
            return "activitynet"
        if isinstance(first, list):
            return "msvd"
    return None


def _guess_one(path: Path) -> str | None:
    """The format one file's name/content points to; None for split lists and unknown files."""
    name, suffix = path.name, path.suffix.lower()
    if suffix == ".jsonl":
        return "jsonl"
    if name.upper().startswith("MSRVTT_"):
        return "msrvtt"
    if name in _MSVD_CAPTION_FILES or suffix == ".pkl":
        return "msvd"
    if suffix == ".tsv":
        return "lsmdc"
    if name.endswith("_list.txt"):
        return None
    if suffix == ".json":
        return _sniff_json(path)
    first = next((line for _, line in _lines(path)), "")
    if first.count("\t") >= 5:
        return "lsmdc"
    header = {h.strip() for h in first.replace(";", ",").split(",")}
    if {"video", "caption"} <= header:
        return "csv"
    if header & {"video_id", "vid_key", "sentence"}:
        return "msrvtt"
    return None


def _guess_from_neighbours(split_list: Path) -> str | None:
    """msvd or didemo for a ``*_list.txt`` from the caption files next to it."""
    if any((split_list.parent / n).is_file() for n in _MSVD_CAPTION_FILES):
        return "msvd"
    data = split_list.parent / _didemo_json_name(split_list)
    return "didemo" if data.is_file() and _sniff_json(data) == "didemo" else None


def guess_format(paths: Sequence[str | Path]) -> str:
    """The annotation format of ``paths`` from file names and contents (AnnotationError if unclear)."""
    paths = [Path(p) for p in paths]
    guesses = {p: _guess_one(p) for p in paths}
    found = sorted({g for g in guesses.values() if g})
    if len(found) > 1:
        seen = ", ".join(f"{p} looks like {g}" for p, g in guesses.items() if g)
        raise AnnotationError(f"{seen}: the files disagree; pass --format (one of {', '.join(FORMATS)})")
    if not found:
        found = [g for p in paths if p.name.endswith("_list.txt") and (g := _guess_from_neighbours(p))][:1]
    if not found:
        raise AnnotationError(
            f"{', '.join(map(str, paths))}: cannot tell the annotation format; "
            f"pass --format with one of {', '.join(FORMATS)}")
    return found[0]


def read_annotations(paths: Sequence[str | Path], fmt: str | None, videos_root: str | Path) -> list[Caption]:
    """Read captions from one or more annotation files in a dataset's published format.

    ``fmt=None`` guesses the format (:func:`guess_format`). Captions come in file order. A missing
    video file never raises: its usual path is still returned (the extractor records the video as
    failed). Unreadable or invalid annotation files raise :class:`AnnotationError`.
    """
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    if not paths:
        raise AnnotationError("no annotation files given; pass at least one --annotations FILE")
    for path in paths:
        if path.is_dir():
            raise AnnotationError(f"{path}: is a folder, not an annotation file; pass the annotation file "
                                  "inside it to --annotations")
        if not path.is_file():
            raise AnnotationError(f"{path}: annotation file not found; check the --annotations path")
    fmt = guess_format(paths) if fmt is None else fmt.lower()
    if fmt not in _READERS:
        raise AnnotationError(f"{paths[0]}: unknown format {fmt!r}; pass --format with one of {', '.join(FORMATS)}")
    resolver = _VideoResolver(Path(videos_root))
    captions = _READERS[fmt](paths, resolver)
    if not captions:
        raise AnnotationError(f"{', '.join(map(str, paths))}: no captions found; check the files and --format")
    for number, caption in enumerate(captions, 1):  # any reader's ids and paths, too
        for field_name in ("video_id", "video_path", "text"):
            _no_nul(getattr(caption, field_name), ", ".join(map(str, paths)), f"caption {number}, {field_name}")
    if resolver.missing:
        logger.warning("%d video(s) not found under %s; they are kept and will be recorded as failed",
                       resolver.missing, videos_root)
    logger.info("read %d %s captions from %d file(s)", len(captions), fmt, len(paths))
    return captions
