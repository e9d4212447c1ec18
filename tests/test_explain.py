"""rerank/explain.py: the explain view's numbers are the model's own selection and attention."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_model import CONFIG, inputs

from tvrerank.rerank.explain import explain_pair
from tvrerank.rerank.model import Reranker, split_heads
from tvrerank.rerank.variants import build_reranker


def model_of(**changes) -> Reranker:
    torch.manual_seed(0)
    return build_reranker(dataclasses.replace(CONFIG, **changes)).eval()


def one_pair(video: int = 1, caption: int = 2):
    text, length, tokens, frame_emb, frame_mask, _ = inputs()
    return (text[caption : caption + 1], length[caption : caption + 1], tokens[video : video + 1],
            frame_emb[video : video + 1], frame_mask[video : video + 1])


@pytest.mark.parametrize("video", [0, 1])  # video 0 has two padded frames
def test_kept_patches_and_picks_are_the_tokens_selection_keeps(video):
    model = model_of()
    text, length, tokens, frame_emb, frame_mask = one_pair(video)
    explanation = explain_pair(model, text, length, tokens, frame_emb, frame_mask)
    selected = model.select(tokens, frame_emb, frame_mask, soft=False)
    projected = model.token_in(tokens)[0]  # (T, P, d)
    kept = torch.from_numpy(explanation.kept_patches)  # (T, M)
    assert kept.shape == (4, CONFIG.frame_keep)
    without_time = selected.frame_tokens[0, :, 1:] - model.temporal[:4, None, :]
    assert torch.allclose(without_time, projected[torch.arange(4)[:, None], kept], atol=1e-6)
    # the picks index the frame-level tokens the video selector returned, in order
    frame_level = selected.frame_tokens[0].reshape(-1, selected.frame_tokens.shape[-1])
    flat = [t * selected.frame_tokens.shape[2] + slot for t, slot in explanation.video_picks]
    assert torch.allclose(selected.video_tokens[0], frame_level[flat], atol=1e-6)
    assert explanation.video_pick_valid.tolist() == (~selected.video_pad[0]).tolist()
    assert explanation.frame_valid.tolist() == frame_mask[0].tolist()


def test_attention_is_what_the_scoring_path_applies():
    model = model_of()
    block = model.blocks[0]
    g = torch.Generator().manual_seed(1)
    queries, visual = torch.randn(3, 5, 16, generator=g), torch.randn(3, 7, 16, generator=g)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[0, 4:] = True
    keys, values = block.keys_values(visual)
    weights = block.attention(queries, keys, pad)  # (C, h, Lq, Lv)
    q = split_heads(block.q_proj(block.norm_q(queries)), block.heads)
    fused = F.scaled_dot_product_attention(q, keys, values, attn_mask=~pad[:, None, None, :])
    assert torch.allclose(weights @ values, fused, atol=1e-5)
    assert torch.all(weights[0, :, :, 4:] == 0)


def test_scores_and_weights_add_up():
    model = model_of()
    pair = one_pair(0)
    explanation = explain_pair(model, *pair)
    text, length, tokens, frame_emb, frame_mask = pair
    with torch.no_grad():
        expected = float(model(text, length, tokens, frame_emb, frame_mask, None))
    assert explanation.score == pytest.approx(expected, abs=1e-5)
    assert np.allclose(explanation.frame_attention.sum(1), 1, atol=1e-5)  # (T, F), per frame
    assert explanation.frame_weight.sum() == pytest.approx(1, abs=1e-5)
    assert np.all(explanation.frame_weight[2:] == 0)  # padded frames get no attention
    heat = explanation.patch_heat(CONFIG.tokens_per_frame)  # (T, P)
    assert np.allclose(heat.sum(1), 1 - explanation.frame_attention[:, 0], atol=1e-5)
    assert np.count_nonzero(heat[0]) == CONFIG.frame_keep


def test_every_design_explains_or_says_what_it_lacks():
    pair = one_pair()
    only_global = explain_pair(model_of(frame_tokens="global"), *pair)
    assert only_global.kept_patches.shape == (4, 0) and np.allclose(only_global.frame_attention, 1)
    assert only_global.frame_weight is not None and only_global.to_json(6)["patch_heat"] == [[0.0] * 6] * 4
    every_patch = explain_pair(model_of(frame_tokens="all"), *pair)
    assert every_patch.kept_patches.tolist() == [list(range(6))] * 4
    assert explain_pair(model_of(video_level=False), *pair).frame_weight is None
    joint = explain_pair(model_of(combine="joint"), *pair)
    assert joint.frame_attention is None and joint.frame_weight is None
