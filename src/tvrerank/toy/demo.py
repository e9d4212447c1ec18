"""``tvrerank demo``: the whole pipeline on the embedded toy world, in minutes on a laptop CPU.

toy make → extract (the shipped toy encoder) → index → candidates → train the re-ranker (the
validation split tunes the fusion weight) → evaluate stage 1 vs re-ranked on the test split.
``--world detail`` runs it on the detail world (``toy/make.py``) with the toy encoder pretrained for
it (``DEMO_ENCODERS``); each cache then carries the world's ground truth (``toy truth``) and
metrics.json the selectors' known-answer recalls ("selectors", ``selector_recall.py``).
Output layout (scripts rely on it)::

    DIR/data/                 the toy world (train/val/test.jsonl, videos/)
    DIR/cache/{train,val,test}.h5
    DIR/index/{train,val,test}/          FAISS indexes of each split's videos
    DIR/candidates/{train,val,test}.h5
    DIR/run/                  the trained re-ranker (reranker.pt, config.json, metrics.json, log.csv)
    DIR/firststage/run/       a first stage trained on the train split (tvrerank firststage train)
    DIR/firststage/emb/SPLIT/ its embeddings; DIR/firststage/candidates/SPLIT.h5 its candidate lists
    DIR/firststage/reranker/  a re-ranker trained on those candidates
    DIR/metrics.json          on the test split: {"stage1", "reranker_only", "plain_sum", "reranked" (the run's
                              fusion): {R1, R5, R10, MdR, MnR}, "fusion", "alpha", "recall_curve", ...,
                              "first_stages": {"zero-shot" | "trained": {"stage1", "reranked", "recall_at_k"}},
                              "world", and on the detail world "selectors" (the zero-shot run's; each first
                              stage's under "first_stages")}
    DIR/recall_at_k.png       R@k of both stages
    DIR/report.md
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tvrerank.config import ExtractConfig, to_dict
from tvrerank.errors import InputError
from tvrerank.toy.make import ToyWorldConfig, make_toy_world

log = logging.getLogger(__name__)

TOY_MODEL = "tvr-toy"
SPLITS = ("train", "val", "test")
#: The re-ranker the demo trains: small enough for two CPU cores in a couple of minutes. The
#: ablation (docs/ablation.md) trains this budget with one change per row; the demo itself uses the
#: row that is best on the toy world, each frame's global token only (DEMO_MODEL).
DEMO_TRAINING = {
    "optim": {"steps": 240, "lr": 1e-3, "warmup": 20},
    "captions": 16, "negatives": 7, "in_batch": 4, "eval_every": 60, "checkpoint_every": 120,
    "model": {"width": 96, "heads": 4, "layers": 1, "queries": 8, "frame_keep": 4, "video_keep": 16,
              "dropout": 0.1, "perturb_samples": 16},
}
DEMO_MODEL = {"frame_tokens": "global"}
#: The demo's model options per toy world (docs/ablation.md). On the detail world no row's R@1 is
#: apart from another's beyond the seeds' spread (each ends near what stage 1's top K allows without the
#: glyph); the demo keeps the method's top-M patches with the temporal-novelty prior, the one row whose
#: frame selector keeps the glyph (68% of the frames that show it, 8x chance), so its known-answer
#: checks and explain view show a selector that finds the detail.
DEMO_MODELS = {"events": DEMO_MODEL, "detail": {"novelty_prior": True}}
#: The shipped toy-encoder weights (``--pretrained`` tag of tvr-toy) each world extracts with: the detail
#: world's encoder was pretrained with the glyph in frames but never in captions (toy/pretrain.py).
DEMO_ENCODERS = {"events": "toy", "detail": "toy-detail"}
#: The trained first stage (tvrerank firststage train) the demo also re-ranks: ~13 s on two cores.
DEMO_FIRST_STAGE = {"optim": {"steps": 600}, "batch": 128, "eval_every": 100, "checkpoint_every": 600}


@dataclass(frozen=True)
class DemoConfig:
    out: str = "demo-out"
    seed: int = 0
    videos: int = 360
    frames: int = 12
    text_tokens: int = 48  # toy captions run up to ~40 tokens
    workers: int = 2
    k: int = 15
    steps: int = DEMO_TRAINING["optim"]["steps"]
    token_dtype: str = "float16"  # extract --token-dtype of the demo's caches
    token_pool: str = "none"  # extract --pool (none | 2x2)
    world: str = "events"  # toy world: events | detail (toy/make.py)

    def __post_init__(self):
        if self.world not in DEMO_MODELS:
            raise InputError(f"demo world must be one of {', '.join(DEMO_MODELS)}, got {self.world!r}")


def toy_pretrained(world: str = "events") -> str | None:
    """The shipped toy-encoder tag of ``world`` when its weights are in the package, else None (random weights)."""
    from tvrerank.extract.models import SHIPPED_WEIGHTS

    tag = DEMO_ENCODERS[world]
    weights = SHIPPED_WEIGHTS[(TOY_MODEL, tag)]
    if weights.is_file():
        return tag
    log.warning("the shipped toy-encoder weights are missing (%s): the demo uses random weights", weights)
    return None


class _Stopwatch:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    def time(self, name: str, fn, *args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        log.info("demo: %s done in %.1fs", name, time.perf_counter() - start)
        return result


def candidates_path(out: Path, split: str, k: int, default_k: int) -> Path:
    """OUT/candidates/SPLIT.h5 for the demo's K, OUT/candidates/kK/SPLIT.h5 for another K."""
    return out / "candidates" / (f"{split}.h5" if k == default_k else f"k{k}/{split}.h5")


def demo_extraction(config: DemoConfig, data: Path) -> ExtractConfig:
    """The extraction every demo cache is made with (the shipped toy encoder, the config's frames and token
    layout, videos under ``data``); ``annotations`` and ``out`` are left for each cache."""
    return ExtractConfig(annotations=(), format="jsonl", videos=str(data), out="", model=TOY_MODEL,
                         pretrained=toy_pretrained(config.world), frames=config.frames, text_tokens=config.text_tokens,
                         token_dtype=config.token_dtype, token_pool=config.token_pool, workers=config.workers,
                         device="cpu", overwrite=True)


def prepare_world(out: Path, config: DemoConfig, *, ks: tuple[int, ...] = (), clock: _Stopwatch | None = None,
                  progress: bool = True) -> tuple[Path, dict[str, Path], dict[int, dict[str, Path]]]:
    """Make the toy world in OUT/data, extract each split's cache, index it and write its candidate
    lists for ``config.k`` and each of ``ks`` → (data folder, {split: cache}, {K: {split: candidates}})."""
    from tvrerank.extract.runner import run_extraction
    from tvrerank.index.candidates import build_candidates, write_candidates
    from tvrerank.index.store import build_index_dir
    from tvrerank.toy.truth import attach_world_truth

    clock = clock or _Stopwatch()
    data = clock.time("make", make_toy_world, out / "data",
                      ToyWorldConfig(videos=config.videos, seed=config.seed, world=config.world), progress=progress)
    base = demo_extraction(config, data)
    caches = {split: out / "cache" / f"{split}.h5" for split in SPLITS}
    every_k = sorted({config.k, *ks})
    by_k = {k: {split: candidates_path(out, split, k, config.k) for split in SPLITS} for k in every_k}
    for split in SPLITS:
        caches[split].parent.mkdir(parents=True, exist_ok=True)
        clock.time("extract", run_extraction, replace(base, annotations=(str(data / f"{split}.jsonl"),),
                                                      out=str(caches[split])), progress=progress)
        clock.time("extract", attach_world_truth, caches[split], data)
        clock.time("index", build_index_dir, caches[split], out / "index" / split)
        for k in every_k:
            lists = clock.time("index", build_candidates, caches[split], k=k, index_dir=out / "index" / split)
            by_k[k][split].parent.mkdir(parents=True, exist_ok=True)
            write_candidates(by_k[k][split], lists, caches[split])
    return data, caches, by_k


def demo_training(config: DemoConfig):
    """The re-ranker training the demo runs (``DEMO_TRAINING`` with ``DEMO_MODEL``, the config's steps and seed)."""
    from tvrerank.train.loop import TrainConfig

    return TrainConfig(**dict(DEMO_TRAINING, optim=dict(DEMO_TRAINING["optim"], steps=config.steps),
                              seed=config.seed, device="cpu",
                              model=dict(DEMO_TRAINING["model"], **DEMO_MODELS[config.world])))


def run_demo(config: DemoConfig, *, progress: bool = True) -> dict:
    """Run every stage; returns the summary (also DIR/metrics.json, DIR/report.md, the plot)."""
    from tvrerank.evaluation import VARIANTS, evaluate_run
    from tvrerank.train.loop import train

    out, clock = Path(config.out), _Stopwatch()
    data, caches, by_k = prepare_world(out, config, clock=clock, progress=progress)
    candidates = by_k[config.k]

    training = demo_training(config)
    # the exact recipe, so that `tvrerank train --config OUT/training.json` reruns it with one change
    (out / "training.json").write_text(json.dumps(to_dict(training), indent=2) + "\n")
    run = out / "run"
    _clear_run(run)
    clock.time("train", train, caches["train"], candidates["train"], run, training, val_cache=caches["val"],
               val_candidates=candidates["val"], progress=progress)
    result = clock.time("evaluate", evaluate_run, run, caches["test"], candidates["test"], device="cpu")

    metrics = {key: result[key] for key in ("stage1", *VARIANTS, "alpha", "fusion", "k", "recall_at_k", "evaluated",
                                            "recall_curve", "tuned_on_this_split")}
    # the same re-ranker recipe on top of a trained first stage (its own candidates, its own training)
    trained_lists = trained_first_stage(out, caches, config, clock=clock, progress=progress)
    reranker = out / "firststage" / "reranker"
    _clear_run(reranker)
    clock.time("train", train, caches["train"], trained_lists["train"], reranker, training, val_cache=caches["val"],
               val_candidates=trained_lists["val"], progress=progress)
    on_trained = clock.time("evaluate", evaluate_run, reranker, caches["test"], trained_lists["test"], device="cpu")
    metrics["first_stages"] = {name: {"stage1": r["stage1"], "reranked": r["reranked"], "recall_at_k": r["recall_at_k"],
                                      "recall_curve": {k: r["recall_curve"][k] for k in ("stage1", "reranked")},
                                      **({"selectors": r["selectors"]} if "selectors" in r else {})}
                               for name, r in (("zero-shot", result), ("trained", on_trained))}
    metrics["world"] = config.world
    if "selectors" in result:
        metrics["selectors"] = result["selectors"]
    metrics["cache"] = {"token_dtype": config.token_dtype, "token_pool": config.token_pool}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    plot_recall(metrics["recall_curve"], out / "recall_at_k.png", trained=metrics["first_stages"]["trained"])
    examples = clock.time("retrieve", example_queries, data, caches["test"], out / "index" / "test", run)
    summary = {"config": asdict(config), "seconds": clock.seconds, "metrics": metrics, "examples": examples,
               "total_seconds": sum(clock.seconds.values())}
    (out / "report.md").write_text(report(summary))
    return summary


def _clear_run(run: Path) -> None:
    """A demo run again over an old output folder trains from scratch."""
    from tvrerank.files import checksum_path

    for name in ("reranker.pt", "firststage.pt", "checkpoint.pt", "log.csv"):
        (run / name).unlink(missing_ok=True)
        checksum_path(run / name).unlink(missing_ok=True)


def trained_first_stage(out: Path, caches: dict[str, Path], config: DemoConfig, *, clock: _Stopwatch,
                        progress: bool = True) -> dict[str, Path]:
    """Train a first stage on the train split (the val split picks the kept step), embed every split
    with it and write each split's candidate lists → {split: candidates file}."""
    from tvrerank.firststage.store import embed_cache
    from tvrerank.firststage.train import FirstStageTrainConfig, train_first_stage
    from tvrerank.index.candidates import build_candidates, write_candidates

    run = out / "firststage" / "run"
    _clear_run(run)
    clock.time("first stage", train_first_stage, caches["train"], run,
               FirstStageTrainConfig(**DEMO_FIRST_STAGE, seed=config.seed, device="cpu"), val_cache=caches["val"],
               progress=progress)
    lists = {}
    for split in SPLITS:
        embeddings = out / "firststage" / "emb" / split
        clock.time("first stage", embed_cache, run, caches[split], embeddings)
        found = clock.time("first stage", build_candidates, caches[split], k=config.k,
                           text_emb=embeddings / "text_emb.npy", video_emb=embeddings / "video_emb.npy")
        lists[split] = out / "firststage" / "candidates" / f"{split}.h5"
        lists[split].parent.mkdir(parents=True, exist_ok=True)
        write_candidates(lists[split], found, caches[split])
    return lists


def first_stage_table(metrics: dict) -> str:
    """Zero-shot vs trained first stage on the test split, and the re-ranker on top of each."""
    k = metrics["k"]
    lines = [f"{'first stage':<26} {'R@1':>6} {'R@5':>6} {f'R@{k}':>6}   re-ranked R@1 (gain)"]
    for name, label in (("zero-shot", "zero-shot (frozen CLIP)"), ("trained", "trained (firststage)")):
        row = metrics["first_stages"][name]
        gain = row["reranked"]["R1"] - row["stage1"]["R1"]
        lines.append(f"{label:<26} {row['stage1']['R1']:>6.1f} {row['stage1']['R5']:>6.1f} {row['recall_at_k']:>6.1f}"
                     f"   {row['reranked']['R1']:>6.1f} ({gain:+.1f})")
    return "\n".join(lines)


def example_queries(data: Path, cache: Path, index_dir: Path, run: Path, count: int = 3, top: int = 5) -> list[dict]:
    """Three test captions from different confuser groups, searched with and without re-ranking."""
    from tvrerank.retrieve.retriever import Retriever

    rows = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()]
    groups = {r["video_id"]: r["group"] for r in json.loads((data / "scripts.json").read_text())["test"]}
    picked, seen = [], set()
    for row in rows:
        if groups[row["video_id"]] not in seen:
            picked.append(row)
            seen.add(groups[row["video_id"]])
        if len(picked) == count:
            break
    with Retriever(cache, index_dir, run, device="cpu") as retriever:
        queries = [row["caption"] for row in picked]
        stage1 = retriever.search(queries, top=top, rerank=False)
        reranked = retriever.search(queries, top=top)
    return [{"query": row["caption"], "true_video": row["video_id"],
             "stage1": [hit.video_id for hit in a.results], "reranked": [hit.video_id for hit in b.results]}
            for row, a, b in zip(picked, stage1, reranked)]


def format_examples(examples: list[dict]) -> str:
    """Side-by-side top-k lists; the true video is marked with *."""
    lines = []
    for example in examples:
        lines.append(f"query: {example['query']}")
        lines.append(f"  {'':>4}  {'stage 1':<16}  re-ranked")
        for rank, (a, b) in enumerate(zip(example["stage1"], example["reranked"]), start=1):
            mark = lambda v: f"{v}{' *' if v == example['true_video'] else ''}"  # noqa: E731
            lines.append(f"  {rank:>4}  {mark(a):<16}  {mark(b)}")
    return "\n".join(lines)


def plot_recall(curves: dict[str, list[float]], path: Path, trained: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for name, label in (("stage1", "stage 1 (CLIP + FAISS)"), ("reranker_only", "re-ranker alone"),
                        ("plain_sum", "plain sum"), ("reranked", "fused (the run's fusion)")):
        ks = range(1, len(curves[name]) + 1)
        ax.plot(ks, curves[name], marker="o", markersize=3, label=label)
    if trained is not None:  # the trained first stage and the re-ranker on top of it, dashed
        for name, label in (("stage1", "trained stage 1"), ("reranked", "fused, on trained stage 1")):
            ks = range(1, len(trained["recall_curve"][name]) + 1)
            ax.plot(ks, trained["recall_curve"][name], linestyle="--", marker="s", markersize=3, label=label)
    ax.set_xlabel("k")
    ax.set_ylabel("text→video R@k (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("toy world, test split")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def metric_columns(metrics: dict) -> dict[str, dict[str, float]]:
    """The test-split table's columns: stage 1, the re-ranker alone, the plain sum, the run's fusion."""
    from tvrerank.evaluation import fusion_label

    return {"stage 1": metrics["stage1"], "re-ranker alone": metrics["reranker_only"],
            "plain sum": metrics["plain_sum"], fusion_label(metrics): metrics["reranked"]}


WORLD_TEXT = {
    "events": "The test split is made of confuser groups that differ only in event order, a direction or a "
              "small corner object.",
    "detail": "Detail world (`--world detail`): each video also shows a small glyph in a few frames; captions "
              "name it, the toy encoder was pretrained without ever hearing of it, and the test split's confuser "
              "groups differ only in it, so stage 1 cannot tell them apart.",
}


def selector_section(metrics: dict) -> list[str]:
    """The report's known-answer section (detail world), else nothing."""
    from tvrerank.selector_recall import format_recalls

    if "selectors" not in metrics:
        return []
    return ["## Do the selectors keep the detail? (test split)", "", "```", format_recalls(metrics["selectors"]),
            "```", ""]


def report(summary: dict) -> str:
    from tvrerank.evaluation import fusion_label
    from tvrerank.metrics import format_table

    metrics = summary["metrics"]
    gain = metrics["reranked"]["R1"] - metrics["stage1"]["R1"]
    return "\n".join([
        "# tvrerank demo (synthetic toy world)", "",
        "A known-answer check on generated videos (coloured shapes acting out events in order); "
        "not a real dataset. " + WORLD_TEXT[metrics.get("world", "events")], "",
        f"## Text→video on the test split ({metrics['evaluated']} captions, K = {metrics['k']})", "",
        f"Cached tokens: {summary['config']['token_dtype']}, pool {summary['config']['token_pool']} "
        "(`tvrerank demo --token-dtype`, `--pool`).", "",
        "```", format_table(metric_columns(metrics)), "```", "",
        f"R@1 gain of the fused ranking: {gain:+.1f} points. The true video is within the top {metrics['k']} for "
        f"{metrics['recall_at_k']:.1f}% of captions (the most re-ranking can reach). \"re-ranker alone\" orders "
        "the top K by the re-ranker's score only, \"plain sum\" by stage-1 score + re-ranker score (no tuned "
        f"weight); \"fused\" is the run's fusion ({fusion_label(metrics)}; a weight is tuned on the validation "
        "split, never on this test split). Ties count against the true video (docs/design.md, \"The ranking rule\").", "",
        "## A trained first stage", "",
        "`tvrerank firststage train` (a temporal transformer over the cached frame embeddings, trained "
        "on the train split; the val split picks the kept step), then the same re-ranker recipe on its "
        f"candidates. R@{metrics['k']} is the most re-ranking can reach.", "",
        "```", first_stage_table(metrics), "```", "",
        "![recall at k](recall_at_k.png)", "",
        *selector_section(metrics),
        "## Three test queries, top 5 (* = the true video)", "", "```", format_examples(summary["examples"]), "```", "",
        "## Time per stage (s)", "", "```", json.dumps({k: round(v, 1) for k, v in summary["seconds"].items()},
                                                       indent=1),
        "```", f"Total: {summary['total_seconds']:.0f} s.", "",
    ])
