"""tvrerank.training, what the three trainers share: the schedule, the optimizer's groups, the optimisation
config in JSON, the one held-out rule (both trainers hold out the same videos) and the refusal of candidates
whose first stage was trained on the re-ranker's validation videos."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import synthetic_cache

from tvrerank.errors import InputError
from tvrerank.firststage.store import embed_cache
from tvrerank.firststage.train import FirstStageTrainConfig, load_config, train_first_stage
from tvrerank.index.candidates import build_candidates, write_candidates
from tvrerank.toy.pretrain import PretrainConfig
from tvrerank.train.loop import TrainConfig, load_train_config, train
from tvrerank.training import (OptimConfig, RunLog, build_optimizer, held_out_videos, lr_at, set_lr,
                               nest_optim_options)


def test_lr_schedule_is_a_pure_function_of_the_step():
    optim = OptimConfig(steps=100, warmup=10, lr=1e-3, min_lr_ratio=0.1)
    assert lr_at(0, optim) == pytest.approx(1e-4)
    assert lr_at(9, optim) == pytest.approx(1e-3)
    assert lr_at(99, optim) == pytest.approx(1e-4, rel=1e-2)
    low = 1e-4  # halfway through the cosine: the mean of lr and lr * min_lr_ratio
    assert lr_at(55, optim) == pytest.approx(low + 0.5 * (1e-3 - low))
    after_warmup = [lr_at(step, optim) for step in range(10, 100)]
    assert after_warmup == sorted(after_warmup, reverse=True)  # never rises after the warmup
    forwards = [lr_at(step, optim) for step in range(100)]
    assert forwards[::-1] == [lr_at(step, optim) for step in reversed(range(100))]  # no hidden state
    assert lr_at(99, OptimConfig(steps=100, warmup=10, lr=1e-3, min_lr_ratio=0.0)) < 1e-6  # pretraining's: to 0


def test_each_trainer_has_its_own_defaults_and_reads_flat_or_nested_options(tmp_path):
    assert TrainConfig().optim.grad_clip == 1.0 and TrainConfig().optim.steps == 2000
    assert FirstStageTrainConfig().optim.steps == 600 and FirstStageTrainConfig().optim.grad_clip == 0.0
    assert PretrainConfig().optim.min_lr_ratio == 0.0 and PretrainConfig().optim.weight_decay == 0.1
    # a dict merges onto the trainer's defaults, not onto OptimConfig's
    assert FirstStageTrainConfig(optim={"lr": 1e-3}).optim == OptimConfig(steps=600, lr=1e-3, warmup=30)
    flat, nested = tmp_path / "flat.json", tmp_path / "nested.json"
    flat.write_text(json.dumps({"steps": 7, "lr": 2e-3, "captions": 4}))
    nested.write_text(json.dumps({"optim": {"steps": 7, "lr": 2e-3}, "captions": 4}))
    assert load_train_config(flat) == load_train_config(nested)
    assert load_train_config(nested, steps=3).optim.steps == 3  # the command line's --steps wins
    (tmp_path / "fs.json").write_text(json.dumps({"steps": 7, "batch": 4}))
    assert load_config(tmp_path / "fs.json").optim.steps == 7
    assert nest_optim_options({"warmup": 1, "optim": {"lr": 1.0}}) == {"optim": {"lr": 1.0, "warmup": 1}}
    (tmp_path / "bad.json").write_text(json.dumps({"optim": {"lr": "fast"}}))
    with pytest.raises(InputError, match=r"bad.json: optimisation option 'lr' must be a number"):
        load_train_config(tmp_path / "bad.json")
    (tmp_path / "typo.json").write_text(json.dumps({"optim": {"stpes": 3}}))
    with pytest.raises(InputError, match=r"typo.json: unknown optimisation options \['stpes'\]"):
        load_train_config(tmp_path / "typo.json")


def test_weight_decay_applies_to_weight_matrices_only():
    model = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    model.register_parameter("scale", torch.nn.Parameter(torch.ones(())))
    decayed, plain = build_optimizer(model, OptimConfig(weight_decay=0.3)).param_groups
    assert decayed["weight_decay"] == 0.3 and plain["weight_decay"] == 0.0
    assert [p.shape for p in decayed["params"]] == [torch.Size([4, 4])]  # the Linear's weight, not the embedding
    assert len(plain["params"]) == 5  # embedding table, bias, norm weight and bias, scale


def test_the_held_out_rule():
    ok_rows = np.array([0, 2, 3, 5, 8, 9, 11, 12, 13, 20])
    held_out = held_out_videos(4, 0.3, ok_rows)
    assert len(held_out) == 3 and np.isin(held_out, ok_rows).all() and (np.diff(held_out) > 0).all()
    assert np.array_equal(held_out, held_out_videos(4, 0.3, ok_rows))  # the seed alone decides
    assert not np.array_equal(held_out, held_out_videos(5, 0.3, ok_rows))
    assert len(held_out_videos(4, 0.0, ok_rows)) == 0 and len(held_out_videos(4, 0.01, ok_rows)) == 1
    with pytest.raises(InputError, match="leaving none"):
        held_out_videos(0, 0.9, ok_rows[:1])


def test_run_log_writes_on_rank_zero_only_and_appends_on_resume(tmp_path):
    log = RunLog(tmp_path / "log.csv", ["step", "loss"], append=False, enabled=True)
    log.row([1, 0.5])
    log.close()
    again = RunLog(tmp_path / "log.csv", ["step", "loss"], append=True, enabled=True)
    again.row([2, 0.4])
    again.close()
    assert (tmp_path / "log.csv").read_text().splitlines() == ["step,loss", "1,0.5", "2,0.4"]
    silent = RunLog(tmp_path / "other.csv", ["step"], append=False, enabled=False)
    silent.row([1])
    silent.close()
    assert not (tmp_path / "other.csv").exists()


@pytest.fixture(scope="module")
def first_stage(tmp_path_factory):
    """A cache, a first stage trained on it with 20% of its videos held out, and that first stage's candidates."""
    root = tmp_path_factory.mktemp("training")
    cache = synthetic_cache(root / "train.h5", videos=40, failed=(3,), seed=0)
    config = FirstStageTrainConfig(optim={"steps": 2}, batch=8, val_fraction=0.2, seed=3, device="cpu",
                                   model={"layers": 1, "heads": 2})
    metrics = train_first_stage(cache, root / "fs", config, progress=False)
    embed_cache(root / "fs", cache, root / "emb")
    candidates = root / "candidates.h5"
    write_candidates(candidates, build_candidates(cache, k=6, text_emb=root / "emb" / "text_emb.npy",
                                                  video_emb=root / "emb" / "video_emb.npy"), cache)
    return root, cache, candidates, metrics


RERANKER = {"width": 16, "heads": 2, "layers": 1, "queries": 2, "frame_keep": 2, "video_keep": 4, "dropout": 0.0,
            "perturb_samples": 4}


def test_both_trainers_hold_out_the_same_videos(first_stage, tmp_path):
    root, cache, candidates, first = first_stage
    config = TrainConfig(optim={"steps": 1}, captions=4, negatives=2, in_batch=1, val_fraction=0.2, seed=3,
                         device="cpu", model=RERANKER)
    reranker = train(cache, candidates, tmp_path / "run", config, progress=False)
    held_out = first["splits"]["validation"]["videos"]
    assert len(held_out) == round(0.2 * 39)  # 40 videos, one failed
    assert reranker["splits"]["validation"]["videos"] == held_out
    assert json.loads((root / "fs" / "config.json").read_text())["splits"]["validation"]["videos"] == held_out


@pytest.mark.parametrize("change", [{"seed": 4}, {"val_fraction": 0.3}])
def test_candidates_of_a_first_stage_trained_on_the_validation_videos_are_refused(first_stage, tmp_path, change):
    root, cache, candidates, _ = first_stage
    options = dict(optim={"steps": 1}, captions=4, negatives=2, in_batch=1, val_fraction=0.2, seed=3, device="cpu",
                   model=RERANKER)
    with pytest.raises(InputError) as error:
        train(cache, candidates, tmp_path / "run", TrainConfig(**{**options, **change}), progress=False)
    message = str(error.value)
    assert str(root / "fs") in message and str(tmp_path / "run") in message and "\n" not in message
    assert not (tmp_path / "run" / "reranker.pt").exists()
    # a validation cache of its own is no leak: the first stage never trained on it
    val = synthetic_cache(tmp_path / "val.h5", videos=12, seed=1)
    from tvrerank.index.store import build_index_dir

    build_index_dir(val, tmp_path / "val-index")
    write_candidates(tmp_path / "val-c.h5", build_candidates(val, k=6, index_dir=tmp_path / "val-index"), val)
    train(cache, candidates, tmp_path / "ok", TrainConfig(**{**options, "val_fraction": 0.0}), val_cache=val,
          val_candidates=tmp_path / "val-c.h5", progress=False)


def test_parameters_under_a_prefix_learn_at_their_own_rate():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Sequential(torch.nn.Linear(4, 2)))
    optimizer = build_optimizer(model, OptimConfig(weight_decay=0.1), lr_scales={"1": 10.0, "unknown": 3.0})
    set_lr(optimizer, 1e-3)
    rates = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert rates[id(model[0].weight)] == pytest.approx(1e-3) and rates[id(model[0].bias)] == pytest.approx(1e-3)
    assert rates[id(model[1][0].weight)] == pytest.approx(1e-2) and rates[id(model[1][0].bias)] == pytest.approx(1e-2)
    assert len(rates) == 4  # every parameter once
    # no scale (or scale 1): the two groups the optimizer always had, so older checkpoints resume
    assert len(build_optimizer(model, OptimConfig(), lr_scales={"1": 1.0}).param_groups) == 2
