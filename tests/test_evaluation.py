"""Evaluation: stage 1 against metrics computed by hand; re-ranked evaluation that cannot be fooled."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import synthetic_cache

from tvrerank.cache.reader import CacheReader
from tvrerank.cli import main
from tvrerank.errors import NonFiniteScores
from tvrerank.evaluation import compare_stages, load_lists, stage1_evaluation
from tvrerank.index.candidates import build_candidates, write_candidates
from tvrerank.index.store import build_index_dir
from tvrerank.metrics import retrieval_metrics
from tvrerank.rerank.checkpoint import save_reranker
from tvrerank.rerank.model import Reranker
from tvrerank.rerank.variants import build_reranker
from tvrerank.train.loop import model_config_for


@pytest.fixture
def evaluated(tmp_path):
    cache = synthetic_cache(tmp_path / "c.h5", videos=30, captions_per_video=2, failed=(4,))
    build_index_dir(cache, tmp_path / "index")
    write_candidates(tmp_path / "cand.h5", build_candidates(cache, k=5, index_dir=tmp_path / "index"), cache)
    return cache, stage1_evaluation(cache, tmp_path / "cand.h5", dsl=True)


def test_text_to_video_uses_every_caption_of_ok_videos(evaluated):
    cache, result = evaluated
    assert (result["captions"], result["evaluated"], result["k"]) == (60, 58, 5)
    with CacheReader(cache) as c:
        rows = c.ok_rows()
        sim = c["texts/emb"][()].astype(np.float32) @ c["videos/video_emb"][()].astype(np.float32)[rows].T
        truth = c["texts/video"][()]
    keep = truth != 4
    columns = np.searchsorted(rows, truth[keep])
    ranks = [int((row >= row[col]).sum()) for row, col in zip(sim[keep], columns)]  # ties count against
    assert result["stage1"] == retrieval_metrics(np.array(ranks))
    assert result["recall_at_k"] == pytest.approx(np.mean(np.array(ranks) <= 5) * 100)


def test_video_to_text_and_dsl_are_reported_apart(evaluated):
    _, result = evaluated
    assert set(result["v2t"]["stage1"]) == {"R1", "R5", "R10", "MdR", "MnR"}
    assert set(result["dsl"]["stage1"]) == set(result["stage1"])
    # captions sit near their video: stage 1 is far better than chance (R@1 = 1/29)
    assert result["stage1"]["R1"] > 20 and result["v2t"]["stage1"]["R1"] > 20


SMALL = {"width": 16, "heads": 2, "layers": 1, "queries": 2, "frame_keep": 2, "video_keep": 4, "perturb_samples": 4}


def _constant_reranker(cache, value: float = 0.7) -> Reranker:
    """A re-ranker whose every score is ``value`` (its head outputs its bias; token matching off)."""
    with CacheReader(cache) as reader:
        model = build_reranker(model_config_for(reader, SMALL))
    with torch.no_grad():
        model.head[-1].weight.zero_()
        model.head[-1].bias.fill_(value)
        if getattr(model, "token_match_scale", None) is not None:
            model.token_match_scale.zero_()
    return model


def test_a_constant_reranker_reproduces_the_stage_one_metrics_exactly(tmp_path):
    cache = synthetic_cache(tmp_path / "c.h5", videos=30, captions_per_video=2, failed=(4,), stage1_noise=1.0)
    build_index_dir(cache, tmp_path / "index")
    write_candidates(tmp_path / "cand.h5", build_candidates(cache, k=8, index_dir=tmp_path / "index"), cache)
    lists, true_video = load_lists(cache, tmp_path / "cand.h5")
    stage1 = stage1_evaluation(cache, tmp_path / "cand.h5")["stage1"]
    assert stage1["R1"] < 100  # there is room to cheat
    for alpha in (None, 0.0, 0.5):
        result = compare_stages(_constant_reranker(cache), cache, lists, true_video, device=torch.device("cpu"),
                                alpha=alpha)
        for variant in ("stage1", "reranker_only", "plain_sum", "reranked"):
            assert result[variant] == stage1, (alpha, variant)


def test_a_nan_reranker_is_refused(tmp_path):
    cache = synthetic_cache(tmp_path / "c.h5", videos=12)
    build_index_dir(cache, tmp_path / "index")
    write_candidates(tmp_path / "cand.h5", build_candidates(cache, k=4, index_dir=tmp_path / "index"), cache)
    lists, true_video = load_lists(cache, tmp_path / "cand.h5")
    broken = _constant_reranker(cache, value=float("nan"))
    with pytest.raises(NonFiniteScores, match="NaN/inf"):
        compare_stages(broken, cache, lists, true_video, device=torch.device("cpu"))
    with CacheReader(cache) as reader:
        (tmp_path / "run").mkdir()
        save_reranker(tmp_path / "run", broken, fusion_alpha=0.5, fingerprint=reader.header.fingerprint(), step=1,
                      train_config={})
    result = CliRunner().invoke(main, ["eval", "--cache", str(cache), "--candidates", str(tmp_path / "cand.h5"),
                                       "--reranker", str(tmp_path / "run"), "--device", "cpu"])
    assert result.exit_code == 2 and "NaN/inf" in result.output and "Traceback" not in result.output
