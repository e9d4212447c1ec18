"""The extraction run: failures recorded, kill-and-resume, shards and torchrun, all equal to one plain run."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import BROKEN, TINY_VIT, make_dataset

from tvrerank.cache.inspect import check_cache
from tvrerank.cache.merge import join_caches, merge_shards
from tvrerank.cache.schema import FAILED, OK, CacheHeader
from tvrerank.cache.writer import PartStore, PlanMismatch
from tvrerank.config import ExtractConfig
from tvrerank.errors import CacheMismatch
from tvrerank.extract.annotations import AnnotationError, Caption
from tvrerank.extract.runner import ExtractionError, VideoTable, run_extraction, shard_path

ARRAYS = ("videos/id", "videos/path", "videos/status", "videos/error", "videos/frame_mask",
          "videos/frame_emb", "videos/video_emb", "videos/tokens", "texts/caption", "texts/video",
          "texts/emb", "texts/tokens", "texts/length")


def config_for(annotations: Path, out: Path, **overrides) -> ExtractConfig:
    base = ExtractConfig(annotations=(str(annotations),), format="jsonl", videos=str(annotations.parent),
                         out=str(out), model=str(TINY_VIT), frames=4, batch_size=8, workers=0,
                         device="cpu", part_videos=2)
    return replace(base, **overrides)


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {name: f[name].asstr()[()] if h5py.check_string_dtype(f[name].dtype) else f[name][()]
                for name in ARRAYS}


def assert_same_arrays(a: Path, b: Path) -> None:
    left, right = read_arrays(a), read_arrays(b)
    for name in ARRAYS:
        np.testing.assert_array_equal(left[name], right[name], err_msg=name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted, unsharded run that the other runs must reproduce exactly."""
    root = tmp_path_factory.mktemp("ref")
    annotations = make_dataset(root / "data", num_videos=6)
    out = root / "ref.h5"
    summary = run_extraction(config_for(annotations, out), progress=False)
    return annotations, out, summary


def test_video_table_groups_captions_by_video_and_shards_contiguously():
    captions = [Caption("b", "b.mp4", "b1"), Caption("a", "a.mp4", "a1"), Caption("b", "b.mp4", "b2"),
                Caption("c", "c.mp4", "c1")]
    table = VideoTable.from_captions(captions)
    assert table.video_ids == ["b", "a", "c"]
    assert table.captions == ["b1", "b2", "a1", "c1"] and table.caption_video.tolist() == [0, 0, 1, 2]
    second, video_offset, caption_offset = table.shard(1, 2)
    assert second.video_ids == ["a", "c"] and second.captions == ["a1", "c1"]
    assert (video_offset, caption_offset) == (1, 2) and second.caption_video.tolist() == [0, 1]


def test_bad_videos_are_recorded_and_skipped(reference):
    _, out, summary = reference
    assert (summary.videos, summary.ok, summary.failed) == (11, 6, 5)
    assert summary.captions == 6 * 2 + 5
    arrays = read_arrays(out)
    status, errors, paths = arrays["videos/status"], arrays["videos/error"], arrays["videos/path"]
    for kind, name in BROKEN.items():
        row = list(paths).index(f"videos/{name}")
        assert status[row] == FAILED and errors[row], kind
        assert not arrays["videos/frame_mask"][row].any() and not arrays["videos/tokens"][row].any()
    assert (status[:6] == OK).all() and (errors[:6] == "").all()
    assert arrays["videos/frame_mask"][:6].all()  # 12+ frames each, 4 sampled
    norms = np.linalg.norm(arrays["videos/video_emb"][:6].astype(np.float32), axis=1)
    np.testing.assert_allclose(norms, 1, atol=2e-3)
    assert check_cache(out) == []


def test_rerun_of_a_finished_cache_is_a_no_op_and_other_settings_are_refused(reference, tmp_path):
    annotations, out, _ = reference
    copy = tmp_path / "copy.h5"
    shutil.copy(out, copy)
    again = run_extraction(config_for(annotations, copy), progress=False)
    assert again.already_done and again.ok == 6
    with pytest.raises(ExtractionError, match="made with sampling.frames 3 .this run. vs 4 .copy.h5.; pass --overwrite"):
        run_extraction(config_for(annotations, copy, frames=3), progress=False)
    with pytest.raises(ExtractionError, match="sampling.resize libswscale .this run. vs torchvision"):
        run_extraction(config_for(annotations, copy, resize="libswscale"), progress=False)
    redone = run_extraction(config_for(annotations, copy, frames=3, overwrite=True), progress=False)
    assert not redone.already_done and read_arrays(copy)["videos/frame_mask"].shape == (11, 3)


def test_an_unfinished_run_with_other_settings_is_refused(reference, tmp_path):
    annotations, _, _ = reference
    out = tmp_path / "c.h5"
    PartStore(out).start({"something": "else"})
    with pytest.raises(PlanMismatch, match="--overwrite"):
        run_extraction(config_for(annotations, out), progress=False)


def test_an_unfinished_libswscale_run_is_refused_by_name_and_continued_with_its_resize(tmp_path, monkeypatch):
    """Parts made with the earlier resize (e.g. before the upgrade) are named as such, and
    ``--resize libswscale`` continues them into a cache that records it."""
    import json

    from tvrerank.extract import runner

    annotations = make_dataset(tmp_path / "data", num_videos=3, broken=False)
    out = tmp_path / "c.h5"

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "assemble", crash)  # killed after the parts, before the cache
    with pytest.raises(KeyboardInterrupt):
        run_extraction(config_for(annotations, out, resize="libswscale"), progress=False)
    monkeypatch.undo()
    with pytest.raises(PlanMismatch, match="sampling.resize torchvision .this run. vs libswscale .the unfinished run."):
        run_extraction(config_for(annotations, out), progress=False)
    resumed = run_extraction(config_for(annotations, out, resize="libswscale"), progress=False)
    assert resumed.resumed_parts > 0 and resumed.ok == 3
    with h5py.File(out, "r") as f:
        assert json.loads(f.attrs["sampling"])["resize"] == "libswscale"


def test_every_video_failing_raises_no_error_but_reports_zero_ok(tmp_path):
    annotations = tmp_path / "bad.jsonl"
    annotations.write_text('{"video": "nope.mp4", "caption": "gone"}\n')
    summary = run_extraction(config_for(annotations, tmp_path / "bad.h5"), progress=False)
    assert summary.ok == 0 and summary.failed == 1


def test_no_captions_is_an_error(tmp_path):
    annotations = tmp_path / "empty.jsonl"
    annotations.write_text("\n")
    with pytest.raises(AnnotationError, match="no captions"):
        run_extraction(config_for(annotations, tmp_path / "x.h5"), progress=False)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "tvrerank.cli", *args]


def _extract_args(annotations: Path, out: Path, *extra: str) -> list[str]:
    return ["extract", "--annotations", str(annotations), "--format", "jsonl", "--videos",
            str(annotations.parent), "--model", str(TINY_VIT), "--out", str(out), "--frames", "4",
            "--batch-size", "8", "--workers", "0", "--device", "cpu", "--part-videos", "1", "--quiet", *extra]


@pytest.mark.slow
def test_sigkill_then_rerun_gives_the_same_arrays(reference, tmp_path):
    annotations, ref_out, _ = reference
    out = tmp_path / "killed.h5"
    # part size 2 in the reference; here the same plan must be used to resume, so use 2 as well
    args = _extract_args(annotations, out)
    args[args.index("--part-videos") + 1] = "2"
    parts = PartStore(out)
    process = subprocess.Popen(_cli(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if parts.folder.exists() and len(list(parts.folder.glob("part-*.h5"))) >= 2:
            os.kill(process.pid, signal.SIGKILL)
            break
        time.sleep(0.002)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not out.exists(), "a killed run must not leave a final cache"
    done = len(list(parts.folder.glob("part-*.h5")))
    assert 2 <= done < 6
    resumed = subprocess.run(_cli(*args), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout and not parts.folder.exists()
    assert_same_arrays(out, ref_out)


def test_two_shards_merged_equal_one_run(reference, tmp_path):
    annotations, ref_out, _ = reference
    out = tmp_path / "sharded" / "cache.h5"
    out.parent.mkdir()
    shards = []
    for index in range(2):
        run_extraction(config_for(annotations, out, shard_index=index, shard_count=2), progress=False)
        shards.append(shard_path(out, index, 2))
    assert [p.name for p in shards] == ["cache.shard-0-of-2.h5", "cache.shard-1-of-2.h5"]
    merge_shards(list(reversed(shards)), out)  # any order
    assert_same_arrays(out, ref_out)
    with h5py.File(out, "r") as f:
        assert f["videos/tokens"].is_virtual and not f["videos/status"].is_virtual
    # the merged file maps shards by relative path: the folder can move
    moved = tmp_path / "moved"
    shutil.move(out.parent, moved)
    assert_same_arrays(moved / "cache.h5", ref_out)
    assert check_cache(moved / "cache.h5") == []
    (moved / "cache.shard-1-of-2.h5").unlink()
    assert any("missing" in p for p in check_cache(moved / "cache.h5"))


def test_merge_refuses_incomplete_or_mismatched_shards(reference, tmp_path):
    annotations, ref_out, _ = reference
    out = tmp_path / "c.h5"
    run_extraction(config_for(annotations, out, shard_index=0, shard_count=2), progress=False)
    with pytest.raises(ValueError, match="every shard"):
        merge_shards([shard_path(out, 0, 2)], tmp_path / "m.h5")
    with pytest.raises(ValueError):
        merge_shards([shard_path(out, 0, 2), ref_out], tmp_path / "m.h5")


def _split_annotations(annotations: Path, folder: Path, first_lines: int) -> tuple[Path, Path]:
    """The reference's captions in two JSONL files (its first ``first_lines`` lines, then the rest)."""
    lines = annotations.read_text().splitlines(keepends=True)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.jsonl").write_text("".join(lines[:first_lines]))
    (folder / "b.jsonl").write_text("".join(lines[first_lines:]))
    return folder / "a.jsonl", folder / "b.jsonl"


def test_two_runs_joined_equal_one_run_over_both_annotation_files(reference, tmp_path):
    annotations, ref_out, _ = reference
    a, b = _split_annotations(annotations, tmp_path / "ann", 4)  # videos v0, v1 | the rest
    caches = []
    for part in (a, b):
        caches.append(tmp_path / f"{part.stem}.h5")
        run_extraction(config_for(part, caches[-1], videos=str(annotations.parent)), progress=False)
    joined = join_caches(caches, tmp_path / "joined" / "gallery.h5")
    assert_same_arrays(joined, ref_out)
    assert check_cache(joined) == []
    with h5py.File(joined, "r") as f:
        assert f["videos/tokens"].is_virtual
        dataset = json.loads(f.attrs["dataset"])
    assert dataset["annotations"] == [str(a), str(b)] and dataset["videos_root"] == str(annotations.parent)


def test_join_refuses_repeated_ids_other_encoders_other_roots_and_merged_files(reference, tmp_path):
    annotations, ref_out, _ = reference
    a, b = _split_annotations(annotations, tmp_path / "ann", 4)
    first = tmp_path / "a.h5"
    run_extraction(config_for(a, first, videos=str(annotations.parent)), progress=False)
    with pytest.raises(ValueError, match="video id 'videos/v0' is in both"):
        join_caches([first, ref_out], tmp_path / "j.h5")
    other_frames = tmp_path / "b-frames.h5"
    run_extraction(config_for(b, other_frames, videos=str(annotations.parent), frames=2), progress=False)
    with pytest.raises(CacheMismatch, match="sampling.frames 2"):
        join_caches([first, other_frames], tmp_path / "j.h5")
    (tmp_path / "root").symlink_to(annotations.parent)
    other_root = tmp_path / "b-root.h5"
    run_extraction(config_for(b, other_root, videos=str(tmp_path / "root")), progress=False)
    with pytest.raises(ValueError, match="same --videos root"):
        join_caches([first, other_root], tmp_path / "j.h5")
    with pytest.raises(ValueError, match="itself merged"):
        join_caches([join_caches([first], tmp_path / "once.h5"), other_root], tmp_path / "j.h5")
    assert not (tmp_path / "j.h5").exists()


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(reference, tmp_path):
    annotations, ref_out, _ = reference
    out = tmp_path / "dist.h5"
    torchrun = Path(sys.executable).with_name("torchrun")
    args = _extract_args(annotations, out)
    args[args.index("--part-videos") + 1] = "2"
    command = [str(torchrun), "--nproc_per_node", "2", "--master_port", "29533", "-m", "tvrerank.cli", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert shard_path(out, 0, 2).exists() and shard_path(out, 1, 2).exists()
    assert_same_arrays(out, ref_out)


def test_a_full_disk_at_assembly_is_one_line_and_the_same_command_resumes(tmp_path, monkeypatch):
    """The free-space check before the final file: no HDF5 write ever runs out of space."""
    from click.testing import CliRunner

    from tvrerank import files
    from tvrerank.cache import writer
    from tvrerank.cli import main

    annotations = make_dataset(tmp_path / "data", num_videos=3, broken=False)
    out = tmp_path / "c.h5"
    real = files.shutil.disk_usage

    def full_when_assembling(path, needed, what):  # the parts fit; the final file does not
        files.shutil.disk_usage = (lambda p: real(p)._replace(free=1000)) if what == "the cache" else real
        try:
            return files.require_space(path, needed, what)
        finally:
            files.shutil.disk_usage = real

    monkeypatch.setattr(writer, "require_space", full_when_assembling)
    result = CliRunner().invoke(main, _extract_args(annotations, out))
    assert result.exit_code == 2 and "no space left on device writing" in result.output, result.output
    assert "run the same command again" in result.output and "Traceback" not in result.output
    assert not out.exists() and not out.with_name("c.h5.tmp").exists()
    assert PartStore(out).finished(1) == {0}  # the extracted part is kept
    monkeypatch.setattr(writer, "require_space", files.require_space)
    result = CliRunner().invoke(main, _extract_args(annotations, out))
    assert result.exit_code == 0 and "resumed" in result.output, result.output
    assert check_cache(out) == []


def test_a_real_full_disk_exits_cleanly(tmp_path):
    """On a 1 MiB tmpfs (needs root and mount): one line, exit 2, no crash at exit, no .tmp left."""
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {made.stderr.decode().strip()[:100]}")
    try:
        annotations = make_dataset(tmp_path / "data", num_videos=6, broken=False)
        command = [sys.executable, "-m", "tvrerank.cli", *_extract_args(annotations, mount / "c.h5")]
        subprocess.run(["dd", "if=/dev/zero", f"of={mount / 'filler'}", "bs=1k", "count=1000"], capture_output=True)
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, (result.returncode, result.stderr[-2000:])  # not SIGBUS/SIGSEGV
        assert "no space left on device" in result.stderr and "Traceback" not in result.stderr
        assert not (mount / "c.h5.tmp").exists() and not (mount / "c.h5").exists()
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_a_failing_batch_keeps_the_part_queued_before_it(reference, tmp_path, monkeypatch):
    """A batch that fails (here the second part's first, as an out-of-memory error would) does not lose
    the part before it, whose last batch was still queued: it is written, and the rerun matches."""
    from tvrerank.extract.encoder import FrozenClipEncoder

    annotations, ref_out, _ = reference
    out = tmp_path / "failing.h5"
    submit, calls = FrozenClipEncoder.submit_frames, []

    def failing(self, frames, **kwargs):
        calls.append(len(frames))
        if len(calls) == 2:  # parts of 2 videos x 4 frames, batch 8: one batch per part
            raise RuntimeError("CUDA out of memory (simulated)")
        return submit(self, frames, **kwargs)

    monkeypatch.setattr(FrozenClipEncoder, "submit_frames", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        run_extraction(config_for(annotations, out), progress=False)
    assert PartStore(out).finished(3) == {0}
    monkeypatch.undo()
    summary = run_extraction(config_for(annotations, out), progress=False)
    assert summary.resumed_parts == 1 and summary.device_seconds == 0.0  # no CUDA events on the CPU
    assert_same_arrays(out, ref_out)




BEFORE_THE_SPLIT = Path(__file__).parent / "data" / "extraction"  # make_reference.py, run by the code of 3085ac9
HEADER = ("schema", "encoder", "sampling")  # not the run's paths or date; the layout as read (a field since)


@pytest.mark.parametrize("name, changes", [("default", {}),
                                           ("pooled-libswscale", {"token_pool": "2x2", "resize": "libswscale"})])
def test_extraction_matches_the_code_before_it_was_split(name, changes, tmp_path):
    """Reader, mapper and writer give the caches the single runner gave: every integer, string and
    header field exactly; float tokens and embeddings bit for bit on one machine, within a float16
    step across machines (whose float kernels differ in the last bits)."""
    annotations = make_dataset(tmp_path / "data", num_videos=6)
    out = tmp_path / "now.h5"
    run_extraction(replace(config_for(annotations, out), **changes), progress=False)
    before, now = read_arrays(BEFORE_THE_SPLIT / f"{name}.h5"), read_arrays(out)
    for arrays in (before, now):  # the messages name the clips' folder, a temporary one in each run
        arrays["videos/error"] = np.array([re.sub(r"/[^\s']*/data/", "DATA/", e) for e in arrays["videos/error"]])
    for array in ARRAYS:
        if before[array].dtype.kind == "f":
            np.testing.assert_allclose(now[array], before[array], rtol=2e-3, atol=2e-3, err_msg=array)
        else:
            np.testing.assert_array_equal(now[array], before[array], err_msg=array)
    with h5py.File(BEFORE_THE_SPLIT / f"{name}.h5", "r") as f, h5py.File(out, "r") as g:
        assert {key: f.attrs[key] for key in HEADER} == {key: g.attrs[key] for key in HEADER}
        before_header, now_header = CacheHeader.from_attrs(f.attrs), CacheHeader.from_attrs(g.attrs)
        assert (before_header.layout, before_header.fingerprint()) == (now_header.layout, now_header.fingerprint())
        strings_before, strings_now = (json.loads(h.attrs["strings_sha256"]) for h in (f, g))
        del strings_before["videos/error"], strings_now["videos/error"]  # the folder again, checked above
        assert strings_before == strings_now


@pytest.mark.parametrize("token_dtype", ["int8", "float8"])
def test_8bit_extraction_stores_codes_and_scales_that_decode_to_the_float16_tokens(reference, tmp_path, token_dtype):
    """--token-dtype: the tokens as 8-bit codes with a scale per token (the rest of the cache unchanged),
    sound for `cache check`, the same from two merged shards, and decoding close to the float16 run's."""
    import torch

    from tvrerank.cache.encoding import decode_tokens

    annotations, ref_out, _ = reference
    out = tmp_path / "c.h5"
    run_extraction(config_for(annotations, out, token_dtype=token_dtype), progress=False)
    assert check_cache(out) == []
    before, now = read_arrays(ref_out), read_arrays(out)
    for array in ARRAYS:
        if array not in ("videos/tokens", "texts/tokens"):
            np.testing.assert_array_equal(now[array], before[array], err_msg=array)
    with h5py.File(out, "r") as f:
        assert CacheHeader.from_attrs(f.attrs).layout.token_dtype == token_dtype
        for group in ("videos", "texts"):
            codes, scale = f[f"{group}/tokens"][()], f[f"{group}/token_scale"][()]
            assert codes.dtype == (np.int8 if token_dtype == "int8" else np.uint8)
            decoded = decode_tokens(torch.from_numpy(codes), torch.from_numpy(scale))
            reference_tokens = torch.from_numpy(before[f"{group}/tokens"]).float()
            real = reference_tokens.abs().amax(-1) > 0  # padded frames are zero in both
            if group == "texts":  # caption positions past the length: zero in 8-bit caches, and compressed
                real = torch.arange(codes.shape[1])[None, :] < torch.from_numpy(before["texts/length"])[:, None]
                assert f["texts/tokens"].compression == "lzf" and f["texts/tokens"].fletcher32
            cosine = torch.nn.functional.cosine_similarity(decoded[real], reference_tokens[real], dim=-1)
            assert cosine.min() > 0.99 and not decoded[~real].any(), (group, cosine.min())
    sharded = tmp_path / "sharded.h5"
    for index in range(2):
        run_extraction(config_for(annotations, sharded, shard_index=index, shard_count=2, token_dtype=token_dtype),
                       progress=False)
    merge_shards([shard_path(sharded, index, 2) for index in range(2)], sharded)
    with h5py.File(out, "r") as f, h5py.File(sharded, "r") as g:
        for name in ("videos/tokens", "videos/token_scale", "texts/tokens", "texts/token_scale"):
            np.testing.assert_array_equal(f[name][()], g[name][()], err_msg=name)
