"""Tests for tvrerank.extract.annotations against the real published annotation files."""

from __future__ import annotations

import csv
import json
import logging
import pickle
import shutil
from pathlib import Path

import pytest

from tvrerank.extract import annotations as ann
from tvrerank.extract.annotations import FORMATS, AnnotationError, Caption, guess_format, read_annotations

DATA = Path(__file__).parent / "data" / "annotations"
JSFUSION = DATA / "msrvtt" / "MSRVTT_JSFUSION_test.csv"
TRAIN_9K = DATA / "msrvtt" / "MSRVTT_train.9k.csv"
TRAIN_7K = DATA / "msrvtt" / "MSRVTT_train.7k.csv"
MSVD_JSON = DATA / "msvd" / "captions_msvd.json"
MSVD_TEST = DATA / "msvd" / "test_list.txt"
DIDEMO = DATA / "didemo" / "test_data.json"
ANET = DATA / "activitynet" / "val_1.json"
NO_VIDEOS = "/nonexistent/videos/root"


def touch(root: Path, *names: str) -> None:
    """Create empty files (and their folders) under root."""
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")


@pytest.fixture
def walk_calls(monkeypatch):
    """Count os.walk calls made by the annotations module."""
    calls = []
    real_walk = ann.os.walk

    def counting_walk(*args, **kwargs):
        calls.append(args[0])
        return real_walk(*args, **kwargs)

    monkeypatch.setattr(ann.os, "walk", counting_walk)
    return calls


# --------------------------------------------------------------------------- msrvtt


def test_msrvtt_jsfusion_test_csv():
    caps = read_annotations([JSFUSION], "msrvtt", NO_VIDEOS)
    assert len(caps) == 1000
    assert len({c.video_id for c in caps}) == 1000
    assert caps[0] == Caption("video9770", "video9770.mp4", "a person is connecting something to system")
    assert caps[-1].video_id == "video9871"
    assert caps[-1].text == "bearded guy in grey tshirt talking to the camera"
    assert all(7020 <= int(c.video_id[5:]) <= 9975 for c in caps)


def test_msrvtt_semicolon_crlf_copy_reads_the_same(tmp_path):
    # Some published copies of the JSFUSION csv are ';'-separated with CRLF line endings.
    copy = tmp_path / "MSRVTT_JSFUSION_test.csv"
    rows = list(csv.reader(JSFUSION.open(newline="")))
    copy.write_text("".join(";".join(r) + "\r\n" for r in rows), newline="")
    assert read_annotations([copy], "msrvtt", NO_VIDEOS) == read_annotations([JSFUSION], "msrvtt", NO_VIDEOS)


def _msrvtt_json(path: Path, ids: list[str], per_video: int = 2) -> None:
    """Write an MSRVTT_data.json in the official schema; sentences interleaved across videos."""
    videos = [{"category": 0, "url": "https://www.youtube.com/watch?v=x", "video_id": v, "start time": 1.0,
               "end time": 11.0, "split": "train", "id": i} for i, v in enumerate(ids)]
    sentences = [{"caption": f"{v} caption {k}", "video_id": v, "sen_id": k * len(ids) + i}
                 for k in range(per_video) for i, v in enumerate(ids)]
    path.write_text(json.dumps({"info": {"year": 2016}, "videos": videos, "sentences": sentences}))


def _split_ids(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines()[1:] if line.strip()]


def test_msrvtt_train_split_with_json_as_second_path(tmp_path):
    ids_9k = _split_ids(TRAIN_9K)
    test_ids = [c.video_id for c in read_annotations([JSFUSION], "msrvtt", NO_VIDEOS)]
    data = tmp_path / "MSRVTT_data.json"
    _msrvtt_json(data, sorted(ids_9k + test_ids, key=lambda v: int(v[5:])))  # json order differs from csv
    caps = read_annotations([TRAIN_9K, data], None, NO_VIDEOS)
    assert len(ids_9k) == 9000 and len(caps) == 18000
    assert [c.video_id for c in caps[:4]] == ["video0", "video0", "video1", "video1"]
    assert [c.text for c in caps[:2]] == ["video0 caption 0", "video0 caption 1"]
    assert [c.video_id for c in caps[::2]] == ids_9k
    assert not {c.video_id for c in caps} & set(test_ids)
    assert caps[0].video_path == "video0.mp4"


def test_msrvtt_7k_finds_json_next_to_csv_and_resolves_videos(tmp_path):
    csv_copy = tmp_path / TRAIN_7K.name
    shutil.copy(TRAIN_7K, csv_copy)
    ids_7k = _split_ids(TRAIN_7K)
    assert ids_7k[:3] == ["video0", "video1000", "video1001"]  # lexicographic order in the real file
    _msrvtt_json(tmp_path / "MSRVTT_data.json", ids_7k, per_video=1)
    root = tmp_path / "videos"
    touch(root, "video0.mp4", "video1000.webm")
    caps = read_annotations([csv_copy], "msrvtt", root)
    assert [c.video_id for c in caps] == ids_7k
    assert [c.video_path for c in caps[:3]] == ["video0.mp4", "video1000.webm", "video1001.mp4"]


def test_msrvtt_json_alone_gives_all_videos_in_videos_order(tmp_path):
    data = tmp_path / "MSRVTT_data.json"
    _msrvtt_json(data, ["video7", "video3"], per_video=3)
    caps = read_annotations([data], None, NO_VIDEOS)
    assert [c.text for c in caps] == [f"video{v} caption {k}" for v in (7, 3) for k in range(3)]


def test_msrvtt_train_without_json_says_where_it_looked():
    with pytest.raises(AnnotationError) as e:
        read_annotations([TRAIN_9K], "msrvtt", NO_VIDEOS)
    assert str(DATA / "msrvtt" / "MSRVTT_data.json") in str(e.value)
    assert "--annotations" in str(e.value)


def test_msrvtt_split_video_without_sentences_names_id_and_files(tmp_path):
    data = tmp_path / "MSRVTT_data.json"
    _msrvtt_json(data, _split_ids(TRAIN_9K)[:5])
    with pytest.raises(AnnotationError, match="video5") as e:
        read_annotations([TRAIN_9K, data], "msrvtt", NO_VIDEOS)
    assert str(TRAIN_9K) in str(e.value) and str(data) in str(e.value)


def test_msrvtt_json_bad_sentence_names_key(tmp_path):
    data = tmp_path / "MSRVTT_data.json"
    data.write_text(json.dumps({"videos": [], "sentences": [{"caption": "ok", "video_id": "video0"},
                                                            {"caption": 5, "video_id": "video0"}]}))
    with pytest.raises(AnnotationError, match=r"sentences\[1\]\.caption"):
        read_annotations([data], "msrvtt", NO_VIDEOS)


# --------------------------------------------------------------------------- msvd


def test_msvd_test_list_with_json():
    raw = json.loads(MSVD_JSON.read_text())
    ids = MSVD_TEST.read_text().split()
    caps = read_annotations([MSVD_TEST, MSVD_JSON], "msvd", NO_VIDEOS)
    assert len(ids) == 25 and len(caps) == sum(len(raw[i]) for i in ids) == 1131
    assert list(dict.fromkeys(c.video_id for c in caps)) == ids
    assert [c.text for c in caps if c.video_id == ids[3]] == [s.strip() for s in raw[ids[3]]]
    assert caps[0].video_path == f"{ids[0]}.avi"
    # the list alone finds captions_msvd.json next to it
    assert read_annotations([MSVD_TEST], None, NO_VIDEOS) == caps


def test_msvd_caption_file_alone_gives_all_videos():
    caps = read_annotations([MSVD_JSON], None, NO_VIDEOS)
    assert len(caps) == 4252 and len({c.video_id for c in caps}) == 100
    assert caps[0] == Caption("-4wsuPCjDBc_5_15", "-4wsuPCjDBc_5_15.avi", "a squirrel is eating a peanut in it s shell")


def test_msvd_raw_captions_pkl_equals_json(tmp_path):
    raw = json.loads(MSVD_JSON.read_text())
    pkl = tmp_path / "raw-captions.pkl"
    pkl.write_bytes(pickle.dumps({k: [s.split(" ") for s in v] for k, v in raw.items()}))
    from_json = read_annotations([MSVD_TEST, MSVD_JSON], "msvd", NO_VIDEOS)
    assert read_annotations([MSVD_TEST, pkl], "msvd", NO_VIDEOS) == from_json
    shutil.copy(MSVD_TEST, tmp_path / "test_list.txt")  # found next to the list
    assert read_annotations([tmp_path / "test_list.txt"], None, NO_VIDEOS) == from_json


def test_msvd_pickle_with_classes_is_refused(tmp_path):
    pkl = tmp_path / "raw-captions.pkl"
    pkl.write_bytes(pickle.dumps({"a": [Path("x")]}))
    with pytest.raises(AnnotationError, match="raw-captions.pkl"):
        read_annotations([pkl], "msvd", NO_VIDEOS)


def test_msvd_listed_id_without_captions(tmp_path):
    lst = tmp_path / "test_list.txt"
    lst.write_text(MSVD_TEST.read_text() + "notAVideo_1_2\n")
    with pytest.raises(AnnotationError, match="notAVideo_1_2") as e:
        read_annotations([lst, MSVD_JSON], "msvd", NO_VIDEOS)
    assert str(lst) in str(e.value) and str(MSVD_JSON) in str(e.value)


def test_msvd_resolves_other_extensions_and_subfolders(tmp_path, walk_calls):
    ids = MSVD_TEST.read_text().split()
    root = tmp_path / "YouTubeClips"
    # ids[4] also has a copy in a subfolder: the top-level file is still preferred after indexing
    touch(root, f"{ids[0]}.avi", f"{ids[1]}.mp4", f"clips/{ids[2]}.avi", f"{ids[4]}.avi", f"a/{ids[4]}.avi",
          f"{ids[5]}.flv", f"{ids[6]}.json")  # .flv is not probed: found by stem; .json is not a video
    paths = {c.video_id: c.video_path for c in read_annotations([MSVD_TEST], "msvd", root)}
    assert paths[ids[0]] == f"{ids[0]}.avi"
    assert paths[ids[1]] == f"{ids[1]}.mp4"
    assert paths[ids[4]] == f"{ids[4]}.avi"
    assert paths[ids[5]] == f"{ids[5]}.flv"
    assert paths[ids[6]] == f"{ids[6]}.avi"
    assert paths[ids[2]] == f"clips/{ids[2]}.avi"
    assert paths[ids[3]] == f"{ids[3]}.avi"  # missing: default path, no error
    assert len(walk_calls) == 1  # one index for the whole call


# --------------------------------------------------------------------------- didemo


def test_didemo_one_paragraph_per_video():
    raw = json.loads(DIDEMO.read_text())
    caps = read_annotations([DIDEMO], None, NO_VIDEOS)
    videos = list(dict.fromkeys(a["video"] for a in raw))
    assert len(raw) == 98 and len(caps) == 22
    assert [c.video_id for c in caps] == videos
    for cap in caps:
        assert cap.text == " ".join(a["description"].strip() for a in raw if a["video"] == cap.video_id)
        assert "  " not in cap.text and cap.text == cap.text.strip()
    assert caps[0].text == ("someone kicks the bug towards some rocks. a man in a red shirt stomps on a centipede. "
                            "man in white shirt is seen close up of a millipede on the rocks "
                            "first time foot swipes at wiggly thing")
    assert "58792004@N06_8544469262_fd25eddb2e." in videos


def test_didemo_split_list_orders_and_filters(tmp_path):
    lst = tmp_path / "test_list.txt"
    lst.write_text("14036428@N00_7482897120_5db275b0dc.avi\n33439178@N00_12280528136_b1d8fa292c\n")
    caps = read_annotations([DIDEMO, lst], "didemo", NO_VIDEOS)
    assert [c.video_id for c in caps] == ["14036428@N00_7482897120_5db275b0dc.avi",
                                          "33439178@N00_12280528136_b1d8fa292c.mts"]
    shutil.copy(DIDEMO, tmp_path / "test_data.json")  # the list alone finds <split>_data.json
    assert read_annotations([lst], None, NO_VIDEOS) == caps
    lst.write_text("nobody@N00_1_a.mov\n")
    with pytest.raises(AnnotationError, match="nobody@N00_1_a.mov") as e:
        read_annotations([DIDEMO, lst], "didemo", NO_VIDEOS)
    assert str(lst) in str(e.value) and str(DIDEMO) in str(e.value)


def test_didemo_resolves_odd_extensions(tmp_path, walk_calls):
    root = tmp_path / "videos"
    touch(root, "58792004@N06_8544469262_fd25eddb2e.",  # empty extension, as named in the json
          "33439178@N00_12280528136_b1d8fa292c.mts",
          "26292851@N04_4253489686_265c3c8051.m4v.mp4",  # converted copy keeping the old extension
          "59972430@N00_7646117928_a93152aa0f.mp4")  # converted copy replacing it
    paths = {c.video_id: c.video_path for c in read_annotations([DIDEMO], "didemo", root)}
    assert paths["58792004@N06_8544469262_fd25eddb2e."] == "58792004@N06_8544469262_fd25eddb2e."
    assert paths["33439178@N00_12280528136_b1d8fa292c.mts"] == "33439178@N00_12280528136_b1d8fa292c.mts"
    assert paths["26292851@N04_4253489686_265c3c8051.m4v"] == "26292851@N04_4253489686_265c3c8051.m4v.mp4"
    assert paths["59972430@N00_7646117928_a93152aa0f.wmv"] == "59972430@N00_7646117928_a93152aa0f.mp4"
    assert paths["14036428@N00_7482897120_5db275b0dc.avi"] == "14036428@N00_7482897120_5db275b0dc.avi"


def test_didemo_empty_extension_converted_to_mp4(tmp_path):
    root = tmp_path / "videos"
    touch(root, "58792004@N06_8544469262_fd25eddb2e.mp4")
    caps = read_annotations([DIDEMO], "didemo", root)
    assert {c.video_path for c in caps} >= {"58792004@N06_8544469262_fd25eddb2e.mp4"}


# --------------------------------------------------------------------------- activitynet


def test_activitynet_paragraphs():
    raw = json.loads(ANET.read_text())
    caps = read_annotations([ANET], None, NO_VIDEOS)
    assert len(caps) == 100 and sum(len(v["sentences"]) for v in raw.values()) == 371
    assert [c.video_id for c in caps] == list(raw)
    assert caps[0] == Caption("v_uqiMw7tQ1Cc", "v_uqiMw7tQ1Cc.mp4", "A weight lifting tutorial is given. The coach "
                              "helps the guy in red with the proper body placement and lifting technique.")
    for cap in caps:
        assert cap.text == " ".join(s.strip() for s in raw[cap.video_id]["sentences"])
        assert cap.text == cap.text.strip()
    # the real file has leading spaces on most sentences, and one sentence with an inner double space
    assert sum(s.startswith(" ") for v in raw.values() for s in v["sentences"]) > 200


def test_activitynet_resolves_with_and_without_prefix(tmp_path, walk_calls):
    root = tmp_path / "videos"
    touch(root, "v_uqiMw7tQ1Cc.mkv", "bXdq2zI1Ms0.mp4", "val/FsS_NCZEfaI.webm")
    paths = [c.video_path for c in read_annotations([ANET], "activitynet", root)[:4]]
    assert paths[:3] == ["v_uqiMw7tQ1Cc.mkv", "bXdq2zI1Ms0.mp4", "val/FsS_NCZEfaI.webm"]
    assert paths[3].startswith("v_") and paths[3].endswith(".mp4")
    assert len(walk_calls) == 1


def test_activitynet_bad_sentences_names_key(tmp_path):
    bad = tmp_path / "val_1.json"
    bad.write_text(json.dumps({"v_a": {"duration": 1.0, "timestamps": [[0, 1]], "sentences": "oops"}}))
    with pytest.raises(AnnotationError, match=r"'v_a'\.sentences"):
        read_annotations([bad], "activitynet", NO_VIDEOS)


# --------------------------------------------------------------------------- lsmdc

LSMDC_CLIPS = ["0001_American_Beauty_00.00.51.926-00.00.54.129", "0001_American_Beauty_00.00.56.224-00.00.58.893",
               "1012_Unbreakable_00.01.02.003-00.01.04.500"]


def _lsmdc_file(path: Path, extra: str = "") -> Path:
    lines = [f"{clip}\t00.00.51.926\t00.00.54.129\t00.00.51.900\t00.00.54.200\t  SOMEONE looks up {i}. "
             for i, clip in enumerate(LSMDC_CLIPS)]
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def test_lsmdc_synthetic_and_movie_folders(tmp_path, walk_calls):
    root = tmp_path / "videos"
    touch(root, f"0001_American_Beauty/{LSMDC_CLIPS[0]}.avi", f"{LSMDC_CLIPS[1]}.avi")
    caps = read_annotations([_lsmdc_file(tmp_path / "LSMDC16_annos_test.csv")], None, root)
    assert [c.video_id for c in caps] == LSMDC_CLIPS
    assert [c.text for c in caps] == [f"SOMEONE looks up {i}." for i in range(3)]
    assert caps[0].video_path == f"0001_American_Beauty/{LSMDC_CLIPS[0]}.avi"
    assert caps[1].video_path == f"{LSMDC_CLIPS[1]}.avi"
    assert caps[2].video_path == f"1012_Unbreakable/{LSMDC_CLIPS[2]}.avi"  # missing: default layout


def test_lsmdc_found_by_walking_once(tmp_path, walk_calls):
    root = tmp_path / "videos"
    touch(root, *(f"avi/part{i}/{clip}.avi" for i, clip in enumerate(LSMDC_CLIPS)))
    caps = read_annotations([_lsmdc_file(tmp_path / "a.tsv")], "lsmdc", root)
    assert [c.video_path for c in caps] == [f"avi/part{i}/{clip}.avi" for i, clip in enumerate(LSMDC_CLIPS)]
    assert len(walk_calls) == 1


def test_lsmdc_bad_line_names_line_number(tmp_path):
    bad = _lsmdc_file(tmp_path / "bad.csv", extra="\n0002_Movie_00.00.01.000-00.00.02.000\tonly two\n")
    with pytest.raises(AnnotationError, match=r"bad\.csv: line 5: 2 tab-separated columns"):
        read_annotations([bad], "lsmdc", NO_VIDEOS)


# --------------------------------------------------------------------------- jsonl / csv


def test_jsonl_reads_and_defaults_video_id(tmp_path):
    f = tmp_path / "caps.jsonl"
    f.write_text('{"video": "sub/a.mp4", "caption": " a dog runs "}\n\n'
                 '{"video": "b.webm", "caption": "x", "video_id": "vid-b"}\n')
    caps = read_annotations([f], None, NO_VIDEOS)
    assert caps == [Caption("sub/a", "sub/a.mp4", "a dog runs"), Caption("vid-b", "b.webm", "x")]


@pytest.mark.parametrize("line, pattern", [
    ('{"video": "a.mp4", "caption": ', r"line 2: invalid JSON"),
    ('{"video": "a.mp4"}', r"line 2, field 'caption'.*got nothing"),
    ('{"video": "", "caption": "c"}', r"line 2, field 'video'.*empty string"),
    ('{"video": 3, "caption": "c"}', r"line 2, field 'video'.*int"),
    ('["a.mp4", "c"]', r"line 2: expected a JSON object"),
])
def test_jsonl_errors_name_file_line_field(tmp_path, line, pattern):
    f = tmp_path / "caps.jsonl"
    f.write_text('{"video": "ok.mp4", "caption": "fine"}\n' + line + "\n")
    with pytest.raises(AnnotationError, match=r"caps\.jsonl: " + pattern):
        read_annotations([f], "jsonl", NO_VIDEOS)


def test_csv_quoted_commas_and_optional_video_id(tmp_path):
    f = tmp_path / "caps.csv"
    f.write_text('video,caption,video_id\nclips/a.mp4,"a man, a dog",\nb.avi,plain,B\n')
    caps = read_annotations([f], None, NO_VIDEOS)
    assert caps == [Caption("clips/a", "clips/a.mp4", "a man, a dog"), Caption("B", "b.avi", "plain")]


def test_csv_errors(tmp_path):
    f = tmp_path / "caps.csv"
    f.write_text("path,text\na.mp4,x\n")
    with pytest.raises(AnnotationError, match=r"caps\.csv: line 1: header 'path,text' lacks column\(s\) video, capt"):
        read_annotations([f], "csv", NO_VIDEOS)
    f.write_text("video,caption\na.mp4,x\nb.mp4,\n")
    with pytest.raises(AnnotationError, match=r"caps\.csv: line 3, field 'caption'"):
        read_annotations([f], "csv", NO_VIDEOS)


def test_jsonl_paths_used_exactly_as_given(tmp_path, walk_calls):
    f = tmp_path / "caps.jsonl"
    f.write_text('{"video": "missing/x.mkv", "caption": "c"}\n')
    root = tmp_path / "videos"
    touch(root, "x.mp4")
    assert read_annotations([f], "jsonl", root)[0].video_path == "missing/x.mkv"
    assert walk_calls == []


# --------------------------------------------------------------------------- resolution / misc


def test_no_walk_when_every_video_is_found_directly(tmp_path, walk_calls):
    root = tmp_path / "videos"
    touch(root, *(f"{i}.avi" for i in MSVD_TEST.read_text().split()))
    caps = read_annotations([MSVD_TEST], "msvd", root)
    assert all((root / c.video_path).is_file() for c in caps)
    assert walk_calls == []


def test_missing_videos_are_returned_and_logged(tmp_path, caplog):
    root = tmp_path / "empty"
    root.mkdir()
    with caplog.at_level(logging.WARNING, logger=ann.__name__):
        caps = read_annotations([ANET], "activitynet", root)
    assert len(caps) == 100 and caps[5].video_path == f"{caps[5].video_id}.mp4"
    assert "100 video(s) not found" in caplog.text


@pytest.mark.parametrize("path, fmt", [
    (JSFUSION, "msrvtt"), (TRAIN_9K, "msrvtt"), (TRAIN_7K, "msrvtt"),
    (MSVD_JSON, "msvd"), (MSVD_TEST, "msvd"), (DATA / "msvd" / "train_list.txt", "msvd"),
    (DIDEMO, "didemo"), (ANET, "activitynet"),
])
def test_guess_format_real_files(path, fmt):
    assert guess_format([path]) == fmt


def test_guess_format_other_files(tmp_path):
    (tmp_path / "a.jsonl").write_text("{}\n")
    (tmp_path / "b.csv").write_text("video,caption,video_id\n")
    (tmp_path / "c.txt").write_text("clip\t1\t2\t3\t4\tsentence\n")
    (tmp_path / "raw-captions.pkl").write_bytes(pickle.dumps({}))
    shutil.copy(DIDEMO, tmp_path / "val_data.json")
    (tmp_path / "val_list.txt").write_text("x.mov\n")
    (tmp_path / "renamed.json").write_text(ANET.read_text())
    expected = {"a.jsonl": "jsonl", "b.csv": "csv", "c.txt": "lsmdc", "raw-captions.pkl": "msvd",
                "renamed.json": "activitynet"}
    assert {name: guess_format([tmp_path / name]) for name in expected} == expected
    didemo = tmp_path / "didemo"
    didemo.mkdir()
    shutil.copy(DIDEMO, didemo / "val_data.json")
    (didemo / "val_list.txt").write_text("x.mov\n")
    assert guess_format([didemo / "val_list.txt"]) == "didemo"
    assert guess_format([didemo / "val_list.txt", DIDEMO]) == "didemo"


def test_guess_format_unknown_or_mixed(tmp_path):
    odd = tmp_path / "notes.txt"
    odd.write_text("hello\n")
    with pytest.raises(AnnotationError, match="--format") as e:
        guess_format([odd])
    assert all(f in str(e.value) for f in FORMATS) and str(odd) in str(e.value)
    with pytest.raises(AnnotationError, match="disagree"):
        guess_format([DIDEMO, ANET])


def test_read_annotations_input_errors(tmp_path):
    with pytest.raises(AnnotationError, match="not found"):
        read_annotations([tmp_path / "nope.json"], None, NO_VIDEOS)
    with pytest.raises(AnnotationError, match="unknown format 'youcook'"):
        read_annotations([ANET], "youcook", NO_VIDEOS)
    broken = tmp_path / "val_1.json"
    broken.write_text('{"v_a": {"sentences": ["x"],\n')
    with pytest.raises(AnnotationError, match=r"val_1\.json: line 2: invalid JSON"):
        read_annotations([broken], "activitynet", NO_VIDEOS)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_one_video_id_for_two_files_is_refused_naming_both_lines(tmp_path, suffix):
    """Otherwise extract keeps one video and attaches the other's captions to it."""
    if suffix == ".jsonl":
        lines = ['{"video": "a.mp4", "caption": "one", "video_id": "v1"}',
                 '{"video": "b.mp4", "caption": "two", "video_id": "v2"}',
                 '{"video": "c.mp4", "caption": "three", "video_id": "v1"}']
    else:
        lines = ["video,caption,video_id", "a.mp4,one,v1", "b.mp4,two,v2", "c.mp4,three,v1"]
    path = tmp_path / f"ann{suffix}"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(AnnotationError) as error:
        read_annotations([path], None, tmp_path)
    message = str(error.value)
    assert "'v1'" in message and "'c.mp4'" in message and "'a.mp4'" in message
    line_first, line_again = (1, 3) if suffix == ".jsonl" else (2, 4)
    assert f"line {line_again}" in message and f"line {line_first}" in message
    lines[-1] = lines[-1].replace("c.mp4", "a.mp4")  # the same file twice is fine (two captions)
    path.write_text("\n".join(lines) + "\n")
    assert len(read_annotations([path], None, tmp_path)) == 3
