"""The re-ranker part by part on a known-answer toy world: one row per variant, 3 training seeds.

    python benchmarks/bench_ablation.py                       # the table in docs/ablation.md (2 cores: < 60 min)
    python benchmarks/bench_ablation.py --world detail        # the detail world's (toy/make.py), with selector recalls
    python benchmarks/bench_ablation.py --extra               # and the selector-perturbation rows (+17 min)
    python benchmarks/bench_ablation.py --only full "K = 5"   # some rows
    python benchmarks/bench_ablation.py --smoke               # seconds: a tiny world, 2 rows, 1 seed

One toy world (``--videos``, default 1,200: 300 test captions, so one caption is 0.33 points of
R@1) is made and extracted once into ``--out`` and reused by later runs, with every finished run
(so adding a row trains only that row). Every row trains the
demo's re-ranker (``tvrerank.toy.demo.DEMO_TRAINING``: same steps, batch and width) with the
row's model and training options on top, validates on the val split (which picks the checkpoint
and, with the tuned fusion, alpha) and reports the test split by the one ranking rule. Rows whose
only change is the fusion re-score the "full" row's runs (no new training).

Before the table, the selector's gradient noise: the perturbed top-k's gradient of the trained
full model's frame-selector scorer on one training batch, drawn 8 times per sample count S; ``agreement`` is the
mean cosine between two draws (1.0: the same gradient every time; near 0: noise).

Prints a markdown table (variant, options, stage-1 R@1, re-ranked R@1 mean ± sd over seeds,
gain, training seconds per run; on a world that knows where its detail is, the frame and video
selectors' recall of it beside their chance rates, ``selector_recall.py``) and writes it with every
run's numbers to OUT/ablation.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from tvrerank.evaluation import compare_stages, load_lists
from tvrerank.rerank.checkpoint import load_reranker
from tvrerank.selector_recall import selector_recalls
from tvrerank.toy.demo import DEMO_MODELS, DEMO_TRAINING, SPLITS, DemoConfig, candidates_path, prepare_world
from tvrerank.train.data import BatchSpec, TrainingBatches
from tvrerank.train.loop import TrainConfig, train

# name: (model options, training options, K); "fusion" only: re-scores the full row's runs
ROWS: dict[str, tuple[dict, dict, int]] = {
    "full": ({}, {}, 15),
    "without frame level": ({"frame_level": False}, {}, 15),
    "without video level": ({"video_level": False}, {}, 15),
    "sum instead of hierarchy": ({"combine": "sum"}, {}, 15),
    "no weight sharing": ({"share_weights": False}, {}, 15),
    "all tokens instead of top-M": ({"frame_tokens": "all"}, {}, 15),
    "global token only": ({"frame_tokens": "global"}, {}, 15),
    "random selection (M patches drawn at random)": ({"frame_tokens": "random"}, {}, 15),
    "warm start: all patches for the first half": ({}, {"selector_warmup": 0.5}, 15),
    "warm start + selector distilled from the attention": ({}, {"selector_warmup": 0.5, "selector_distill": 1.0}, 15),
    "selector distilled from the attention (no warm start)": ({}, {"selector_distill": 1.0}, 15),
    "selector sigma relative to the score spread": ({"perturb_sigma_relative": True, "perturb_sigma": 1.0}, {}, 15),
    "selector learning rate x10": ({}, {"selector_lr_scale": 10.0}, 15),
    "novelty prior on the frame scorer": ({"novelty_prior": True}, {}, 15),
    "novelty prior + warm start + distilled selector": ({"novelty_prior": True},
                                                        {"selector_warmup": 0.5, "selector_distill": 1.0}, 15),
    "without video selector": ({"video_selector": False}, {}, 15),
    "with word-to-patch term": ({"token_match": True}, {}, 15),
    "straight-through selection": ({"selection": "straight_through"}, {}, 15),
    "selector sigma 0.5": ({"perturb_sigma": 0.5}, {}, 15),
    "selector sigma 0.5, straight-through": ({"perturb_sigma": 0.5, "selection": "straight_through"}, {}, 15),
    "selector sigma 0.5, 512 samples": ({"perturb_sigma": 0.5, "perturb_samples": 512}, {}, 15),
    "earlier design (joint attention + word-to-patch)": ({"combine": "joint", "token_match": True}, {}, 15),
    "loss: binary": ({}, {"loss": "binary"}, 15),
    "loss: both": ({}, {"loss": "both"}, 15),
    "negatives: similarity (+1 negative caption)": ({}, {"negative_sampling": "similarity", "negative_captions": 1}, 15),
    "paper recipe: binary, similarity negatives, plain sum": (
        {}, {"loss": "binary", "negative_sampling": "similarity", "negative_captions": 1, "fusion": "sum"}, 15),
    "fusion: plain sum": ({}, {"fusion": "sum"}, 15),
    "K = 5": ({}, {}, 5),
    "K = 30": ({}, {}, 30),
}
#: rows run only with --extra (the selector's perturbation; they keep the default run under an hour)
EXTRA_ROWS = ("selector sigma 0.5", "selector sigma 0.5, straight-through", "selector sigma 0.5, 512 samples")
SMOKE_ROWS = ("full", "fusion: plain sum")


def rescoring_only(row: str) -> bool:
    model, training, k = ROWS[row]
    return not model and set(training) == {"fusion"} and k == ROWS["full"][2]


def training_config(row: str, seed: int, steps: int | None) -> TrainConfig:
    model, training, _ = ROWS[row]
    options = dict(DEMO_TRAINING, **training, model=dict(DEMO_TRAINING["model"], **model), seed=seed, device="cpu")
    if steps is not None:
        options.update(optim=dict(DEMO_TRAINING["optim"], steps=steps, warmup=min(DEMO_TRAINING["optim"]["warmup"],
                                                                                   steps // 4)),
                       eval_every=max(1, steps // 3), checkpoint_every=steps)
    return TrainConfig(**options)


def run_row(row: str, seed: int, world: Path, caches: dict, by_k: dict, steps: int | None) -> dict:
    """Train (or, for a fusion-only row, re-score the full row's run) and evaluate on the test split."""
    _, training, k = ROWS[row]
    candidates = by_k[k]
    run = world / "runs" / f"{'full' if rescoring_only(row) else row.replace(' ', '_').replace(':', '')}-{seed}"
    seconds = 0.0
    if not (run / "reranker.pt").exists():
        shutil.rmtree(run, ignore_errors=True)
        start = time.perf_counter()
        train(caches["train"], candidates["train"], run, training_config(row, seed, steps), val_cache=caches["val"],
              val_candidates=candidates["val"], progress=False)
        seconds = time.perf_counter() - start
        (run / "seconds.txt").write_text(f"{seconds:.1f}\n")
    else:
        seconds = float((run / "seconds.txt").read_text())
    trained = load_reranker(run)
    lists, true_video = load_lists(caches["test"], candidates["test"])
    fusion = training.get("fusion", trained.fusion)
    result = compare_stages(trained.model, caches["test"], lists, true_video, device=torch.device("cpu"),
                            alpha=trained.fusion_alpha if fusion == trained.fusion else None, fusion=fusion)
    gap = json.loads((run / "metrics.json").read_text()).get("selection_gap") or {}
    recalls = selector_recalls(trained.model, caches["test"], device=torch.device("cpu"))
    return {"row": row, "seed": seed, "stage1_R1": result["stage1"]["R1"], "reranked_R1": result["reranked"]["R1"],
            "recall_at_k": result["recall_at_k"], "train_seconds": seconds, "captions": result["evaluated"],
            "soft_minus_hard": -gap.get("hard_minus_soft", float("nan")), **recall_columns(recalls)}


def recall_columns(recalls: dict | None) -> dict:
    """The known-answer figures of one run (``selector_recall.selector_recalls``) as flat columns: recall
    and its chance per selector (None where the selector keeps nothing to check or the world has no truth)."""
    columns = dict.fromkeys(("frame_recall", "frame_chance", "video_recall", "video_chance"))
    if recalls is None:
        return columns
    for name, key in (("frame", "frame_selector"), ("video", "video_selector")):
        if recalls.get(key):
            columns[f"{name}_recall"], columns[f"{name}_chance"] = recalls[key]["recall"], recalls[key]["chance"]
    return columns


def selector_gradient_noise(caches: dict, candidates: dict, run: Path, samples=(8, 16, 32, 128, 512),
                            sigmas=(0.05, 0.5), draws: int = 8) -> dict:
    """Mean pairwise cosine between ``draws`` perturbed-top-k gradients of the frame scorer of the
    trained model in ``run``, per perturbation sigma and sample count S: {"sigma=..., S=...": cosine}."""
    from tvrerank.cache.reader import CacheReader
    from tvrerank.index.candidates import read_candidates
    from tvrerank.rerank.variants import build_reranker
    from tvrerank.train.loop import pair_loss

    with CacheReader(caches["train"]) as cache:
        lists = read_candidates(candidates["train"], cache)
    trained = load_reranker(run).model
    spec = BatchSpec(captions=DEMO_TRAINING["captions"], negatives=DEMO_TRAINING["negatives"],
                     in_batch=DEMO_TRAINING["in_batch"])
    batch = TrainingBatches(caches["train"], lists.video, spec=spec, steps=1)[0]
    b, g = batch["pair_video"].shape
    result = {}
    for sigma, s in itertools.product(sigmas, samples):
        torch.manual_seed(0)
        model = build_reranker(dataclasses.replace(trained.config, perturb_samples=s, perturb_sigma=sigma,
                                                    dropout=0.0))
        model.load_state_dict(trained.state_dict())
        model.train()
        scorer = model.frame_selector.score[0].weight
        grads = []
        for _ in range(draws):
            model.zero_grad()
            scores = model(batch["text_tokens"], batch["text_length"], batch["tokens"], batch["frame_emb"],
                           batch["frame_mask"], batch["pair_video"].reshape(-1),
                           torch.arange(b).repeat_interleave(g))
            pair_loss(scores.view(b, g), "listwise").backward()
            grads.append(scorer.grad.flatten().clone())
        cosines = [float(torch.nn.functional.cosine_similarity(x, y, dim=0)) for x, y in itertools.combinations(grads, 2)]
        result[f"sigma={sigma:g}, S={s}"] = statistics.mean(cosines)
    return result


def world(out: Path, config: DemoConfig, ks: list[int]) -> tuple[dict, dict]:
    """The toy world's caches and candidate lists: made once, then reused (``OUT/world.json`` marks a
    finished one; toy worlds are not bit-reproducible, so runs are only comparable on one world)."""
    marker = out / "world.json"
    made = json.loads(marker.read_text()) if marker.is_file() else None
    if made is not None and made.get("world", "events") == config.world and made["videos"] == config.videos \
            and set(ks) <= set(made["ks"]):
        caches = {split: out / "cache" / f"{split}.h5" for split in SPLITS}
        return caches, {k: {split: candidates_path(out, split, k, config.k) for split in SPLITS} for k in made["ks"]}
    if made is not None:
        raise SystemExit(f"{out} holds another toy world ({made}); use another --out")
    _, caches, by_k = prepare_world(out, config, ks=tuple(ks), progress=False)
    marker.write_text(json.dumps({"world": config.world, "videos": config.videos, "ks": sorted(by_k)}) + "\n")
    return caches, by_k


def table(results: list[dict], rows: list[str]) -> str:
    known = any(r["frame_recall"] is not None or r["video_recall"] is not None for r in results)
    lines = ["| variant | options | stage-1 R@1 | re-ranked R@1 (mean ± sd) | gain | train s/run |"
             + (" frame-selector recall (chance) | video-selector recall (chance) |" if known else ""),
             "|---|---|---|---|---|---|" + ("---|---|" if known else "")]
    for row in rows:
        mine = [r for r in results if r["row"] == row]
        r1 = [r["reranked_R1"] for r in mine]
        sd = statistics.stdev(r1) if len(r1) > 1 else 0.0
        model, training, k = ROWS[row]
        options = ", ".join(f"{name}={json.dumps(value)}" for name, value in {**model, **training}.items())
        options += (", " if options else "") + f"K={k}" if k != ROWS["full"][2] else ""
        lines.append(f"| {row} | {options or 'defaults'} | {mine[0]['stage1_R1']:.1f} | {statistics.mean(r1):.1f} ± "
                     f"{sd:.1f} | {statistics.mean(r1) - mine[0]['stage1_R1']:+.1f} | "
                     f"{statistics.mean(r['train_seconds'] for r in mine):.0f} |"
                     + (f" {recall_cell(mine, 'frame')} | {recall_cell(mine, 'video')} |" if known else ""))
    return "\n".join(lines)


def recall_cell(runs: list[dict], selector: str) -> str:
    """Mean recall over seeds (in %) and the chance rate, or "-" where the selector keeps nothing to check."""
    recalls = [r[f"{selector}_recall"] for r in runs if r[f"{selector}_recall"] is not None]
    if not recalls:
        return "-"
    chance = statistics.mean(r[f"{selector}_chance"] for r in runs if r[f"{selector}_recall"] is not None)
    return f"{100 * statistics.mean(recalls):.1f} ({100 * chance:.1f})"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", choices=list(DEMO_MODELS), default="events",
                        help="Toy world (toy/make.py): events, or detail (the selectors' known answers).")
    parser.add_argument("--out", default=None, help="The toy world and every run, reused when present "
                        "(default: ablation-out for events, ablation-WORLD-out otherwise).")
    parser.add_argument("--videos", type=int, default=1200, help="Toy-world size (a quarter is the test split).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Training seeds per row.")
    parser.add_argument("--steps", type=int, default=None, help="Training steps per run (default: the demo's).")
    parser.add_argument("--only", nargs="+", choices=list(ROWS), help="These rows only ('full' is always run).")
    parser.add_argument("--extra", action="store_true", help=f"Also the rows {', '.join(EXTRA_ROWS)}.")
    parser.add_argument("--smoke", action="store_true", help="A tiny world, two rows, one seed, a few steps.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.smoke:
        args.videos, args.seeds, args.steps, args.only = 96, [0], 6, list(SMOKE_ROWS)
    chosen = args.only or [row for row in ROWS if args.extra or row not in EXTRA_ROWS]
    rows = ["full", *[row for row in chosen if row != "full"]]
    out = Path(args.out or ("ablation-out" if args.world == "events" else f"ablation-{args.world}-out"))
    config = DemoConfig(out=str(out), videos=args.videos, seed=0, world=args.world)
    started = time.perf_counter()
    ks = sorted({ROWS[row][2] for row in rows})
    caches, by_k = world(out, config, ks)
    print(f"toy world: {args.videos} videos in {out} ({time.perf_counter() - started:.0f} s)", flush=True)
    results = []
    for row in rows:
        for seed in args.seeds:
            result = run_row(row, seed, out, caches, by_k, args.steps)
            results.append(result)
            recalls = "".join(f", {name}-selector recall {100 * result[f'{name}_recall']:.1f}% "
                              f"(chance {100 * result[f'{name}_chance']:.1f}%)"
                              for name in ("frame", "video") if result[f"{name}_recall"] is not None)
            print(f"  {row} seed {seed}: R@1 {result['stage1_R1']:.1f} -> {result['reranked_R1']:.1f} "
                  f"({result['train_seconds']:.0f} s{recalls})", flush=True)
    noise = selector_gradient_noise(caches, by_k[config.k], out / "runs" / f"full-{args.seeds[0]}",
                                    samples=(4, 16) if args.smoke else (8, 16, 32, 128, 512))
    print("selector gradient agreement on the trained full model (mean cosine of 8 draws): "
          + "; ".join(f"{key}: {c:.2f}" for key, c in noise.items()))
    text = table(results, rows)
    print(text)
    (out / "ablation.json").write_text(json.dumps({"rows": results, "selector_gradient_agreement": noise,
                                                   "table": text, "seconds": time.perf_counter() - started},
                                                  indent=1) + "\n")
    print(f"ablation_seconds={time.perf_counter() - started:.0f}")


if __name__ == "__main__":
    sys.exit(main())
