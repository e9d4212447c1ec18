"""rerank/variants.py: the variants beside the method are built only on request, the method's class refuses
them, and checkpoints written before the split (the method's and the earlier design's) load with
bit-identical scores."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from tvrerank.errors import InputError
from tvrerank.rerank.checkpoint import load_reranker
from tvrerank.rerank.model import Reranker, RerankerConfig
from tvrerank.rerank.variants import VariantReranker, build_reranker

CHECKPOINTS = Path(__file__).parent / "data" / "checkpoints"
CONFIG = RerankerConfig(frames=3, tokens_per_frame=5, token_dim=8, embed_dim=6, text_token_dim=8, text_tokens=5,
                        width=16, heads=2, layers=2, queries=2, frame_keep=2, video_keep=4, perturb_samples=4)


@pytest.mark.parametrize("changes, variant", [({}, False), ({"combine": "sum"}, False), ({"combine": "joint"}, True),
                                              ({"token_match": True}, True)])
def test_build_reranker_gives_the_method_unless_a_variant_is_asked_for(changes, variant):
    config = dataclasses.replace(CONFIG, **changes)
    model = build_reranker(config)
    assert isinstance(model, VariantReranker) == variant and model.config == config
    if variant:
        with pytest.raises(InputError, match="build_reranker"):
            Reranker(config=config)


@pytest.mark.parametrize("name", ["method", "legacy"])
def test_parameters_keep_their_names_and_order(name):
    """The order of the parameters (the optimizer's, the gradient norm's summation order) is the one the
    checkpoints written before the split have."""
    saved = torch.load(CHECKPOINTS / name / "reranker.pt", weights_only=False)
    model = load_reranker(CHECKPOINTS / name).model
    assert list(model.state_dict()) == list(saved["state_dict"])


@pytest.mark.parametrize("name", ["method", "legacy"])
def test_checkpoints_written_before_the_split_score_the_same(name):
    arrays = np.load(CHECKPOINTS / "inputs_and_scores.npz")
    inputs = {key: torch.from_numpy(arrays[key]) for key in ("text_tokens", "text_length", "tokens", "frame_emb",
                                                             "frame_mask", "pair_video", "pair_text")}
    trained = load_reranker(CHECKPOINTS / name)
    assert isinstance(trained.model, VariantReranker) == (name == "legacy")
    with torch.no_grad():
        scores = trained.model(**inputs).numpy()
    # bit for bit on the machine that wrote them (checked when they were made, and with make_checkpoints.py
    # run by the old code beside this one); another CPU's float kernels differ in the last bits
    np.testing.assert_allclose(scores, arrays[f"scores_{name}"], rtol=1e-5, atol=1e-6)
