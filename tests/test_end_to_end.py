"""The toy world end to end through the command line: `eval --reranker` reports, for every test
caption, exactly the rank at which `retrieve --json` serves its true video (same cache, index, run)."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import cli_output

K = 8
TRAINING = {"captions": 8, "negatives": 4, "in_batch": 2, "lr": 1e-3, "warmup": 5, "eval_every": 10,
            "model": {"width": 32, "heads": 2, "layers": 1, "queries": 4, "frame_keep": 4, "video_keep": 12,
                      "perturb_samples": 8}}


invoke = cli_output


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    invoke("toy", "make", "--out", root / "data", "--videos", 64, "--seed", 1)
    for split in ("train", "test"):
        invoke("extract", "--annotations", root / "data" / f"{split}.jsonl", "--videos", root / "data",
               "--model", "tvr-toy", "--pretrained", "toy", "--out", root / f"{split}.h5", "--frames", 8,
               "--text-tokens", 48, "--workers", 0, "--device", "cpu", "--quiet")
        invoke("index", root / f"{split}.h5", "--out", root / f"{split}-index")
        invoke("candidates", root / f"{split}.h5", "--index", root / f"{split}-index", "--out",
               root / f"{split}-candidates.h5", "--k", K)
    (root / "train.json").write_text(json.dumps(TRAINING))
    invoke("train", "--cache", root / "train.h5", "--candidates", root / "train-candidates.h5", "--val-fraction",
           0.2, "--out", root / "run", "--config", root / "train.json", "--steps", 30, "--device", "cpu")
    return root


def test_eval_ranks_equal_the_ranks_retrieve_serves(toy_run):
    root = toy_run
    invoke("eval", "--cache", root / "test.h5", "--candidates", root / "test-candidates.h5", "--reranker",
           root / "run", "--device", "cpu", "--ranks-out", root / "ranks.csv")
    with open(root / "ranks.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and {"caption", "video_id", "stage1", "reranked"} <= rows[0].keys()
    queries = root / "queries.txt"
    queries.write_text("".join(row["caption"] + "\n" for row in rows))
    output = invoke("retrieve", "--gallery", root / "test.h5", "--index", root / "test-index", "--reranker",
                    root / "run", "--device", "cpu", "--json", "--top", K, "--k", K, "--queries-file", queries)
    served = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert len(served) == len(rows)
    moved = 0
    for row, result in zip(rows, served):
        assert result["query"] == row["caption"]
        ids = [hit["video_id"] for hit in result["results"]]
        rank = int(row["reranked"])
        if rank <= K:
            assert ids.index(row["video_id"]) + 1 == rank, row
        else:
            assert row["video_id"] not in ids, row
        moved += rank != int(row["stage1"])
    assert moved > 0  # the re-ranker changed some ranks: the comparison is not stage 1 against itself
