"""The re-ranker model: shapes, masks, selection properties, gradients, checkpoint round trip."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tvrerank.rerank.checkpoint import load_reranker, save_reranker
from tvrerank.rerank.model import CrossBlock, FrameTokenSelector, Reranker, RerankerConfig, SelectedVideos, top_k_weights

CONFIG = RerankerConfig(frames=4, tokens_per_frame=6, token_dim=12, embed_dim=10, text_token_dim=8, text_tokens=7,
                        width=16, heads=2, layers=1, queries=3, frame_keep=2, video_keep=5, dropout=0.0,
                        perturb_samples=16)


def inputs(videos=3, pairs=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(videos, 4, 6, 12, generator=g)
    frame_emb = torch.randn(videos, 4, 10, generator=g)
    frame_mask = torch.ones(videos, 4, dtype=torch.bool)
    frame_mask[0, 2:] = False  # video 0 has two real frames
    text = torch.randn(pairs, 7, 8, generator=g)
    length = torch.tensor([7, 3, 5, 1, 7][:pairs])
    pair_video = torch.tensor([0, 1, 2, 0, 1][:pairs])
    return text, length, tokens, frame_emb, frame_mask, pair_video


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Reranker(config=CONFIG).eval()


def test_shapes_and_masks(model):
    text, length, tokens, frame_emb, frame_mask, pair_video = inputs()
    selected = model.select(tokens, frame_emb, frame_mask)
    assert selected.frame_tokens.shape == (3, 4 * (1 + 2), 16)  # global + M per frame
    assert selected.video_tokens.shape == (3, 5, 16) and selected.video_pad.shape == (3, 5)
    assert selected.frame_pad[0].tolist() == [False] * 6 + [True] * 6  # padded frames are masked
    scores = model(text, length, tokens, frame_emb, frame_mask, pair_video)
    assert scores.shape == (5,) and torch.isfinite(scores).all()


def test_inference_top_k_is_hard_and_in_token_order():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.8], [5.0, -1.0, 4.0, 0.0]])
    weights = top_k_weights(scores, 2, training=False, samples=8, sigma=0.05)
    assert weights.tolist() == [[[0, 1, 0, 0], [0, 0, 0, 1]], [[1, 0, 0, 0], [0, 0, 1, 0]]]
    soft = top_k_weights(scores, 2, training=True, samples=64, sigma=0.05)
    assert torch.allclose(soft.sum(-1), torch.ones(2, 2)) and (soft >= 0).all()


def test_video_selector_never_picks_padded_frames(model):
    _, _, tokens, frame_emb, frame_mask, _ = inputs()
    frame_mask[1, 1:] = False  # video 1: one real frame = 3 frame-level tokens < video_keep (5)
    selected = model.select(tokens, frame_emb, frame_mask)
    assert (~selected.video_pad[0]).sum() == 5  # video 0 has 6 real tokens
    assert (~selected.video_pad[1]).sum() == 3  # only the real ones count as kept
    # selected real tokens of video 1 equal frame-level tokens of its real frame
    real = selected.frame_tokens[1, :3]
    for token in selected.video_tokens[1][~selected.video_pad[1]]:
        assert torch.isclose(real, token).all(-1).any()


def test_frame_selector_is_the_identity_when_it_keeps_everything():
    selector = FrameTokenSelector(width=8, keep=6, tokens=6, samples=4, sigma=0.05)
    assert selector.score is None  # nothing to learn either
    tokens, frame_global = torch.randn(2, 3, 6, 8), torch.randn(2, 3, 8)
    out = selector(tokens, frame_global)
    assert torch.equal(out[:, :, 1:], tokens) and torch.equal(out[:, :, 0], frame_global)


def test_every_parameter_gets_a_finite_nonzero_gradient(model):
    """timm's test_model_backward: no parameter is dead weight (the selectors' scorers included)."""
    model.train()
    model(*inputs()).sum().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, f"{name}: no gradient"
        assert torch.isfinite(parameter.grad).all(), f"{name}: non-finite gradient"
        assert parameter.grad.abs().sum() > 0, f"{name}: zero gradient"
    assert {"frame_selector.score.0.weight", "video_selector.score.0.weight"} <= dict(model.named_parameters()).keys()


def test_selection_scores_stay_float32_under_bf16_autocast(model):
    """sigma = 0.05 perturbations would round away in bf16: scores and top-k run in float32."""
    seen = []
    hook = model.frame_selector.score.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = model(*inputs())
    hook.remove()
    assert seen == [torch.float32] and torch.isfinite(scores.float()).all()


def test_scores_depend_on_the_caption_and_padding_is_ignored(model):
    text, length, tokens, frame_emb, frame_mask, pair_video = inputs()
    base = model(text, length, tokens, frame_emb, frame_mask, pair_video)
    changed = text.clone()
    changed[1, 5:] = 100.0  # beyond caption 1's length (3): ignored
    assert torch.allclose(model(changed, length, tokens, frame_emb, frame_mask, pair_video), base, atol=1e-5)
    changed[1, 0] = 100.0
    assert not torch.allclose(model(changed, length, tokens, frame_emb, frame_mask, pair_video)[1], base[1])
    tokens = tokens.clone()
    tokens[0, 3] = 50.0  # a padded frame of video 0
    assert torch.allclose(model(text, length, tokens, frame_emb, frame_mask, pair_video), base, atol=1e-5)


def test_checkpoint_round_trip_loads_with_no_flags(model, tmp_path):
    save_reranker(tmp_path, model, fusion_alpha=0.25, fingerprint={"encoder": {"model": "m"}}, step=7,
                  train_config={"steps": 7})
    loaded = load_reranker(tmp_path)
    assert loaded.model.config == CONFIG and loaded.fusion_alpha == 0.25 and loaded.step == 7
    assert torch.equal(loaded.model(*inputs()), model(*inputs()))


def test_captions_shared_by_pairs_score_as_repeated_captions(model):
    text, length, tokens, frame_emb, frame_mask, _ = inputs()
    pair_text = torch.tensor([0, 0, 0, 2, 2, 1])  # 3 captions, 6 (caption, video) pairs
    pair_video = torch.tensor([0, 1, 2, 0, 2, 1])
    shared = model(text[:3], length[:3], tokens, frame_emb, frame_mask, pair_video, pair_text)
    repeated = model(text[pair_text], length[pair_text], tokens, frame_emb, frame_mask, pair_video)
    assert torch.allclose(shared, repeated, atol=1e-5)
    selected = model.select(tokens, frame_emb, frame_mask)
    in_pair_order = SelectedVideos(*(field[pair_video] for field in selected.fields()))  # pair i is video i
    direct = model.score(text[:3], length[:3], in_pair_order, None, pair_text=pair_text)
    assert torch.allclose(direct, shared, atol=1e-5)


def test_the_last_block_skips_only_rows_nobody_reads(monkeypatch):
    torch.manual_seed(0)
    deep = Reranker(config=dataclasses.replace(CONFIG, layers=2)).eval()
    trimmed = deep(*inputs())
    full_forward = CrossBlock.forward  # reference: every block computes every row, then the rows are cut

    def untrimmed(self, *args, rows=None):
        return full_forward(self, *args)[:, :rows]

    monkeypatch.setattr(CrossBlock, "forward", untrimmed)
    assert torch.allclose(deep(*inputs()), trimmed, atol=1e-5)
