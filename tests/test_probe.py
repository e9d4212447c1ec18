"""toy/probe.py: the linear probe, and what the shipped toy encoders' tokens carry of the detail glyph."""

from __future__ import annotations

import numpy as np
import pytest

from tvrerank.extract.models import SHIPPED_WEIGHTS
from tvrerank.toy.probe import TARGETS, detail_probe, format_probe, linear_probe_accuracy, probe_frames
from tvrerank.toy.world import TOY_GRID


def test_the_probe_reads_a_linearly_coded_label_and_not_noise():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, 900)
    codes = rng.normal(size=(6, 32))
    coded = codes[labels] + rng.normal(scale=1.0, size=(900, 32))
    noise = rng.normal(size=(900, 32))
    assert linear_probe_accuracy(coded[:600], labels[:600], coded[600:], labels[600:], classes=6) > 0.95
    assert abs(linear_probe_accuracy(noise[:600], labels[:600], noise[600:], labels[600:], classes=6) - 1 / 6) < 0.07


def test_probe_frames_name_where_the_glyph_is():
    data = probe_frames(40, image_size=64, seed=1)
    assert data.frames.shape == (40, 64, 64, 3)
    assert {len(p) for p in data.detail_patches} <= {1, 2}
    for patches, other in zip(data.detail_patches, data.other_patch):
        assert other not in patches and 0 <= other < TOY_GRID[0] * TOY_GRID[1]
    for target, classes in TARGETS.items():
        assert set(data.labels[target]) <= set(range(len(classes)))


def encoder_of(tag: str):
    from tvrerank.extract.encoder import FrozenClipEncoder

    return FrozenClipEncoder(model="tvr-toy", pretrained=tag, device="cpu")


@pytest.mark.skipif(not SHIPPED_WEIGHTS[("tvr-toy", "toy-detail")].is_file(), reason="detail-world weights not built")
def test_the_detail_worlds_encoder_keeps_the_glyph_in_its_patch_tokens_and_not_in_its_frame_embedding():
    weights = SHIPPED_WEIGHTS[("tvr-toy", "toy-detail")]
    assert weights.stat().st_size <= 10 * 2**20
    result = detail_probe(encoder_of("toy-detail"), count=1500)
    print(format_probe(result))
    for target, chance in result["chance"].items():
        assert result["detail patch"][target] >= 0.8, (target, result)
        assert result["global"][target] <= chance + 0.1, (target, result)
        assert result["other patch"][target] <= chance + 0.1, (target, result)


def test_a_cache_probe_reads_the_glyph_where_the_ground_truth_puts_it(tmp_path):
    """On a detail world's cache (random toy weights, pixel-level tokens still differ where the glyph is):
    the frames probed are the ones the truth names, and a probe of the glyph's patch beats one of a
    patch without it."""
    from click.testing import CliRunner

    from tvrerank.cache.reader import CacheReader
    from tvrerank.cache.truth import read_truth
    from tvrerank.cli import main
    from tvrerank.toy.probe import cache_probe

    runner = CliRunner()
    world, cache = tmp_path / "world", tmp_path / "c.h5"
    for args in (["toy", "make", "--out", world, "--videos", 160, "--world", "detail"],
                 ["extract", "--annotations", world / "train.jsonl", "--videos", world, "--model", "tvr-toy",
                  "--pretrained", "toy", "--out", cache, "--frames", 12, "--workers", 0, "--device", "cpu", "--quiet"],
                 ["toy", "truth", world, cache]):
        result = runner.invoke(main, [str(a) for a in args])
        assert result.exit_code == 0, result.output
    result = cache_probe(cache, world)
    with CacheReader(cache) as reader:
        assert result["frames"] == int(read_truth(reader).detail_frames().sum())
    assert result["detail patch"]["colour"] > result["other patch"]["colour"] + 0.3, result
    output = runner.invoke(main, ["toy", "probe", "--cache", str(cache), "--world", str(world)]).output
    assert "detail patch" in output and "global" in output
