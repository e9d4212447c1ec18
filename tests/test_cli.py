"""End-to-end through the command line (click's CliRunner, in process)."""

from __future__ import annotations

import json

import re
import shlex
from pathlib import Path

import click
import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY_VIT, make_dataset

from tvrerank.cli import main

README = Path(__file__).parent.parent / "README.md"


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def extract_args(annotations, out, *extra):
    return ["extract", "--annotations", str(annotations), "--videos", str(annotations.parent), "--model",
            str(TINY_VIT), "--out", str(out), "--frames", "4", "--workers", "0", "--device", "cpu",
            "--quiet", *extra]


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    annotations = make_dataset(root / "data", num_videos=3)
    out = root / "cache.h5"
    result = invoke(*extract_args(annotations, out))
    return annotations, out, result


def _commands(group=main, path=()):
    """Every (sub)command path of the CLI, e.g. ("cache", "info")."""
    for name, command in group.commands.items():
        yield (*path, name)
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))


def test_every_command_has_help():
    top = invoke("--help").output
    paths = list(_commands())
    assert len(paths) >= 15
    for path in paths:
        result = invoke(*path, "--help")
        assert result.exit_code == 0 and "Usage:" in result.output, path
        if len(path) == 1:
            assert path[0] in top


def _readme_invocations():
    """(command path, options) of every `tvrerank ...` line in the README's bash blocks."""
    text = README.read_text()
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].split(" # ")[0]
            for marker in ("tvrerank ", "-m tvrerank.cli "):
                if marker in line:
                    words = shlex.split(line.split(marker, 1)[1])
                    path, group = [], main
                    while words and isinstance(group, click.Group) and words[0] in group.commands:
                        group = group.commands[words[0]]
                        path.append(words.pop(0))
                    yield tuple(path), [w.split("=")[0] for w in words if w.startswith("--")]
                    break


def test_every_command_and_option_the_readme_shows_exists():
    seen = list(_readme_invocations())
    assert len(seen) >= 20 and any(path == ("train",) and "--val-fraction" in options for path, options in seen)
    for path, options in seen:
        assert path, f"the README shows a tvrerank command that does not exist: {options}"
        help_text = invoke(*path, "--help").output
        for option in options:
            assert option in help_text, f"tvrerank {' '.join(path)} has no {option}"


def test_extract_summarises_and_writes_a_cache(extracted):
    _, out, result = extracted
    assert result.exit_code == 0, result.output
    assert "8 videos (3 ok, 5 failed)" in result.output and "11 captions" in result.output
    assert out.exists()


def test_cache_info_json_has_the_promised_keys(extracted):
    _, out, _ = extracted
    result = invoke("cache", "info", str(out), "--json")
    info = json.loads(result.output)
    assert {k: info[k] for k in ("videos_ok", "videos_failed", "captions", "frames", "tokens_per_frame",
                                 "token_dim", "embed_dim")} == {
        "videos_ok": 3, "videos_failed": 5, "captions": 11, "frames": 4, "tokens_per_frame": 16,
        "token_dim": 32, "embed_dim": 32}
    text = invoke("cache", "info", str(out)).output
    assert "tiny-vit" in text and "videos/tokens" in text and "(8, 4, 16, 32)" in text


def test_cache_check_passes_then_fails_on_damage(extracted, tmp_path):
    _, out, _ = extracted
    assert invoke("cache", "check", str(out)).exit_code == 0
    damaged = tmp_path / "damaged.h5"
    damaged.write_bytes(out.read_bytes())
    with h5py.File(damaged, "r+") as f:
        f["videos/frame_emb"][0, 0, 0] = np.nan
    result = invoke("cache", "check", str(damaged))
    assert result.exit_code == 1 and "NaN" in result.output


def test_shards_and_merge_through_the_cli(extracted, tmp_path):
    annotations, out, _ = extracted
    target = tmp_path / "c.h5"
    for shard in ("0/2", "1/2"):
        assert invoke(*extract_args(annotations, target, "--shard", shard)).exit_code == 0
    result = invoke("cache", "merge", str(tmp_path / "c.shard-0-of-2.h5"), str(tmp_path / "c.shard-1-of-2.h5"),
                    "--out", str(target))
    assert result.exit_code == 0, result.output
    with h5py.File(target, "r") as merged, h5py.File(out, "r") as single:
        assert merged["videos/status"][()].tolist() == single["videos/status"][()].tolist()
        assert merged["videos/tokens"].shape == single["videos/tokens"].shape


def test_caches_of_separate_runs_join_through_the_cli(extracted, tmp_path):
    annotations, out, _ = extracted
    lines = annotations.read_text().splitlines(keepends=True)
    parts = []
    for name, chunk in (("a", lines[:2]), ("b", lines[2:])):  # video v0 | the rest
        (tmp_path / f"{name}.jsonl").write_text("".join(chunk))
        parts.append(tmp_path / f"{name}.h5")
        args = extract_args(tmp_path / f"{name}.jsonl", parts[-1])
        args[args.index("--videos") + 1] = str(annotations.parent)
        assert invoke(*args).exit_code == 0
    result = invoke("cache", "merge", "--join", *map(str, parts), "--out", str(tmp_path / "j.h5"))
    assert result.exit_code == 0 and "joined 2 caches" in result.output, result.output
    with h5py.File(tmp_path / "j.h5", "r") as joined, h5py.File(out, "r") as single:
        assert joined["videos/id"].asstr()[()].tolist() == single["videos/id"].asstr()[()].tolist()
        np.testing.assert_array_equal(joined["videos/tokens"][()], single["videos/tokens"][()])
    result = invoke("cache", "merge", "--join", str(parts[0]), str(out), "--out", str(tmp_path / "k.h5"))
    assert result.exit_code != 0 and "is in both" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "k.h5").exists()


def test_every_video_failing_exits_non_zero(tmp_path):
    annotations = tmp_path / "a.jsonl"
    annotations.write_text('{"video": "gone.mp4", "caption": "nothing here"}\n')
    result = invoke(*extract_args(annotations, tmp_path / "c.h5"))
    assert result.exit_code == 1 and "every video failed" in result.output


def test_unreadable_annotations_name_the_file_and_line(tmp_path):
    annotations = tmp_path / "a.jsonl"
    annotations.write_text('{"video": "a.mp4", "caption": "fine"}\n{"video": "b.mp4"\n')
    result = invoke(*extract_args(annotations, tmp_path / "c.h5"))
    assert result.exit_code == 2
    assert "a.jsonl" in result.output and "line 2" in result.output


def test_bad_shard_value_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(main, extract_args(tmp_path / "a.jsonl", tmp_path / "c.h5", "--shard", "3/2"))
    assert result.exit_code == 2 and "0 <= I < N" in result.output


def test_plan_gives_sizes_without_weights():
    result = invoke("plan", "--model", "ViT-B-32", "--videos", "1000", "--json")
    plan = json.loads(result.output)
    assert (plan["tokens_per_frame"], plan["token_dim"], plan["embed_dim"]) == (49, 512, 512)
    assert plan["bytes_tokens"] == 1000 * 12 * 49 * 512 * 2
    assert len(plan["options"]) == 6
    text = invoke("plan", "--model", "ViT-B-32", "--videos", "1000", "--token-pool", "2x2").output
    assert "16 tokens/frame (grid 4x4)" in text and "total" in text
    assert text == invoke("plan", "--model", "ViT-B-32", "--videos", "1000", "--pool", "2").output


def test_plan_prints_every_option_and_the_memory_fit():
    result = invoke("plan", "--model", "ViT-bigG-14", "--videos", "10000", "--captions", "200000",
                    "--token-dtype", "int8", "--pool", "2")
    lines = result.output.splitlines()
    assert "pretrained" not in result.output  # no model built with random weights
    assert lines[-1] == "total      17.6 GiB for 10000 videos"
    table = {line.split()[0]: line.split()[1:] for line in lines if line.startswith("  ")}
    assert table["float16"] == ["89.3", "GiB", "34.4", "GiB"] and table["int8"] == ["45.1", "GiB", "17.6", "GiB"]
    assert any(line.startswith("in memory  training holds") and "fit" in line for line in lines)
    msrvtt = invoke("plan", "--model", "ViT-bigG-14", "--videos", "10000", "--captions", "200000", "--token-dtype",
                    "int8", "--caption-tokens", "11.6").output  # MSR-VTT 1k-A's mean caption length
    assert msrvtt.splitlines()[-1] == "total      40.2 GiB for 10000 videos" and "11.6 real tokens" in msrvtt


def test_plan_for_vit_bigg_raw_matches_the_design_figures():
    plan = json.loads(invoke("plan", "--model", "ViT-bigG-14", "--videos", "10000", "--token-space", "raw",
                             "--json").output)
    assert (plan["tokens_per_frame"], plan["token_dim"]) == (256, 1664)
    per_frame = plan["bytes_tokens"] / (10000 * 12)  # the cache's float16 tokens, from the schema's specs
    assert per_frame == 851_968  # 0.81 MiB per frame; docs/design.md: ~100 GB for 10k videos
    assert 95e9 < plan["bytes_total"] < 110e9


def test_index_candidates_and_eval_through_the_cli(extracted, tmp_path):
    _, out, _ = extracted
    result = invoke("index", str(out), "--out", str(tmp_path / "index"), "--factory", "auto")
    assert result.exit_code == 0 and "Flat over 3 videos" in result.output
    result = invoke("candidates", str(out), "--index", str(tmp_path / "index"), "--out", str(tmp_path / "c.h5"),
                    "--k", "15")
    assert result.exit_code == 0, result.output
    assert "top-3 for 11 captions" in result.output  # K clamped to the 3 ok videos
    metrics = json.loads(invoke("eval", "--cache", str(out), "--candidates", str(tmp_path / "c.h5"),
                                "--json").output)
    assert metrics["evaluated"] == 6 and metrics["recall_at_k"] == 100.0
    assert set(metrics["stage1"]) == {"R1", "R5", "R10", "MdR", "MnR"} and metrics["stage1"]["R5"] == 100.0
    table = invoke("eval", "--cache", str(out), "--candidates", str(tmp_path / "c.h5"), "--dsl").output
    assert "R@1" in table and "video->text" in table and "dual softmax" in table


def test_candidates_refuses_a_bad_external_matrix(extracted, tmp_path):
    _, out, _ = extracted
    np.save(tmp_path / "s.npy", np.zeros((2, 2), np.float32))
    result = invoke("candidates", str(out), "--similarity", str(tmp_path / "s.npy"), "--out", str(tmp_path / "c.h5"))
    assert result.exit_code == 2 and "s.npy" in result.output and "one row per caption" in result.output


def test_train_then_eval_with_the_reranker(tmp_path):
    from conftest import synthetic_cache

    cache = synthetic_cache(tmp_path / "c.h5", videos=20)
    assert invoke("index", str(cache), "--out", str(tmp_path / "i")).exit_code == 0
    assert invoke("candidates", str(cache), "--index", str(tmp_path / "i"), "--out", str(tmp_path / "k.h5"),
                  "--k", "8").exit_code == 0
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"captions": 8, "negatives": 3, "in_batch": 1, "eval_every": 3,
                                  "model": {"width": 16, "heads": 2, "layers": 1, "queries": 2,
                                            "video_keep": 4, "perturb_samples": 4}}))
    common = ["--cache", str(cache), "--candidates", str(tmp_path / "k.h5")]
    result = invoke("train", *common, "--val-fraction", "0.25", "--out", str(tmp_path / "run"), "--config",
                    str(config), "--steps", "6", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "6 steps" in result.output and "validation R@1" in result.output
    metrics = json.loads(invoke("eval", *common, "--reranker", str(tmp_path / "run"), "--json",
                                "--device", "cpu").output.splitlines()[-1])
    for variant in ("reranked", "reranker_only", "plain_sum"):
        assert set(metrics[variant]) == set(metrics["stage1"])
    assert 0 <= metrics["alpha"] <= 1
    # evaluated on the cache it was trained and validated on: said, in the JSON and on screen
    assert metrics["tuned_on_this_split"] is True and metrics["trained_on_this_split"] is True
    table = invoke("eval", *common, "--reranker", str(tmp_path / "run"), "--device", "cpu").output
    assert "fused (alpha" in table and "re-ranker alone" in table and "plain sum" in table
    assert "tuned on this split" in table
    run_config = json.loads((tmp_path / "run" / "config.json").read_text())
    held_out = run_config["splits"]["validation"]["videos"]
    assert len(held_out) == 5 and run_config["train"]["val_fraction"] == 0.25  # a quarter of 20 videos
    bad = tmp_path / "bad.json"
    bad.write_text('{"stepz": 3}')
    result = invoke("train", *common, "--out", str(tmp_path / "run2"), "--config", str(bad))
    assert result.exit_code == 2 and "stepz" in result.output
