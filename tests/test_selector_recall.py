"""selector_recall.py: the known-answer figures against brute force, chance and an oracle."""

from __future__ import annotations

import itertools
from math import comb

import numpy as np
import pytest
from conftest import cli_output

from tvrerank.selector_recall import (detail_attention_mass, format_recalls, frame_selector_recall, kept_any_chance,
                                      video_selector_recall)

N, T, P, M = 60, 12, 64, 4


def detail_world(seed: int = 0, *, n: int = N) -> np.ndarray:
    """(n, T, P) bool: each video's glyph on one or two neighbouring patches, shown in 2–5 frames in a row."""
    rng = np.random.default_rng(seed)
    detail = np.zeros((n, T, P), dtype=bool)
    for v in range(n):
        first, count = rng.integers(0, T - 5), rng.integers(2, 6)
        patch = rng.integers(0, P - 1)
        area = [patch, patch + 1] if rng.random() < 0.5 else [patch]
        detail[v, first : first + count, area[0] : area[-1] + 1] = True
    return detail


def brute_force_frame_recall(kept: np.ndarray, detail: np.ndarray) -> float:
    hits, frames = 0, 0
    for v in range(detail.shape[0]):
        for t in range(detail.shape[1]):
            patches = set(np.flatnonzero(detail[v, t]))
            if patches:
                frames += 1
                hits += bool(patches & set(kept[v, t].tolist()))
    return hits / frames


def random_kept(seed: int, n: int = N) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(np.stack([[rng.choice(P, M, replace=False) for _ in range(T)] for _ in range(n)]), axis=-1)


def test_frame_recall_matches_a_brute_force_reference():
    detail = detail_world(1)
    kept = random_kept(2)
    result = frame_selector_recall(kept, detail)
    assert result["recall"] == pytest.approx(brute_force_frame_recall(kept, detail))
    assert result["frames"] == int(detail.any(-1).sum()) and result["keep"] == M and result["patches"] == P


def test_an_oracle_selector_scores_one_and_a_selector_missing_every_detail_scores_zero():
    detail = detail_world(3)
    oracle = np.zeros((N, T, M), dtype=np.int64)
    avoid = np.zeros((N, T, M), dtype=np.int64)
    for v, t in itertools.product(range(N), range(T)):
        on = np.flatnonzero(detail[v, t])
        off = np.flatnonzero(~detail[v, t])
        oracle[v, t] = np.sort(np.concatenate([on, off])[:M])  # the detail's patches first
        avoid[v, t] = off[:M]
    assert frame_selector_recall(oracle, detail)["recall"] == 1.0
    assert frame_selector_recall(avoid, detail)["recall"] == 0.0


def test_a_selector_that_keeps_fixed_patches_scores_chance():
    """Fixed patches (the first four, whatever the frame) on details at uniformly random places: about the
    chance rate, and the chance figure is the hypergeometric one (about M·a/P)."""
    detail = detail_world(4, n=3000)
    fixed = np.broadcast_to(np.arange(M), (3000, T, M))
    result = frame_selector_recall(fixed, detail)
    area = detail.sum(-1)[detail.any(-1)]
    exact = np.mean([1 - comb(P - a, M) / comb(P, M) for a in area])
    assert result["chance"] == pytest.approx(exact)
    assert result["chance_approx"] == pytest.approx(np.mean(M * area / P))
    assert abs(result["recall"] - result["chance"]) < 0.03, result
    assert 0.05 < result["chance"] < 0.15  # M = 4 of 64 patches, areas 1-2


def test_chance_is_exact_for_small_grids():
    """Against enumerating every M-subset of P patches."""
    for p, m, a in ((6, 2, 1), (6, 2, 2), (7, 3, 2)):
        subsets = list(itertools.combinations(range(p), m))
        expected = np.mean([bool(set(s) & set(range(a))) for s in subsets])
        assert kept_any_chance(p, m, np.array([a]))[0] == pytest.approx(expected)


def test_frames_without_the_detail_do_not_count():
    detail = np.zeros((1, 3, 8), dtype=bool)
    detail[0, 1, 5] = True
    kept = np.array([[[0, 1], [5, 6], [0, 1]]])  # frames 0 and 2 keep no detail patch: they show none
    assert frame_selector_recall(kept, detail)["recall"] == 1.0
    assert frame_selector_recall(kept, np.zeros_like(detail))["recall"] is None


def test_video_recall_counts_picks_from_detail_frames_against_the_share_of_such_frames():
    per_frame = 5  # the global token + 4 patches
    frames = np.zeros((2, 6), dtype=bool)
    frames[0, [1, 2]] = True  # video 0: detail in frames 1 and 2 of its 5 valid ones
    frame_valid = np.ones((2, 6), dtype=bool)
    frame_valid[0, 5] = False
    frame_valid[1, 4:] = False
    picks = np.array([[5, 6, 10, 0], [0, 1, 2, 3]])  # video 0: frames 1, 1, 2, 0
    valid = np.ones((2, 4), dtype=bool)
    result = video_selector_recall(picks, valid, frames, frame_valid, per_frame)
    assert result["recall"] == pytest.approx(3 / 4) and result["picks"] == 4  # video 1 has no detail frame
    assert result["chance"] == pytest.approx(2 / 5)
    # a selector picking uniformly at random over the tokens scores its chance
    rng = np.random.default_rng(0)
    detail = detail_world(5, n=2000).any(-1)
    random_picks = np.sort(np.stack([rng.choice(T * per_frame, 16, replace=False) for _ in range(2000)]), axis=1)
    uniform = video_selector_recall(random_picks, np.ones((2000, 16), bool), detail, np.ones((2000, T), bool),
                                    per_frame)
    assert abs(uniform["recall"] - uniform["chance"]) < 0.01, uniform
    # and one that picks detail frames only scores 1
    oracle = np.stack([np.flatnonzero(np.repeat(row, per_frame))[:4] for row in detail])
    assert video_selector_recall(oracle, np.ones((2000, 4), bool), detail, np.ones((2000, T), bool),
                                 per_frame)["recall"] == 1.0


def test_attention_mass_on_detail_patches():
    detail = np.zeros((1, 2, 8), dtype=bool)
    detail[0, 0, [3, 4]] = True  # frame 0 shows the detail on patches 3 and 4
    kept = np.array([[[1, 3], [3, 4]]])  # frame 0 keeps patch 3 (slot 2); frame 1 shows none
    attention = np.array([[[0.5, 0.1, 0.4], [0.2, 0.4, 0.4]]])  # (C, T, F): global, slot 1, slot 2
    result = detail_attention_mass(attention, kept, detail)
    assert result["mass"] == pytest.approx(0.4) and result["uniform"] == pytest.approx(1 / 3)
    assert result["frames"] == 1


def test_format_names_each_figure_with_its_chance():
    detail = detail_world(6)
    text = format_recalls({"videos": N, "frame_tokens": "top_m",
                           "frame_selector": frame_selector_recall(random_kept(7), detail),
                           "video_selector": {"recall": 0.5, "chance": 0.25, "picks": 10},
                           "attention": {"mass": 0.3, "uniform": 0.1, "frames": 5}})
    assert "frame selector recall" in text and "chance" in text and "50.0%" in text and "30.0%" in text


# --------------------------------------------------------------------------- end to end
TRAINING = {"captions": 8, "negatives": 4, "in_batch": 2, "warmup": 2, "eval_every": 10,
            "model": {"width": 32, "heads": 2, "layers": 1, "queries": 4, "frame_keep": 4, "video_keep": 12,
                      "perturb_samples": 8}}


invoke = cli_output


@pytest.fixture(scope="module")
def detail_run(tmp_path_factory):
    """A detail world's train and test caches with their ground truth, candidates and a briefly trained
    re-ranker that keeps the top 4 patches."""
    import json

    root = tmp_path_factory.mktemp("detail-run")
    invoke("toy", "make", "--out", root / "data", "--videos", 32, "--world", "detail")
    for split in ("train", "test"):
        invoke("extract", "--annotations", root / "data" / f"{split}.jsonl", "--videos", root / "data",
               "--model", "tvr-toy", "--out", root / f"{split}.h5", "--frames", 12, "--text-tokens", 48,
               "--workers", 0, "--device", "cpu", "--quiet")
        invoke("toy", "truth", root / "data", root / f"{split}.h5")
        invoke("index", root / f"{split}.h5", "--out", root / f"{split}-index")
        invoke("candidates", root / f"{split}.h5", "--index", root / f"{split}-index", "--out",
               root / f"{split}-candidates.h5", "--k", 8)
    (root / "train.json").write_text(json.dumps(TRAINING))
    invoke("train", "--cache", root / "train.h5", "--candidates", root / "train-candidates.h5", "--out",
           root / "run", "--config", root / "train.json", "--steps", 3, "--device", "cpu")
    return root


@pytest.mark.slow
def test_demo_on_the_detail_world_reports_the_selectors_recalls(detail_demo_run):
    import json

    out, output = detail_demo_run  # demo --world detail --videos 48 --steps 4 --workers 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world"] == "detail"
    selectors = metrics["selectors"]
    assert selectors["frame_tokens"] == "top_m" and selectors["videos"] == 12
    frame = selectors["frame_selector"]
    assert frame["keep"] == 4 and frame["patches"] == 64 and frame["frames"] > 0 and 0 <= frame["recall"] <= 1
    assert 0.06 < frame["chance"] < 0.13
    assert 0 < selectors["video_selector"]["chance"] < 1 and 0 <= selectors["attention"]["mass"] <= 1
    assert metrics["first_stages"]["trained"]["selectors"]["videos"] == 12
    assert "frame selector recall" in output and "frame selector recall" in (out / "report.md").read_text()


def test_eval_reports_the_recalls_the_explain_view_shows(detail_run):
    """``eval --reranker`` on the demo's test cache: its frame-selector recall equals the one counted
    from the explain view's kept patches, video by video (another path through the model)."""
    import json

    import torch

    from tvrerank.cache.reader import CacheReader
    from tvrerank.cache.truth import read_truth
    from tvrerank.rerank.checkpoint import load_reranker
    from tvrerank.rerank.explain import explain_pair

    cache, candidates, run = detail_run / "test.h5", detail_run / "test-candidates.h5", detail_run / "run"
    reported = json.loads(invoke("eval", "--cache", cache, "--candidates", candidates, "--reranker", run,
                                 "--device", "cpu", "--json"))["selectors"]
    text = invoke("eval", "--cache", cache, "--candidates", candidates, "--reranker", run, "--device", "cpu")
    assert "frame selector recall" in text and "video selector recall" in text
    assert reported["videos"] == 8 and reported["frame_tokens"] == "top_m"
    model = load_reranker(run, torch.device("cpu")).model
    hits, frames = 0, 0
    with CacheReader(cache) as reader:
        truth = read_truth(reader)
        caption_of = {int(v): i for i, v in enumerate(reader["texts/video"][()])}
        for row in range(reader.num_videos):
            c = caption_of[row]
            explanation = explain_pair(
                model, torch.from_numpy(reader["texts/tokens"][c : c + 1].astype("float32")),
                torch.from_numpy(reader["texts/length"][c : c + 1].astype("int64")),
                torch.from_numpy(reader["videos/tokens"][row : row + 1].astype("float32")),
                torch.from_numpy(reader["videos/frame_emb"][row : row + 1].astype("float32")),
                torch.from_numpy(reader["videos/frame_mask"][row : row + 1]))
            for t in np.flatnonzero(truth.detail[row].any(-1)):
                frames += 1
                hits += bool(truth.detail[row, t, explanation.kept_patches[t]].any())
    assert reported["frame_selector"]["frames"] == frames
    assert reported["frame_selector"]["recall"] == pytest.approx(hits / frames)


def test_eval_without_ground_truth_reports_no_recalls(detail_run, tmp_path):
    """A cache without known answers (as every cache made before them): no "selectors", nothing else changes."""
    import json
    import shutil

    import h5py

    from tvrerank.cache.truth import DETAIL_DATASET, WORLD_ATTRIBUTE

    cache = tmp_path / "test.h5"
    shutil.copyfile(detail_run / "test.h5", cache)
    with h5py.File(cache, "r+") as f:
        del f[DETAIL_DATASET]
        del f.attrs[WORLD_ATTRIBUTE]
    result = json.loads(invoke("eval", "--cache", cache, "--candidates", detail_run / "test-candidates.h5",
                               "--reranker", detail_run / "run", "--device", "cpu", "--json"))
    assert "selectors" not in result and "R1" in result["reranked"]


def test_a_global_token_re_ranker_keeps_no_patch_and_its_video_selector_is_still_measured(detail_run, tmp_path):
    import json

    config = dict(TRAINING, model=dict(TRAINING["model"], frame_tokens="global"))
    (tmp_path / "global.json").write_text(json.dumps(config))
    invoke("train", "--cache", detail_run / "train.h5", "--candidates", detail_run / "train-candidates.h5", "--out",
           tmp_path / "run", "--config", tmp_path / "global.json", "--steps", 2, "--device", "cpu")
    args = ("eval", "--cache", detail_run / "test.h5", "--candidates", detail_run / "test-candidates.h5",
            "--reranker", tmp_path / "run", "--device", "cpu")
    selectors = json.loads(invoke(*args, "--json"))["selectors"]
    assert selectors["frame_selector"] is None and selectors["attention"] is None
    assert selectors["frame_tokens"] == "global" and 0 <= selectors["video_selector"]["recall"] <= 1
    assert "keeps no patch" in invoke(*args)
