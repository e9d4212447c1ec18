"""firststage/: the model starts as the zero-shot first stage, trains deterministically and resumes
exactly, its embeddings belong to one cache, and the CLI path firststage train → embed →
candidates → train → eval runs end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import flip_tensor_bytes, kill_at_first_checkpoint, synthetic_cache

from tvrerank.cli import main
from tvrerank.errors import CacheMismatch, CorruptFile
from tvrerank.firststage import train as train_module
from tvrerank.firststage.model import FirstStage, FirstStageConfig
from tvrerank.firststage.store import embed_cache, load_first_stage
from tvrerank.firststage.train import FirstStageTrainConfig, train_first_stage
from tvrerank.index.candidates import build_candidates

SMALL = {"optim": {"steps": 12, "warmup": 2}, "batch": 8, "eval_every": 4, "checkpoint_every": 4, "device": "cpu",
         "model": {"layers": 1, "heads": 2}}


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("pooling", ["transformer", "mean"])
def test_an_untrained_first_stage_is_the_zero_shot_one(pooling):
    torch.manual_seed(0)
    model = FirstStage(config=FirstStageConfig(embed_dim=16, frames=4, pooling=pooling, heads=2)).eval()
    frames = F.normalize(torch.randn(3, 4, 16), dim=-1)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    zero_shot = F.normalize((frames * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=-1)
    assert torch.allclose(model.videos(frames, mask), zero_shot, atol=1e-6)
    text = torch.randn(5, 16)
    assert torch.allclose(model.texts(text), F.normalize(text, dim=-1), atol=1e-6)


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = FirstStage(config=FirstStageConfig(embed_dim=16, frames=4, heads=2, dropout=0.0))
    with torch.no_grad():  # move off the zero start, where the blocks' inner weights get no gradient yet
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    loss = model(torch.randn(6, 4, 16), torch.ones(6, 4, dtype=torch.bool), torch.randn(6, 16))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("firststage")
    return {"train": synthetic_cache(root / "train.h5", videos=40, seed=0),
            "val": synthetic_cache(root / "val.h5", videos=16, seed=1),
            "test": synthetic_cache(root / "test.h5", videos=20, seed=2),
            "other": synthetic_cache(root / "other.h5", videos=20, seed=3, model="another-encoder"), "root": root}


def test_training_is_deterministic_and_resumes_exactly(caches, tmp_path, monkeypatch):
    config = FirstStageTrainConfig(**SMALL)
    a = train_first_stage(caches["train"], tmp_path / "a", config, val_cache=caches["val"], progress=False)
    b = train_first_stage(caches["train"], tmp_path / "b", config, val_cache=caches["val"], progress=False)
    assert a == b
    weights = [load_first_stage(tmp_path / name).model.state_dict() for name in ("a", "b")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])

    real_save = train_module.save_checkpoint

    class Killed(Exception):
        pass

    def killed_after_first_checkpoint(*args, **kwargs):
        real_save(*args, **kwargs)
        raise Killed

    monkeypatch.setattr(train_module, "save_checkpoint", killed_after_first_checkpoint)
    with pytest.raises(Killed):
        train_first_stage(caches["train"], tmp_path / "c", config, val_cache=caches["val"], progress=False)
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    c = train_first_stage(caches["train"], tmp_path / "c", config, val_cache=caches["val"], resume=True,
                          progress=False)
    assert c == a
    resumed = load_first_stage(tmp_path / "c").model.state_dict()
    assert all(torch.equal(weights[0][k], resumed[k]) for k in resumed)


def test_embeddings_belong_to_one_cache_and_one_encoder(caches, tmp_path):
    config = FirstStageTrainConfig(**dict(SMALL, optim={"steps": 2}))
    train_first_stage(caches["train"], tmp_path / "run", config, progress=False)
    record = embed_cache(tmp_path / "run", caches["test"], tmp_path / "emb")
    assert np.load(tmp_path / "emb" / "text_emb.npy").shape == (record["captions"], 16)
    with pytest.raises(CacheMismatch, match="made with the same encoder"):
        embed_cache(tmp_path / "run", caches["other"], tmp_path / "emb-other")
    # the test cache's embeddings given for the validation cache: same width, other rows
    with pytest.raises(CacheMismatch) as error:
        build_candidates(caches["val"], k=4, text_emb=tmp_path / "emb" / "text_emb.npy",
                         video_emb=tmp_path / "emb" / "video_emb.npy")
    assert str(caches["test"]) in str(error.value) and str(caches["val"]) in str(error.value)


def test_a_damaged_first_stage_or_its_embeddings_are_refused(caches, tmp_path):
    train_first_stage(caches["train"], tmp_path / "run", FirstStageTrainConfig(**dict(SMALL, optim={"steps": 2})),
                      progress=False)
    embed_cache(tmp_path / "run", caches["test"], tmp_path / "emb")
    emb = {"text_emb": tmp_path / "emb" / "text_emb.npy", "video_emb": tmp_path / "emb" / "video_emb.npy"}
    build_candidates(caches["test"], k=4, **emb)
    video_emb = np.load(emb["video_emb"])
    video_emb[[0, 1]] = video_emb[[1, 0]]  # two videos trade embeddings: still finite, still unit length
    np.save(emb["video_emb"], video_emb)
    with pytest.raises(CorruptFile, match=r"video_emb.npy: not readable embeddings \(its sha256 differs from "
                                          r"first_stage.json's record"):
        build_candidates(caches["test"], k=4, **emb)
    flip_tensor_bytes(tmp_path / "run" / "firststage.pt")
    with pytest.raises(CorruptFile, match=r"firststage.pt: not a readable checkpoint \(its bytes differ from the "
                                          r"sha256 in firststage.pt.sha256"):
        load_first_stage(tmp_path / "run")


def test_cli_firststage_train_embed_candidates_train_eval(caches, tmp_path):
    root = tmp_path
    (root / "fs.json").write_text(json.dumps({k: v for k, v in SMALL.items() if k != "device"}))
    result = run("firststage", "train", "--cache", caches["train"], "--val-cache", caches["val"], "--out",
                 root / "fs", "--config", root / "fs.json", "--device", "cpu")
    assert result.exit_code == 0 and "zero-shot" in result.output, result.output
    assert run("firststage", "train", "--cache", caches["train"], "--out", root / "fs").exit_code == 2  # no overwrite
    for split in ("train", "test"):
        assert run("firststage", "embed", "--run", root / "fs", "--cache", caches[split], "--out",
                   root / "emb" / split).exit_code == 0
        result = run("candidates", caches[split], "--text-emb", root / "emb" / split / "text_emb.npy", "--video-emb",
                     root / "emb" / split / "video_emb.npy", "--out", root / f"{split}.h5", "--k", "4")
        assert result.exit_code == 0, result.output
    (root / "rr.json").write_text(json.dumps({"captions": 4, "negatives": 2, "in_batch": 1, "model": {
        "width": 16, "heads": 2, "layers": 1, "queries": 2, "video_keep": 4, "perturb_samples": 4}}))
    assert run("train", "--cache", caches["train"], "--candidates", root / "train.h5", "--out", root / "rr",
               "--config", root / "rr.json", "--steps", "2", "--device", "cpu").exit_code == 0
    result = run("eval", "--cache", caches["test"], "--candidates", root / "test.h5", "--reranker", root / "rr",
                 "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["stage1"]["R1"] >= 0
    bad = run("firststage", "embed", "--run", root / "fs", "--cache", caches["other"], "--out", root / "x")
    assert bad.exit_code == 2 and "same encoder" in bad.output and "Traceback" not in bad.output


def test_retrieve_runs_new_queries_through_the_trained_first_stage(tmp_path):
    from conftest import TINY_VIT, make_dataset

    from tvrerank.cache.reader import CacheReader
    from tvrerank.retrieve.retriever import text_encoder_for

    annotations = make_dataset(tmp_path / "data", num_videos=6, broken=False)
    cache = tmp_path / "gallery.h5"
    assert run("extract", "--annotations", annotations, "--videos", annotations.parent, "--model", TINY_VIT, "--out",
               cache, "--frames", "4", "--workers", "0", "--device", "cpu", "--quiet").exit_code == 0
    (tmp_path / "fs.json").write_text(json.dumps(dict(SMALL, steps=3, batch=4, device="cpu")))
    assert run("firststage", "train", "--cache", cache, "--out", tmp_path / "fs", "--config", tmp_path / "fs.json"
               ).exit_code == 0
    assert run("firststage", "embed", "--run", tmp_path / "fs", "--cache", cache, "--out", tmp_path / "emb").exit_code == 0
    result = run("index", cache, "--video-emb", tmp_path / "emb" / "video_emb.npy", "--out", tmp_path / "index-fs")
    assert result.exit_code == 0, result.output
    assert run("index", cache, "--out", tmp_path / "index").exit_code == 0
    query = "clip 2 caption 1"
    result = run("retrieve", query, "--gallery", cache, "--index", tmp_path / "index-fs", "--first-stage",
                 tmp_path / "fs", "--no-rerank", "--top", "6", "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    hits = json.loads(result.output.strip().splitlines()[-1])["results"]
    # the expected stage-1 scores: the text encoder, the trained text side, the trained video embeddings
    first_stage = load_first_stage(tmp_path / "fs")
    with CacheReader(cache) as reader:
        text_emb = text_encoder_for(reader, "cpu").encode_texts([query])[0]
        ids = list(reader.strings("videos/id"))
    with torch.no_grad():
        expected = first_stage.model.texts(torch.from_numpy(text_emb)).numpy() @ np.load(
            tmp_path / "emb" / "video_emb.npy").T
    assert [hit["stage1"] for hit in hits] == pytest.approx([float(expected[0, ids.index(h["video_id"])])
                                                             for h in hits], abs=1e-5)
    # an index and a first stage that do not belong together are refused, naming what to do
    retrieve = ("retrieve", query, "--gallery", cache, "--no-rerank", "--device", "cpu")
    without = run(*retrieve, "--index", tmp_path / "index-fs")
    assert without.exit_code == 2 and "--first-stage" in without.output
    wrong = run(*retrieve, "--index", tmp_path / "index", "--first-stage", tmp_path / "fs")
    assert wrong.exit_code == 2 and "--video-emb" in wrong.output
    listed = run("candidates", cache, "--index", tmp_path / "index-fs", "--out", tmp_path / "c.h5")
    assert listed.exit_code == 2 and "--text-emb" in listed.output


@pytest.mark.slow
def test_torchrun_trains_a_first_stage_on_two_processes(caches, tmp_path):
    """Each rank takes half of every step's videos (its own in-batch negatives); DDP averages the gradients."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "fs.json").write_text(json.dumps({k: v for k, v in SMALL.items() if k != "device"}))
    command = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--master_port", str(port),
               "-m", "tvrerank.cli", "firststage", "train", "--cache", str(caches["train"]), "--val-cache",
               str(caches["val"]), "--out", str(tmp_path / "ddp"), "--config", str(tmp_path / "fs.json"),
               "--device", "cpu"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=dict(os.environ,
                                                                                          OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["steps"] == SMALL["optim"]["steps"] and len(metrics["history"]) == 3
    assert load_first_stage(tmp_path / "ddp").model.config.layers == 1


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(caches, tmp_path):
    """A first stage killed mid-run and resumed ends bit-identical to one that ran through (dropout included:
    the checkpoint carries the torch RNG), with every step in log.csv."""
    import subprocess
    import sys

    options = dict(SMALL, optim={"steps": 300, "warmup": 2}, eval_every=50, checkpoint_every=5,
                   model={"layers": 1, "heads": 2, "dropout": 0.1})
    (tmp_path / "fs.json").write_text(json.dumps(options))

    def command(out):
        return [sys.executable, "-m", "tvrerank.cli", "firststage", "train", "--cache", str(caches["train"]),
                "--val-cache", str(caches["val"]), "--out", str(out), "--config", str(tmp_path / "fs.json")]

    reference = subprocess.run(command(tmp_path / "ref"), capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-2000:]
    out = tmp_path / "killed"
    kill_at_first_checkpoint(command(out), out, "firststage.pt")
    resumed = subprocess.run(command(out) + ["--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = load_first_stage(tmp_path / "ref").model.state_dict(), load_first_stage(out).model.state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    steps = [int(line.split(",")[0]) for line in (out / "log.csv").read_text().splitlines()[1:]]
    assert steps[-1] == 300 and set(steps) == set(range(1, 301))
    assert json.loads((out / "metrics.json").read_text())["validation"] == \
        json.loads((tmp_path / "ref" / "metrics.json").read_text())["validation"]
