"""The training loop: learning from the cache alone, resume after SIGKILL, torchrun, refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import synthetic_cache

from tvrerank.index.candidates import build_candidates, write_candidates
from tvrerank.index.store import IndexMismatch, build_index_dir
from tvrerank.train.checkpoint import load_reranker
from tvrerank.train.evaluate import CacheMismatch, evaluate_run
from tvrerank.train.loop import TrainConfig, lr_at, train

SMALL_MODEL = {"width": 32, "heads": 2, "layers": 1, "queries": 4, "frame_keep": 2, "video_keep": 6,
               "dropout": 0.0, "perturb_samples": 8}


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


def test_lr_schedule_is_a_pure_function_of_the_step():
    config = TrainConfig(steps=100, warmup=10, lr=1e-3, min_lr_ratio=0.1)
    assert lr_at(0, config) == pytest.approx(1e-4)
    assert lr_at(9, config) == pytest.approx(1e-3)
    assert lr_at(99, config) == pytest.approx(1e-4, rel=1e-2)
    assert lr_at(50, config) == lr_at(50, config) and lr_at(30, config) > lr_at(60, config)


def test_training_from_the_cache_beats_stage_one(data, caplog):
    root, (cache, candidates), (val_cache, val_candidates) = data
    config = TrainConfig(steps=80, captions=16, negatives=5, in_batch=2, lr=2e-3, warmup=10, model=SMALL_MODEL,
                         checkpoint_every=40, eval_every=20)
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


def test_refusals(data, tmp_path):
    root, (cache, candidates), (val_cache, val_candidates) = data
    config = TrainConfig(steps=2, model=SMALL_MODEL)
    with pytest.raises(IndexMismatch):  # candidates of another cache
        train(cache, val_candidates, tmp_path / "a", config, progress=False)
    other = synthetic_cache(tmp_path / "other.h5", videos=10, model="another-encoder")
    with pytest.raises(CacheMismatch, match="another encoder"):
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
    process = subprocess.Popen(_train_command(cache, candidates, out, config_path),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if (out / "checkpoint.pt").exists():
            os.kill(process.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    process.wait()
    assert process.returncode == -signal.SIGKILL and not (out / "reranker.pt").exists()
    resumed = subprocess.run(_train_command(cache, candidates, out, config_path) + ["--resume"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = load_reranker(tmp_path / "ref").model.state_dict(), load_reranker(out).model.state_dict()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(data, tmp_path):
    root, (cache, candidates), _ = data
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps({"steps": 4, "captions": 8, "negatives": 3, "in_batch": 1,
                                       "model": SMALL_MODEL}))
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--nproc_per_node", "2", "--master_port", "29541", "-m", "tvrerank.cli",
               *_train_command(cache, candidates, tmp_path / "ddp", config_path)[3:]]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert load_reranker(tmp_path / "ddp").step == 4


def test_gradient_accumulation_and_worker_processes(data, tmp_path):
    root, (cache, candidates), _ = data
    config = TrainConfig(steps=2, captions=4, negatives=2, in_batch=1, grad_accum=2, workers=1, model=SMALL_MODEL)
    metrics = train(cache, candidates, tmp_path / "accum", config, progress=False)
    assert metrics["steps"] == 2 and metrics["final_loss"] > 0
    assert load_reranker(tmp_path / "accum").step == 2
