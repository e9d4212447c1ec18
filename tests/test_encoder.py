"""The frozen open_clip wrapper on tiny random-weight configs (a ViT tower and a timm tower)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_TIMM, TINY_VIT, TINY_VIT_ODD

from tvrerank.cache.encoding import pool_grid
from tvrerank.extract.encoder import FrozenClipEncoder, pad_token_id
from tvrerank.extract.models import ModelError, resolve_model_config


@pytest.fixture(scope="module")
def encoder():
    return FrozenClipEncoder(model=str(TINY_VIT), pretrained=None, device="cpu")


def _frames(n, size, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_layout_of_joint_tokens(encoder):
    layout = encoder.layout
    assert (layout.grid, layout.tokens_per_frame, layout.token_dim, layout.embed_dim) == ((4, 4), 16, 32, 32)
    assert layout.text_token_dim == 32 and encoder.config.model == "tiny-vit"
    assert encoder.config.model_config["vision_cfg"]["patch_size"] == 8


def test_frame_embeddings_match_open_clip_encode_image(encoder):
    frames = _frames(3, 32)
    frame_emb, tokens = encoder.encode_frames(frames)
    assert frame_emb.shape == (3, 32) and tokens.shape == (3, 16, 32)
    expected = F.normalize(encoder.clip.encode_image(encoder.preprocess(frames)), dim=-1).numpy()
    np.testing.assert_allclose(frame_emb, expected, atol=1e-5)


def test_joint_tokens_are_projected_patch_tokens(encoder):
    frames = _frames(2, 32, seed=1)
    _, tokens = encoder.encode_frames(frames)
    visual = encoder.clip.visual
    with torch.no_grad():
        x = visual.transformer(visual._embeds(encoder.preprocess(frames)))
        expected = (visual.ln_post(x[:, 1:]) @ visual.proj).numpy()  # drop the class token
    np.testing.assert_allclose(tokens, expected, atol=1e-5)


def test_frames_are_encoded_independently_of_their_batch(encoder):
    frames = _frames(4, 32, seed=2)
    together, _ = encoder.encode_frames(frames)
    alone, _ = encoder.encode_frames(frames[2:3])
    np.testing.assert_allclose(together[2], alone[0], atol=1e-5)


def test_preprocess_takes_an_array_or_a_cpu_tensor_alike(encoder):
    """``submit_frames`` hands ``preprocess`` a (pinned, on a GPU) tensor; the array path is the reference."""
    frames = _frames(2, 32, seed=3)
    torch.testing.assert_close(encoder.preprocess(torch.from_numpy(frames)), encoder.preprocess(frames),
                               rtol=0, atol=0)


def test_text_embeddings_tokens_and_lengths(encoder):
    texts = ["a red circle moves left", "un cercle rouge 🔴 bouge", " ".join(["word"] * 60)]
    emb, tokens, lengths = encoder.encode_texts(texts)
    assert emb.shape == (3, 32) and tokens.shape == (3, 32, 32)
    expected = F.normalize(encoder.clip.encode_text(encoder.tokenizer(texts)), dim=-1).numpy()
    np.testing.assert_allclose(emb, expected, atol=1e-5)
    assert lengths[0] == 7  # start + 5 words + end
    assert lengths[2] == 32  # an over-long caption keeps its first L token features
    assert 4 < lengths[1] < 32


def test_raw_tokens_and_2x2_pooling_on_an_odd_grid():
    raw = FrozenClipEncoder(model=str(TINY_VIT_ODD), pretrained=None, device="cpu",
                            token_space="raw", token_pool="2x2")
    # 40 px / patch 8 = a 5x5 grid; 2x2 pooling keeps the edge in partial windows: 3x3
    assert raw.layout.grid == (3, 3) and raw.layout.tokens_per_frame == 9
    assert raw.layout.token_dim == 32 and raw.layout.embed_dim == 24  # tower width vs joint width
    _, tokens = raw.encode_frames(_frames(1, 40))
    assert tokens.shape == (1, 9, 32)


def test_pool_grid_averages_partial_edge_windows():
    grid = torch.arange(25, dtype=torch.float32).view(1, 1, 5, 5)
    pooled = pool_grid(grid, "2x2")
    assert pooled.shape == (1, 1, 3, 3)
    assert pooled[0, 0, 0, 0] == (0 + 1 + 5 + 6) / 4
    assert pooled[0, 0, 2, 2] == 24  # the lone corner token
    assert pooled[0, 0, 0, 2] == (4 + 9) / 2


def test_timm_tower_works_through_forward_intermediates():
    encoder = FrozenClipEncoder(model=str(TINY_TIMM), pretrained=None, device="cpu")
    assert type(encoder.clip.visual).__name__ == "TimmModel"
    assert encoder.layout.grid == (14, 14) and encoder.layout.token_dim == 32
    frame_emb, tokens = encoder.encode_frames(_frames(1, 224))
    assert tokens.shape == (1, 196, 32) and np.isclose(np.linalg.norm(frame_emb), 1, atol=1e-4)


def test_unknown_models_and_weights_are_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="unknown open_clip model"):
        resolve_model_config("ViT-Nope-99")
    bad = tmp_path / "bad.json"
    bad.write_text('{"embed_dim": 8}')
    with pytest.raises(ModelError, match="needs"):
        resolve_model_config(str(bad))
    with pytest.raises(ModelError, match="no network|file path"):
        FrozenClipEncoder(model=str(TINY_VIT), pretrained="not-a-tag-or-file", device="cpu")


def test_checkpoint_file_loads_and_is_fingerprinted(tmp_path, encoder):
    path = tmp_path / "tiny.pt"
    torch.save(encoder.clip.state_dict(), path)
    loaded = FrozenClipEncoder(model=str(TINY_VIT), pretrained=str(path), device="cpu")
    assert loaded.config.pretrained_sha256 and len(loaded.config.pretrained_sha256) == 64
    frames = _frames(2, 32, seed=3)
    np.testing.assert_allclose(loaded.encode_frames(frames)[0], encoder.encode_frames(frames)[0], atol=1e-6)


def test_local_dir_weights_load_like_open_clip_folders(tmp_path, encoder):
    import json

    from safetensors.torch import save_file

    folder = tmp_path / "tiny-clip"
    folder.mkdir()
    config = json.loads(TINY_VIT.read_text())
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in encoder.clip.state_dict().items()},
              str(folder / "open_clip_model.safetensors"))
    loaded = FrozenClipEncoder(model="tiny-local", pretrained=f"local-dir:{folder}", device="cpu")
    assert loaded.config.model_config == config and loaded.layout == encoder.layout
    frames = _frames(2, 32, seed=4)
    np.testing.assert_allclose(loaded.encode_frames(frames)[0], encoder.encode_frames(frames)[0], atol=1e-6)


def test_real_tokens_are_counted_with_the_tokenizers_own_pad_id(encoder):
    class HuggingFaceLike:  # open_clip's HFTokenizer / SigLipTokenizer keep the HF tokenizer here
        class tokenizer:
            pad_token_id = 1

    assert pad_token_id(encoder.tokenizer) == 0  # open_clip's BPE tokenizer pads with 0
    assert pad_token_id(HuggingFaceLike()) == 1
    _, _, lengths = encoder.encode_texts(["a cat", "a cat sat on the mat"])
    ids = encoder.tokenizer(["a cat", "a cat sat on the mat"])
    assert lengths.tolist() == [int((row[: encoder.text_tokens] != 0).sum()) for row in ids] == [4, 8]


def test_pe_core_tokens_go_through_the_trunks_head_into_the_joint_space():
    """PE-Core's projection sits in the timm trunk (its open_clip head is empty): joint tokens are
    the trunk head applied to each normalised patch token, in the embedding's width."""
    joint = FrozenClipEncoder(model="PE-Core-T-16-384", pretrained=None, token_space="joint", device="cpu")
    assert joint.layout.token_dim == joint.layout.embed_dim == 512 and joint.layout.grid == (24, 24)
    frames = np.random.default_rng(0).integers(0, 256, (1, 384, 384, 3), dtype=np.uint8)
    raw = FrozenClipEncoder(model="PE-Core-T-16-384", pretrained=None, token_space="raw", device="cpu")
    _, raw_tokens = raw.encode_frames(frames)
    _, joint_tokens = joint.encode_frames(frames)
    head = joint.clip.visual.trunk.head
    expected = head(torch.from_numpy(raw_tokens)).detach().numpy()
    np.testing.assert_allclose(joint_tokens, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(__import__("importlib").util.find_spec("transformers") is not None,
                    reason="transformers is installed: the Hugging Face parts load")
def test_a_hugging_face_tokenizer_without_transformers_is_one_line():
    with pytest.raises(ModelError, match=r"comes from Hugging Face; install it with `pip install 'tvrerank\[hf\]'`"):
        FrozenClipEncoder(model="ViT-B-32-SigLIP2-256", pretrained=None, device="cpu")


def test_float16_texts_made_on_the_device_equal_a_host_conversion(encoder):
    """What extraction stores for captions: cast on the device, the same values as casting the float32 result."""
    texts = ["a red box moves", "two boxes", "a very long caption " * 8]
    emb32, tokens32, lengths = encoder.encode_texts(texts)
    emb16, tokens16, lengths16 = encoder.submit_texts(texts, dtype=np.float16).result()
    assert emb16.dtype == tokens16.dtype == np.float16
    np.testing.assert_array_equal(emb16, emb32.astype(np.float16))
    np.testing.assert_array_equal(tokens16, tokens32.astype(np.float16))
    np.testing.assert_array_equal(lengths16, lengths)


def test_a_text_only_encoder_drops_the_image_tower_and_encodes_captions_the_same(encoder):
    """Retrieval's encoder: the same captions' features and the same config, without the image tower."""
    from tvrerank.errors import InputError
    from tvrerank.extract.encoder import TextLayout

    text = FrozenClipEncoder(model=str(TINY_VIT), pretrained=None, device="cpu", text_only=True)
    assert text.clip.visual is None and text.layout is None
    assert sum(p.numel() for p in text.clip.parameters()) < sum(p.numel() for p in encoder.clip.parameters())
    assert text.config.identity() == encoder.config.identity()
    assert text.text_layout == TextLayout.of(encoder.layout) == encoder.text_layout
    captions = ["a red box moves", "two boxes"]
    for got, want in zip(text.encode_texts(captions), encoder.encode_texts(captions)):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(InputError, match="captions only"):
        text.encode_frames(_frames(1, 32))
