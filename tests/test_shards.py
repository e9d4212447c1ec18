"""`tvrerank split` (retrieve/shards.py) on the served demo's test gallery: the shards' slices, their
stores, and shard folders whose files disagree, refused in one line naming the folder."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from tvrerank.cli import main
from tvrerank.index.store import load_index_dir
from tvrerank.retrieve.retriever import Retriever


def test_the_shards_hold_disjoint_slices_of_the_index_with_their_store_records(split_demo):
    _, _, whole_rows = load_index_dir(split_demo["index"])
    with h5py.File(next((split_demo["run"] / "gallery").glob("*.h5")), "r") as f:
        whole_store = {name: f[name][()] for name in f if name != "rows"}
        store_rows = f["rows"][()]
    held = []
    for number, shard in enumerate(split_demo["shards"], start=1):
        index, config, rows = load_index_dir(shard / "index")
        assert config.shard == {"shard": number, "shards": 2} and index.ntotal == len(rows) == 6
        held.append(rows)
        with h5py.File(next((shard / "run" / "gallery").glob("*.h5")), "r") as f:
            np.testing.assert_array_equal(f["rows"][()], rows)  # the store's records are the index's videos
            positions = np.searchsorted(store_rows, rows)
            for name, values in whole_store.items():  # bit for bit the whole store's records
                np.testing.assert_array_equal(f[name][()], values[positions], err_msg=name)
        with Retriever(split_demo["gallery"], shard / "index", shard / "run", device="cpu") as retriever:
            assert retriever.store is not None
    np.testing.assert_array_equal(np.concatenate(held), whole_rows)


def test_a_shard_refuses_the_other_shards_videos_by_name(split_demo):
    with Retriever(split_demo["gallery"], split_demo["shards"][0] / "index", split_demo["shards"][0] / "run",
                   device="cpu") as retriever:
        other = str(retriever.video_ids[load_index_dir(split_demo["shards"][1] / "index")[2][0]])
        with pytest.raises(Exception, match=f"video '{other}' is not in this shard \\(it holds shard 1 of 2"):
            retriever.rerank("a red circle", [other])


def serve_refusal(shard, monkeypatch) -> str:
    """`tvrerank serve SHARD` refused: its one line of output (exit 2, no traceback)."""
    from tvrerank.serve import server

    monkeypatch.setattr(server, "run", lambda app, sock: None)  # a shard that is not refused returns at once
    result = CliRunner().invoke(main, ["serve", str(shard), "--port", "0", "--device", "cpu"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.mark.parametrize("mix", ["index", "video_rows", "store", "reranker", "shard.json"])
def test_a_shard_folder_whose_files_disagree_is_refused_naming_it(split_demo, served_demo, tmp_path, monkeypatch,
                                                                    mix):
    one, two = split_demo["shards"]
    shard = tmp_path / one.name
    shutil.copytree(one, shard)
    if mix == "index":  # a whole, self-consistent index folder of the other shard
        shutil.rmtree(shard / "index")
        shutil.copytree(two / "index", shard / "index")
        expected = "its files are from different splits (index/ holds shard 2 of 2"
    elif mix == "video_rows":  # the other shard's row map: equal count, other videos
        shutil.copyfile(two / "index" / "video_rows.npy", shard / "index" / "video_rows.npy")
        expected = "not the file this index was built with"
    elif mix == "store":  # the other shard's gallery store, with its checksum
        for path in (two / "run" / "gallery").iterdir():
            shutil.copyfile(path, shard / "run" / "gallery" / path.name)
        expected = "the gallery store holds no record of 6 of the 6 videos"
    elif mix == "reranker":
        shutil.copyfile(served_demo / "run" / "reranker.pt", shard / "run" / "reranker.pt")
        expected = "run/reranker.pt is missing or not the re-ranker it was split with"
    else:
        data = json.loads((shard / "shard.json").read_text())
        (shard / "shard.json").write_text(json.dumps({**data, "shard": 2}))
        expected = "differ from the sha256"
    line = serve_refusal(shard, monkeypatch)
    assert str(shard) in line and expected in line, line


def test_split_refuses_bad_requests_in_one_line(split_demo, tmp_path):
    base = ["split", "--gallery", str(split_demo["gallery"]), "--reranker", str(split_demo["run"])]
    for extra, expected in ((["--index", str(split_demo["index"]), "--shards", "13"], "--shards must be 1 to 12"),
                            (["--index", str(split_demo["shards"][0] / "index"), "--shards", "2"],
                             "is shard 1 of 2 already")):
        result = CliRunner().invoke(main, [*base, *extra, "--out", str(tmp_path / "out")])
        assert result.exit_code == 2 and expected in result.output and "Traceback" not in result.output, result.output
        assert not (tmp_path / "out").exists()  # nothing left behind
