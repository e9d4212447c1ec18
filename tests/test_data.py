"""Training batches (train/data.py): a pure function of (seed, step, slot), well-formed groups, held-out videos."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import synthetic_cache

from tvrerank.errors import InputError
from tvrerank.index.candidates import build_candidates
from tvrerank.index.store import build_index_dir
from tvrerank.train.data import BatchSpec, TrainingBatches

SPEC = BatchSpec(captions=8, negatives=3, in_batch=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    cache = synthetic_cache(root / "c.h5", videos=30, captions_per_video=2, failed=(3, 7))
    build_index_dir(cache, root / "index")
    return cache, build_candidates(cache, k=6, index_dir=root / "index").video


def batches(data, **options):
    cache, candidates = data
    return TrainingBatches(cache, candidates, **{"spec": SPEC, "steps": 5, "memory_budget": 0, **options})


def with_scores(tmp_path_factory):
    root = tmp_path_factory.mktemp("scored")
    cache = synthetic_cache(root / "c.h5", videos=30, captions_per_video=2, failed=(3, 7))
    build_index_dir(cache, root / "index")
    return cache, build_candidates(cache, k=10, index_dir=root / "index")


def test_a_batch_is_a_pure_function_of_seed_step_and_rank(data):
    a, b = batches(data, seed=3), batches(data, seed=3)
    for step in (0, 4, 2):
        first, second = a[step], b[step]
        assert first.keys() == second.keys()
        for name in first:
            assert torch.equal(first[name], second[name]), name
    other_seed, other_rank = batches(data, seed=4)[0], batches(data, seed=3, rank=1, world=2)[0]
    assert not torch.equal(a[0]["text_tokens"], other_seed["text_tokens"])
    assert not torch.equal(a[0]["text_tokens"], other_rank["text_tokens"])


def test_ranks_and_micro_batches_share_the_same_slots(data):
    """Rank r of 2 (one micro-batch) sees micro-batch r of one process with grad_accum 2."""
    single = batches(data, seed=1, grad_accum=2)
    for rank in (0, 1):
        ddp = batches(data, seed=1, rank=rank, world=2)
        for step in (0, 3):
            left, right = ddp[step], single[2 * step + rank]
            assert all(torch.equal(left[name], right[name]) for name in left)


def test_groups_put_the_positive_first_and_hold_distinct_usable_videos(data):
    dataset = batches(data)
    rng = np.random.default_rng(0)
    for _ in range(20):
        captions = np.sort(rng.choice(dataset.trainable, SPEC.captions, replace=False))
        groups = dataset.group_rows(captions, rng)
        assert groups.shape == (SPEC.captions, SPEC.group)
        np.testing.assert_array_equal(groups[:, 0], dataset.caption_video[captions])
        for row in groups:
            assert len(set(row.tolist())) == SPEC.group  # no negative equals the positive, no duplicates
            assert dataset.usable[row].all()  # failed videos are never drawn


def test_held_out_videos_never_enter_a_batch(data):
    held_out = np.array([0, 1, 2, 4, 5])
    dataset = batches(data, held_out=held_out)
    assert not np.isin(dataset.caption_video[dataset.trainable], held_out).any()  # not trained on
    rng = np.random.default_rng(1)
    for _ in range(50):  # nor drawn as a negative, though they are in the training captions' top K
        captions = np.sort(rng.choice(dataset.trainable, SPEC.captions, replace=False))
        assert not np.isin(dataset.group_rows(captions, rng), held_out).any()


def test_too_few_videos_for_a_group_is_refused_not_an_endless_loop(tmp_path):
    cache = synthetic_cache(tmp_path / "tiny.h5", videos=3, captions_per_video=2, failed=(1, 2))
    candidates = np.array([[0, -1]] * 6)
    with pytest.raises(InputError, match="distinct videos"):
        TrainingBatches(cache, candidates, spec=BatchSpec(captions=2, negatives=1, in_batch=1), steps=1)
    few = synthetic_cache(tmp_path / "few.h5", videos=4, captions_per_video=2)
    with pytest.raises(InputError, match="lower 'negatives' and 'in_batch'"):
        TrainingBatches(few, np.zeros((8, 2), dtype=np.int64), spec=BatchSpec(captions=2, negatives=3, in_batch=1),
                        steps=1)
    exactly = TrainingBatches(few, np.zeros((8, 2), dtype=np.int64),
                              spec=BatchSpec(captions=4, negatives=2, in_batch=1), steps=1)
    groups = exactly.group_rows(np.arange(0, 8, 2), np.random.default_rng(0))
    assert all(sorted(row) == [0, 1, 2, 3] for row in groups.tolist())  # filled with distinct random videos


def test_similarity_sampling_prefers_the_most_similar_candidates(tmp_path_factory):
    """ALBEF's sampler: negatives drawn in proportion to softmax(stage-1 score / temperature). A tiny
    temperature always draws the highest-scored candidates; uniform sampling does not."""
    cache, lists = with_scores(tmp_path_factory)
    spec = BatchSpec(captions=8, negatives=2, in_batch=0, sampling="similarity", temperature=1e-4)
    sharp = TrainingBatches(cache, lists.video, spec=spec, steps=1, candidate_score=lists.score)
    uniform = TrainingBatches(cache, lists.video, spec=BatchSpec(captions=8, negatives=2, in_batch=0), steps=1)
    rng, drawn_top, uniform_top = np.random.default_rng(0), 0, 0
    for caption in range(0, 40, 3):
        positive = sharp.caption_video[caption]
        listed = lists.video[caption]
        keep = (listed >= 0) & (listed != positive) & sharp.usable[np.maximum(listed, 0)]
        best = set(listed[keep][:2])  # lists are sorted by score, best first
        drawn_top += set(sharp.hard_negatives(caption, positive, rng)) == best
        uniform_top += set(uniform.hard_negatives(caption, positive, rng)) == best
    assert drawn_top == 14 and uniform_top < 14
    with pytest.raises(ValueError, match="stage-1 scores"):
        TrainingBatches(cache, lists.video, spec=spec, steps=1)


@pytest.mark.parametrize("sampling", ["uniform", "similarity"])
def test_negative_captions_belong_to_other_videos(tmp_path_factory, sampling):
    cache, lists = with_scores(tmp_path_factory)
    spec = BatchSpec(captions=8, negatives=2, in_batch=1, negative_captions=3, sampling=sampling)
    made = TrainingBatches(cache, lists.video, spec=spec, steps=3, candidate_score=lists.score)
    for step in range(3):
        batch = made[step]
        negative = batch["negative_text"]  # (B, Nc) into the batch's captions
        assert negative.shape == (8, 3)
        positive_row = batch["pair_video"][:, 0]  # each caption's positive, as a row of the batch's videos
        for b in range(8):
            assert len(set(negative[b].tolist())) == 3
            assert all(positive_row[j] != positive_row[b] for j in negative[b].tolist())
        assert torch.equal(negative, TrainingBatches(cache, lists.video, spec=spec, steps=3,
                                                     candidate_score=lists.score)[step]["negative_text"])
