"""cache/compact.py: ``cache compact`` gives what extracting with the same encoding gives, part by part,
resumable, and refuses a damaged source."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_dataset
from test_checksums import flip_chunk
from test_runner import ARRAYS, config_for, read_arrays

from tvrerank.cache.compact import compact_cache
from tvrerank.cache.encoding import decode_tokens
from tvrerank.cache.inspect import check_cache
from tvrerank.cache.schema import CacheHeader
from tvrerank.cache.writer import PartStore, PlanMismatch
from tvrerank.cli import main
from tvrerank.errors import CorruptFile, InputError
from tvrerank.extract.runner import run_extraction

SCALES = ("videos/token_scale", "texts/token_scale")


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """The test clips extracted as float16, int8 and pooled float16 (annotations, {name: cache})."""
    root = tmp_path_factory.mktemp("compact")
    annotations = make_dataset(root / "data", num_videos=6)
    caches = {}
    for name, options in {"float16": {}, "int8": {"token_dtype": "int8"}, "float8": {"token_dtype": "float8"},
                          "pool2": {"token_pool": "2x2"}, "int8-pool2": {"token_dtype": "int8", "token_pool": "2x2"}
                          }.items():
        caches[name] = root / f"{name}.h5"
        run_extraction(config_for(annotations, caches[name], **options), progress=False)
    return annotations, caches


def header(path) -> CacheHeader:
    with h5py.File(path, "r") as f:
        return CacheHeader.from_attrs(f.attrs)


def decoded(path, name: str) -> torch.Tensor:
    with h5py.File(path, "r") as f:
        scale = name.replace("tokens", "token_scale")
        return decode_tokens(torch.from_numpy(f[name][()]), torch.from_numpy(f[scale][()]) if scale in f else None)


@pytest.mark.parametrize("token_dtype", ["int8", "float8"])
def test_compacting_gives_the_arrays_extraction_with_that_encoding_gives(extracted, tmp_path, token_dtype):
    _, caches = extracted
    out = compact_cache(caches["float16"], tmp_path / "c.h5", token_dtype=token_dtype, progress=False,
                        part_bytes=1)  # one video a part: several parts, captions split with their videos
    assert check_cache(out) == []
    assert header(out).fingerprint() == header(caches[token_dtype]).fingerprint()
    same, made = read_arrays(caches[token_dtype]), read_arrays(out)
    for name in ARRAYS:
        np.testing.assert_array_equal(made[name], same[name], err_msg=name)
    with h5py.File(out, "r") as f, h5py.File(caches[token_dtype], "r") as g:
        for name in SCALES:
            np.testing.assert_array_equal(f[name][()], g[name][()], err_msg=name)
    assert not PartStore(out).folder.exists()


def test_pooling_stored_tokens_gives_what_extraction_pools(extracted, tmp_path):
    _, caches = extracted
    pooled = compact_cache(caches["float16"], tmp_path / "p.h5", token_dtype="float16", pool="2x2", progress=False)
    assert header(pooled).fingerprint() == header(caches["pool2"]).fingerprint()  # grid 4x4 -> 2x2 in the layout
    np.testing.assert_allclose(decoded(pooled, "videos/tokens"), decoded(caches["pool2"], "videos/tokens"),
                               atol=2e-3)  # pooled from float16 values instead of float32 ones
    both = compact_cache(caches["float16"], tmp_path / "q.h5", token_dtype="int8", pool="2x2", progress=False)
    assert check_cache(both) == [] and header(both).fingerprint() == header(caches["int8-pool2"]).fingerprint()
    a, b = decoded(both, "videos/tokens"), decoded(caches["int8-pool2"], "videos/tokens")
    real = b.abs().amax(-1) > 0
    assert torch.nn.functional.cosine_similarity(a[real], b[real], dim=-1).min() > 0.999


def test_a_killed_compaction_resumes_to_the_same_file(extracted, tmp_path, monkeypatch):
    _, caches = extracted
    whole = compact_cache(caches["float16"], tmp_path / "whole.h5", progress=False, part_bytes=1)
    out, write, calls = tmp_path / "c.h5", PartStore.write, []

    def dies_at_the_third_part(self, index, part):
        calls.append(index)
        if len(calls) == 3:
            raise KeyboardInterrupt
        write(self, index, part)

    monkeypatch.setattr(PartStore, "write", dies_at_the_third_part)
    with pytest.raises(KeyboardInterrupt):
        compact_cache(caches["float16"], out, progress=False, part_bytes=1)
    videos = len(read_arrays(whole)["videos/id"])
    assert not out.exists() and PartStore(out).finished(videos) == {0, 1}
    monkeypatch.setattr(PartStore, "write", write)
    written = []
    monkeypatch.setattr(PartStore, "write", lambda self, index, part: (written.append(index), write(self, index, part)))
    compact_cache(caches["float16"], out, progress=False, part_bytes=1)
    assert written == list(range(2, videos))  # the two finished parts are not done again
    for name in ARRAYS:
        np.testing.assert_array_equal(read_arrays(out)[name], read_arrays(whole)[name], err_msg=name)
    calls.clear()
    monkeypatch.setattr(PartStore, "write", dies_at_the_third_part)
    with pytest.raises(KeyboardInterrupt):
        compact_cache(caches["float16"], tmp_path / "d.h5", progress=False, part_bytes=1)
    with pytest.raises(PlanMismatch, match=r"other settings \(layout\).*--overwrite"):  # resumed with another encoding
        compact_cache(caches["float16"], tmp_path / "d.h5", token_dtype="float8", progress=False, part_bytes=1)


def test_a_damaged_source_stops_the_run_naming_it(extracted, tmp_path):
    _, caches = extracted
    source = tmp_path / "damaged.h5"
    source.write_bytes(caches["float16"].read_bytes())
    flip_chunk(source, "videos/tokens", 3)
    with pytest.raises(CorruptFile, match=r"damaged\.h5: videos/tokens holds damaged bytes"):
        compact_cache(source, tmp_path / "c.h5", progress=False)
    assert not (tmp_path / "c.h5").exists()


def test_what_cannot_or_need_not_be_done_is_refused(extracted, tmp_path):
    _, caches = extracted
    with pytest.raises(InputError, match="nothing to compact"):
        compact_cache(caches["int8"], tmp_path / "c.h5", token_dtype="int8")
    with pytest.raises(InputError, match="pooling cannot be undone"):
        compact_cache(caches["pool2"], tmp_path / "c.h5", token_dtype="int8", pool="none")
    with pytest.raises(InputError, match="is the source cache itself"):
        compact_cache(caches["float16"], caches["float16"], token_dtype="int8")
    assert not (tmp_path / "c.h5").exists()


def test_cache_compact_command(extracted, tmp_path):
    _, caches = extracted
    result = CliRunner().invoke(main, ["cache", "compact", str(caches["float16"]), "--out", str(tmp_path / "c.h5"),
                                       "--pool", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "c.h5:" in result.output and "tokens int8" in result.output
    assert header(tmp_path / "c.h5").layout.grid == (2, 2)
    result = CliRunner().invoke(main, ["cache", "compact", str(caches["int8"]), "--out", str(tmp_path / "d.h5")])
    assert result.exit_code == 2 and "nothing to compact" in result.output
