"""extract/plan.py: cache sizes from a model's config, for every token encoding and pool, without weights."""

from __future__ import annotations

import logging

import pytest
from conftest import TINY_TIMM, TINY_VIT, TINY_VIT_ODD

from tvrerank.extract.plan import _meta_layout, layout_from_config, measure_layout, plan_cache, plan_every_option
from tvrerank.extract.models import resolve_model_config


@pytest.mark.parametrize("model", [str(TINY_VIT), str(TINY_VIT_ODD), "ViT-B-32"])
@pytest.mark.parametrize("space", ["joint", "raw"])
def test_the_config_alone_gives_what_a_meta_forward_measures(model, space):
    _, config = resolve_model_config(model)
    assert layout_from_config(config, space) == _meta_layout(model, space)


def test_towers_the_config_does_not_describe_are_measured(caplog):
    _, config = resolve_model_config(str(TINY_TIMM))
    assert layout_from_config(config) is None
    with caplog.at_level(logging.WARNING):
        dims = measure_layout(str(TINY_TIMM), "joint", "2x2")
    assert dims["grid"] == (7, 7) and dims["tokens_per_frame"] == 49  # 14x14 pooled, a partial edge window
    assert not [r for r in caplog.records if "pretrained" in r.getMessage()]  # no random-weights warning


def test_pooled_grids_round_up_like_the_encoder():
    assert measure_layout(str(TINY_VIT_ODD), "joint", "2x2")["grid"] == (3, 3)  # 5x5 → 3x3


def test_sizes_follow_the_schema_for_every_encoding():
    plans = {(p.token_dtype, p.pool): p for p in plan_every_option("ViT-B-32", 1000, captions=3000)}
    assert len(plans) == 6
    f16, i8, f8 = (plans[(d, "none")] for d in ("float16", "int8", "float8"))
    assert f16.bytes_tokens == 1000 * 12 * 49 * 512 * 2
    assert i8.bytes_tokens == f8.bytes_tokens == 1000 * 12 * 49 * (512 + 2)  # a float16 scale per token
    assert i8.bytes_text == 3000 * (512 * 2 + 32 * (512 + 2) + 2 + 4)  # emb, tokens + scales, length, video
    assert plans[("int8", "2x2")].tokens_per_frame == 16
    assert plans[("int8", "2x2")].bytes_tokens == 1000 * 12 * 16 * (512 + 2)
    held = 1000 * 12 * (49 * (512 + 2) + 512 * 2 + 1) + 3000 * (32 * (512 + 2) + 2)
    assert i8.bytes_in_memory == held  # tokens, scales, frame embeddings, masks; caption tokens, scales, lengths
    assert plan_cache("ViT-B-32", 1000, captions=3000, token_dtype="int8") == i8


def test_8bit_caption_tokens_cost_their_real_length():
    full = plan_cache("ViT-B-32", 1000, captions=3000, token_dtype="int8")
    short = plan_cache("ViT-B-32", 1000, captions=3000, token_dtype="int8", caption_tokens=8)
    assert full.bytes_text - short.bytes_text == 3000 * (32 - 8) * 512  # the padding, compressed away
    assert short.bytes_in_memory == full.bytes_in_memory  # held decompressed
    f16 = plan_cache("ViT-B-32", 1000, captions=3000, caption_tokens=8)
    assert f16 == plan_cache("ViT-B-32", 1000, captions=3000)  # float16 caches store every position
