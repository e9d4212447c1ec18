"""The training loop: learning from the cache alone, resume after SIGKILL, torchrun, refusals."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import kill_at_first_checkpoint, synthetic_cache

from tvrerank.cache.reader import CacheReader
from tvrerank.errors import CacheMismatch, InputError, NonFiniteScores
from tvrerank.evaluation import evaluate_run
from tvrerank.index.candidates import build_candidates, write_candidates
from tvrerank.index.store import build_index_dir
from tvrerank.rerank.checkpoint import load_reranker
from tvrerank.rerank.variants import build_reranker
from tvrerank.train.data import BatchSpec, TrainingBatches
from tvrerank.train.loop import TrainConfig, model_config_for, train, train_step

# The synthetic cache's captions copy a frame's patch tokens: a word-to-patch signal, which the
# earlier design's term (scale 5 at the start) reads in a few steps, so the loop's tests stay short.
# The attention path learns it too, but slowly; docs/ablation.md measures the parts on the toy world.
SMALL_MODEL = {"width": 32, "heads": 2, "layers": 1, "queries": 4, "frame_keep": 2, "video_keep": 6,
               "dropout": 0.0, "perturb_samples": 8, "combine": "joint", "token_match": True,
               "token_match_init": 5.0}


def split(tmp_path: Path, name: str, seed: int, failed=(), videos: int = 40) -> tuple[Path, Path]:
    cache = synthetic_cache(tmp_path / f"{name}.h5", videos=videos, captions_per_video=2, seed=seed,
                            failed=failed, stage1_noise=1.2)
    build_index_dir(cache, tmp_path / f"{name}-index")
    candidates = tmp_path / f"{name}-candidates.h5"
    write_candidates(candidates, build_candidates(cache, k=10, index_dir=tmp_path / f"{name}-index"), cache)
    return cache, candidates


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    return root, split(root, "train", 0, failed=(5,), videos=120), split(root, "val", 1)


def test_training_from_the_cache_beats_stage_one(data, caplog):
    root, (cache, candidates), (val_cache, val_candidates) = data
    config = TrainConfig(optim={"steps": 80, "lr": 2e-3, "warmup": 10}, captions=16, negatives=5, in_batch=2,
                         model=SMALL_MODEL, checkpoint_every=40, eval_every=20)
    metrics = train(cache, candidates, root / "run", config, val_cache=val_cache, val_candidates=val_candidates,
                    progress=False)
    val = metrics["val"]
    assert val["reranked"]["R1"] >= val["stage1"]["R1"] + 15, val
    assert metrics["best_step"] in (20, 40, 60, 80)
    assert "2 captions belong to videos that failed extraction" in caplog.text
    for name in ("reranker.pt", "checkpoint.pt", "config.json", "metrics.json", "log.csv"):
        assert (root / "run" / name).exists(), name
    loaded = load_reranker(root / "run")
    assert loaded.model.config.width == 32 and 0.0 <= loaded.fusion_alpha <= 1.0
    again = evaluate_run(root / "run", val_cache, val_candidates, device="cpu")
    assert again["reranked"]["R1"] == val["reranked"]["R1"]


def test_two_runs_with_one_seed_are_identical_at_the_default_thread_count(data, tmp_path):
    """On the CPU, deterministic algorithms make the per-pair gather's backward add in a fixed order."""
    root, (cache, candidates), _ = data
    torch.set_num_threads(max(2, torch.get_num_threads()))
    config = TrainConfig(optim={"steps": 30}, captions=16, negatives=5, in_batch=2, checkpoint_every=30,
                         model=dict(SMALL_MODEL, combine="hierarchical"))
    metrics = [train(cache, candidates, tmp_path / name, config, progress=False) for name in ("a", "b")]
    assert metrics[0]["deterministic"] and not torch.are_deterministic_algorithms_enabled()  # restored
    a, b = load_reranker(tmp_path / "a").model.state_dict(), load_reranker(tmp_path / "b").model.state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("token_dtype", ["float16", "int8"])
def test_training_in_memory_equals_training_from_the_file(tmp_path, token_dtype, caplog):
    """train --in-memory on/off: the same batches, so the same weights bit for bit; the run logs its choice."""
    cache = synthetic_cache(tmp_path / "c.h5", videos=30, token_dtype=token_dtype, stage1_noise=1.2)
    build_index_dir(cache, tmp_path / "index")
    candidates = tmp_path / "k.h5"
    write_candidates(candidates, build_candidates(cache, k=8, index_dir=tmp_path / "index"), cache)
    states = {}
    for mode in ("off", "on"):
        config = TrainConfig(optim={"steps": 6}, captions=8, negatives=3, in_batch=1, val_fraction=0.2, eval_every=3,
                             model=SMALL_MODEL, in_memory=mode)
        with caplog.at_level("INFO", logger="tvrerank.cache.rows"):
            train(cache, candidates, tmp_path / mode, config, progress=False)
        states[mode] = load_reranker(tmp_path / mode).model.state_dict()
        assert ("in memory" if mode == "on" else "reading every row from the file") in caplog.text
    for name in states["off"]:
        assert torch.equal(states["off"][name], states["on"][name]), name


def test_refusals(data, tmp_path):
    root, (cache, candidates), (val_cache, val_candidates) = data
    config = TrainConfig(optim={"steps": 2}, model=SMALL_MODEL)
    with pytest.raises(CacheMismatch):  # candidates of another cache
        train(cache, val_candidates, tmp_path / "a", config, progress=False)
    other = synthetic_cache(tmp_path / "other.h5", videos=10, model="another-encoder")
    with pytest.raises(CacheMismatch, match=r"encoder.model synthetic \(it\) vs another-encoder"):
        train(cache, candidates, tmp_path / "b", config, val_cache=other, val_candidates=val_candidates,
              progress=False)
    train(cache, candidates, tmp_path / "c", config, progress=False)
    with pytest.raises(ValueError, match="--resume"):
        train(cache, candidates, tmp_path / "c", config, progress=False)
    with pytest.raises(CacheMismatch):
        evaluate_run(tmp_path / "c", other, val_candidates, device="cpu")


def _train_command(cache, candidates, out, config_path):
    return [sys.executable, "-m", "tvrerank.cli", "train", "--cache", str(cache), "--candidates", str(candidates),
            "--out", str(out), "--config", str(config_path), "--device", "cpu"]


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(data, tmp_path):
    root, (cache, candidates), _ = data
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps({"steps": 40, "captions": 8, "negatives": 3, "in_batch": 1,
                                       "checkpoint_every": 5, "model": SMALL_MODEL}))
    reference = subprocess.run(_train_command(cache, candidates, tmp_path / "ref", config_path),
                               capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-2000:]
    out = tmp_path / "killed"
    kill_at_first_checkpoint(_train_command(cache, candidates, out, config_path), out, "reranker.pt")
    resumed = subprocess.run(_train_command(cache, candidates, out, config_path) + ["--resume"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = load_reranker(tmp_path / "ref").model.state_dict(), load_reranker(out).model.state_dict()
    for name in a:  # at the default thread count: bit for bit
        assert torch.equal(a[name], b[name]), name


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_process_with_the_same_global_batch(data, tmp_path):
    """2 ranks x 4 captions == 1 process x 2 micro-batches of 4: same batches, same weights, same validation."""
    root, (cache, candidates), _ = data
    deterministic = dict(SMALL_MODEL, frame_keep=4, video_keep=20)  # nothing to select: no perturbation noise
    common = {"steps": 4, "captions": 4, "negatives": 3, "in_batch": 1, "lr": 1e-3, "warmup": 0, "eval_every": 2,
              "val_fraction": 0.25, "model": deterministic}
    (tmp_path / "ddp.json").write_text(json.dumps(common))
    (tmp_path / "single.json").write_text(json.dumps(dict(common, grad_accum=2)))
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m", "tvrerank.cli",
               *_train_command(cache, candidates, tmp_path / "ddp", tmp_path / "ddp.json")[3:]]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    single = subprocess.run(_train_command(cache, candidates, tmp_path / "single", tmp_path / "single.json"),
                            capture_output=True, text=True, timeout=300, env=env)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp_run, single_run = load_reranker(tmp_path / "ddp"), load_reranker(tmp_path / "single")
    assert ddp_run.step == single_run.step
    a, b = ddp_run.model.state_dict(), single_run.model.state_dict()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=2e-4), (name, (a[name] - b[name]).abs().max())
    ddp_metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    single_metrics = json.loads((tmp_path / "single" / "metrics.json").read_text())
    assert ddp_metrics["val"]["evaluated"] == single_metrics["val"]["evaluated"] > 0  # every validation caption
    assert ddp_metrics["val"]["stage1"] == single_metrics["val"]["stage1"]
    log_lines = (tmp_path / "ddp" / "log.csv").read_text().splitlines()
    assert log_lines[0].startswith("step,") and len(log_lines) == 1 + 4  # rank 0 alone wrote it, once
    ddp_losses = [float(line.split(",")[2]) for line in log_lines[1:]]
    single_losses = [float(line.split(",")[2]) for line in (tmp_path / "single" / "log.csv").read_text().splitlines()[1:]]
    assert ddp_losses == pytest.approx(single_losses, rel=1e-3)


def _merge(first: dict, second: dict) -> dict:
    """One batch holding both micro-batches' captions (the second's video indices shifted)."""
    merged = {name: torch.cat([first[name], second[name]]) for name in first if name != "pair_video"}
    merged["pair_video"] = torch.cat([first["pair_video"], second["pair_video"] + len(first["tokens"])])
    return merged


def test_gradient_accumulation_equals_one_batch_twice_as_large(data):
    """Two micro-batches of 4 captions take the same step as one batch of 8 (eval mode: no noise)."""
    root, (cache, candidates), _ = data
    with CacheReader(cache) as reader:
        model_config = model_config_for(reader, SMALL_MODEL)
    lists = build_candidates(cache, k=10, index_dir=root / "train-index")
    batches = TrainingBatches(cache, lists.video, spec=BatchSpec(captions=4, negatives=2, in_batch=1), steps=1,
                              grad_accum=2)
    first, second = batches[0], batches[1]
    torch.manual_seed(0)
    initial = build_reranker(model_config).state_dict()
    weights = []
    for grad_accum, micro_batches in ((2, [first, second]), (1, [_merge(first, second)])):
        torch.manual_seed(0)
        model = build_reranker(model_config).eval()  # hard top-k, no dropout: deterministic
        config = TrainConfig(captions=4, grad_accum=grad_accum, model=SMALL_MODEL)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # the step is the (clipped) gradient itself
        loss = train_step(model, optimizer, iter(micro_batches), config=config, lr=1.0, device=torch.device("cpu"),
                          step=0)
        weights.append((loss, {name: p.detach().clone() for name, p in model.named_parameters()}))
    (loss_a, a), (loss_b, b) = weights
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    moved = 0
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
        moved += not torch.equal(a[name], initial[name])
    assert moved > 10  # the step changed the weights


def test_training_with_worker_processes_and_accumulation_runs(data, tmp_path):
    root, (cache, candidates), _ = data
    config = TrainConfig(optim={"steps": 2}, captions=4, negatives=2, in_batch=1, grad_accum=2, workers=1,
                         model=SMALL_MODEL)
    metrics = train(cache, candidates, tmp_path / "accum", config, progress=False)
    assert metrics["steps"] == 2 and metrics["final_loss"] > 0
    assert load_reranker(tmp_path / "accum").step == 2


def test_a_diverging_run_stops_naming_the_step_and_keeps_its_checkpoint(tmp_path):
    cache, candidates = split(tmp_path, "nan", 0)
    with h5py.File(cache, "r+") as f:
        tokens = f["videos/tokens"][()]
        tokens[:] = np.nan  # every video: the first step's loss is NaN
        f["videos/tokens"][:] = tokens
    config = TrainConfig(optim={"steps": 3}, captions=4, negatives=2, in_batch=1, model=SMALL_MODEL)
    with pytest.raises(NonFiniteScores, match="training step 1: the loss is nan"):
        train(cache, candidates, tmp_path / "run", config, progress=False)
    assert not (tmp_path / "run" / "reranker.pt").exists()


def test_validation_held_out_of_the_training_cache(data, tmp_path):
    root, (cache, candidates), _ = data
    config = TrainConfig(optim={"steps": 4}, captions=8, negatives=3, in_batch=1, eval_every=2, val_fraction=0.2,
                         seed=5, model=SMALL_MODEL)
    metrics = train(cache, candidates, tmp_path / "run", config, progress=False)
    validation = metrics["splits"]["validation"]
    assert len(validation["videos"]) == round(0.2 * 119)  # 120 videos, one failed
    assert metrics["val"]["evaluated"] == 2 * len(validation["videos"])  # their captions, 2 each
    again = train(cache, candidates, tmp_path / "again", config, progress=False)["splits"]["validation"]
    assert again["videos"] == validation["videos"]  # drawn from the seed alone
    other = dataclasses.replace(config, seed=6)
    assert train(cache, candidates, tmp_path / "other", other, progress=False)["splits"]["validation"]["videos"] \
        != validation["videos"]
    saved = load_reranker(tmp_path / "run")
    assert saved.splits["validation"]["videos"] == validation["videos"]
    with pytest.raises(InputError, match="not both"):
        train(cache, candidates, tmp_path / "both", config, val_cache=cache, val_candidates=candidates,
              progress=False)


def test_paper_recipe_binary_loss_similarity_negatives_negative_captions_plain_sum(data, tmp_path):
    """The method's own recipe runs end to end and the run keeps its fusion: eval's "reranked" is the
    plain sum, with no tuned weight."""
    root, (cache, candidates), (val_cache, val_candidates) = data
    config = TrainConfig(optim={"steps": 4}, captions=8, negatives=1, in_batch=1, negative_captions=1, loss="binary",
                         negative_sampling="similarity", fusion="sum", eval_every=2, model=SMALL_MODEL)
    metrics = train(cache, candidates, tmp_path / "run", config, val_cache=val_cache, val_candidates=val_candidates,
                    progress=False)
    assert metrics["fusion"] == "sum" and metrics["val"]["alpha"] is None
    assert set(metrics["selection_gap"]) == {"hard_R1", "soft_R1", "hard_minus_soft"}
    saved = load_reranker(tmp_path / "run")
    assert saved.fusion == "sum" and saved.fusion_alpha is None
    result = evaluate_run(tmp_path / "run", val_cache, val_candidates, device="cpu")
    assert result["fusion"] == "sum" and result["reranked"] == result["plain_sum"]


def test_pair_loss_reads_negative_captions_in_both_losses():
    from tvrerank.train.loop import pair_loss

    scores = torch.tensor([[2.0, 0.0, -1.0], [1.0, 0.5, 0.0]])
    text = torch.tensor([[3.0], [-2.0]])  # caption 0's video scores a wrong caption above its own
    assert pair_loss(scores, "listwise", text) > pair_loss(scores, "listwise")
    assert pair_loss(scores, "binary", text) > pair_loss(scores, "binary", -text)
    assert torch.isclose(pair_loss(scores, "both", text), pair_loss(scores, "listwise", text)
                         + pair_loss(scores, "binary", text))


def test_accumulation_skips_the_gradient_all_reduce_on_all_but_the_last_micro_batch(data):
    """A DDP-like wrapper: ``no_sync`` must cover micro-batches 1..N-1 and never the last one."""
    root, (cache, candidates), _ = data
    with CacheReader(cache) as reader:
        model = build_reranker(model_config_for(reader, SMALL_MODEL))
    lists = build_candidates(cache, k=10, index_dir=root / "train-index")
    batches = TrainingBatches(cache, lists.video, spec=BatchSpec(captions=4, negatives=2, in_batch=1), steps=1,
                              grad_accum=3)

    class Wrapped(torch.nn.Module):  # what DistributedDataParallel offers: no_sync()
        def __init__(self):
            super().__init__()
            self.module, self.inside_no_sync, self.synced = model, False, []

        @contextlib.contextmanager
        def no_sync(self):
            self.inside_no_sync = True
            try:
                yield
            finally:
                self.inside_no_sync = False

        def forward(self, *args):
            self.synced.append(not self.inside_no_sync)
            return self.module(*args)

    wrapped = Wrapped()
    config = TrainConfig(captions=4, grad_accum=3, model=SMALL_MODEL)
    train_step(wrapped, torch.optim.SGD(model.parameters(), lr=0.1), iter([batches[i] for i in range(3)]),
               config=config, lr=0.1, device=torch.device("cpu"), step=0)
    assert wrapped.synced == [False, False, True]


def test_a_reranker_is_refused_on_a_cache_of_another_token_encoding(tmp_path):
    from tvrerank.cache.compact import compact_cache

    cache, candidates = split(tmp_path, "c", 0, videos=20)
    train(cache, candidates, tmp_path / "run", TrainConfig(optim={"steps": 2}, captions=4, model=SMALL_MODEL),
          progress=False)
    compact = compact_cache(cache, tmp_path / "c8.h5", token_dtype="int8", progress=False)
    with pytest.raises(CacheMismatch, match=r"layout\.token_dtype float16 \(it\) vs int8"):
        evaluate_run(tmp_path / "run", compact, candidates, device="cpu")


def test_the_selector_warm_start_reads_every_patch_then_selects_and_distils_the_scorer(data, tmp_path, monkeypatch):
    """selector_warmup: the first steps keep every patch (the frame level's attention reads them all),
    later steps the top-M; validation always selects (as the saved model will); selector_distill adds the
    scorer's distillation loss, so the frame scorer changes even while the warm-up does not use it."""
    from tvrerank.rerank.model import Reranker

    root, (cache, candidates), (val_cache, val_candidates) = data
    seen = []  # (training?, patches kept per frame) of every selection
    select = Reranker.select

    def recording(self, tokens, frame_emb, frame_mask, **kwargs):
        videos = select(self, tokens, frame_emb, frame_mask, **kwargs)
        seen.append((self.training, videos.frame_tokens.shape[2] - 1))
        return videos

    monkeypatch.setattr(Reranker, "select", recording)
    model = {**SMALL_MODEL, "combine": "hierarchical", "token_match": False}
    config = TrainConfig(optim={"steps": 4, "warmup": 1}, captions=8, negatives=2, in_batch=1, eval_every=2,
                         model=model, selector_warmup=0.5, selector_distill=1.0)
    train(cache, candidates, tmp_path / "run", config, val_cache=val_cache, val_candidates=val_candidates,
          progress=False)
    patches = load_reranker(tmp_path / "run").model.config.tokens_per_frame
    trained = [kept for training, kept in seen if training]
    assert trained == [patches, patches, 2, 2]  # two warm-up steps read all, then M = 2
    assert {kept for training, kept in seen if not training} == {2}
    assert load_reranker(tmp_path / "run").model.frame_selector.reads_all is False

    # the distillation alone moves the scorer during the warm-up (the pair loss does not reach it there)
    torch.manual_seed(0)
    with CacheReader(cache) as reader:
        reranker = build_reranker(model_config_for(reader, model))
    before = [p.detach().clone() for p in reranker.frame_selector.score.parameters()]
    lists = build_candidates(cache, k=6, index_dir=root / "train-index")
    batches = TrainingBatches(cache, lists.video, spec=BatchSpec(captions=4, negatives=2, in_batch=0), steps=1)
    from tvrerank.training import build_optimizer
    optimizer = build_optimizer(reranker, TrainConfig().optim)
    reranker.train()
    reranker.frame_selector.reads_all = True
    for weight, moved in ((0.0, False), (1.0, True)):
        train_step(reranker, optimizer, iter([batches[0]]), config=dataclasses.replace(config, selector_distill=weight),
                   lr=1e-2, device=torch.device("cpu"), step=0)
        after = list(reranker.frame_selector.score.parameters())
        assert any(not torch.equal(a, b) for a, b in zip(after, before)) == moved, weight
        before = [p.detach().clone() for p in after]
