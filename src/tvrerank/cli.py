"""The ``tvrerank`` command line: one thin command per stage; the work lives in the subpackages.

Heavy imports (torch, av, open_clip, h5py) happen inside the commands, so ``--help`` is instant.
Errors a user can cause (``tvrerank.errors.TvrerankError``) print one line and exit 2; any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from tvrerank.extract.annotations import FORMATS  # standard library only: --help stays instant



def _human(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(num_bytes) < 1024 or unit == "TiB":
            return f"{num_bytes:.1f} {unit}" if unit != "B" else f"{int(num_bytes)} B"
        num_bytes /= 1024
    return f"{num_bytes:.1f} TiB"


#: --pool N (N x N average of the patch grid) as the cache layout names it; the older spelling --token-pool
#: none|2x2 is accepted too
POOLS = {"1": "none", "2": "2x2", "none": "none", "2x2": "2x2"}
TOKEN_DTYPES = ("float16", "int8", "float8")  # cache.encoding.TOKEN_DTYPES, without importing numpy for --help
WORLDS = ("events", "detail")  # toy.world.WORLDS, without importing numpy for --help


def pool_option(function):
    return click.option("--pool", "--token-pool", "token_pool", type=click.Choice(list(POOLS)), default="1",
                        show_default=True, callback=lambda ctx, param, value: POOLS[value],
                        help="Average N x N windows of the patch grid (2: bigG's 16x16 -> 8x8), a storage/accuracy "
                             "trade; --token-pool none|2x2 is the older spelling.")(function)


def token_dtype_option(function):
    return click.option("--token-dtype", type=click.Choice(TOKEN_DTYPES), default="float16", show_default=True,
                        help="How patch and caption tokens are stored: float16, or 8 bits with a scale per token "
                             "(int8, float8 e4m3); embeddings stay float16.")(function)


def _writable(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """An output path (--out, --ranks-out) whose folder can be written, checked before any work."""
    from tvrerank.files import check_writable

    if value is not None:
        check_writable(value, f"--{param.name.replace('_', '-')}", create=param.name != "ranks_out")
    return value


def _shard(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        index, count = (int(v) for v in value.split("/"))
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected I/N, e.g. 0/4") from None
    if not 0 <= index < count:
        raise click.BadParameter(f"{value!r}: need 0 <= I < N")
    return index, count


class _Commands(click.Group):
    """The error boundary: a TvrerankError prints one line and exits 2 (with its traceback under -v)."""

    def invoke(self, ctx: click.Context):
        from tvrerank.errors import TvrerankError

        try:
            return super().invoke(ctx)
        except TvrerankError as exc:
            logging.getLogger("tvrerank").debug("the error's traceback:", exc_info=True)
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except OSError as exc:
            message = storage_error(exc)
            if message is None:
                raise
            logging.getLogger("tvrerank").debug("the error's traceback:", exc_info=True)
            click.echo(f"error: {message}", err=True)
            sys.exit(2)


def storage_error(exc: OSError) -> str | None:
    """One line for a full disk or an unwritable place (the user's to fix), else None (a bug)."""
    import errno

    text = str(exc)
    filename = getattr(exc, "filename", None)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in text or "errno = 28" in text:
        return (f"no space left on device{f' writing {filename}' if filename else ''}; free space and run the "
                "same command again (nothing already written is lost; extraction resumes from its finished parts)")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) or "Permission denied" in text \
            or "Read-only file system" in text:
        return (f"cannot write {filename or 'the output'} ({exc.strerror or text}); choose a writable --out "
                "(for `gallery`, a --reranker run folder you can write to)")
    return None


@click.group(cls=_Commands)
@click.version_option(package_name="tvrerank")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Text-to-video retrieval with a learned re-ranker over cached frozen-CLIP tokens."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("tvrerank").setLevel(logging.DEBUG if verbose else logging.INFO)


@main.command()
@click.option("--annotations", "annotations", multiple=True, required=True, type=click.Path(),
              help="Annotation file(s) in a dataset's published format (repeat for split list + captions).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None,
              help="Annotation format (guessed from the files when omitted).")
@click.option("--videos", required=True, type=click.Path(file_okay=False), help="Root folder of the videos.")
@click.option("--model", required=True, help="open_clip model name or path to a model-config JSON.")
@click.option("--pretrained", default=None,
              help="open_clip tag, checkpoint file, or local-dir:FOLDER. Omitted: random weights.")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              callback=_writable, help="Cache file to write (.h5).")
@click.option("--frames", default=12, show_default=True, type=click.IntRange(min=1), help="Frames sampled per video.")
@click.option("--token-space", type=click.Choice(["joint", "raw"]), default="joint", show_default=True)
@pool_option
@token_dtype_option
@click.option("--text-tokens", default=32, show_default=True, type=click.IntRange(min=1),
              help="Caption token features kept (L).")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1),
              help="Frames (and captions) per forward pass.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=0),
              help="Decoding processes (0: decode in this process).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True)
@click.option("--shard", default=None, help="I/N: extract the I-th of N slices (automatic under torchrun).")
@click.option("--part-videos", default=0, type=click.IntRange(min=0), help="Videos per resumable part (0: automatic).")
@click.option("--overwrite", is_flag=True, help="Start over, discarding an existing cache or unfinished run.")
@click.option("--resize", type=click.Choice(["torchvision", "libswscale"]), default="torchvision", show_default=True,
              help="How frames reach the encoder's input size: open_clip's own preprocessing (torchvision's "
                   "resize), or libswscale's, as caches made before tvrerank recorded it (to continue them).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def extract(annotations, fmt, videos, model, pretrained, out, frames, token_space, token_pool, token_dtype,
            text_tokens, batch_size, workers, device, precision, shard, part_videos, overwrite, resize, quiet) -> None:
    """Decode videos, run the frozen encoder once, and write the HDF5 cache (resumable)."""
    from tvrerank.config import ExtractConfig
    from tvrerank.extract import runner

    shard_index, shard_count = _shard(shard) or runner.shard_from_env()
    under_launcher = shard is None and shard_count > 1  # "auto"/"cuda" then mean this rank's GPU
    config = ExtractConfig(
        annotations=tuple(annotations), format=fmt, videos=videos, out=out, model=model,
        pretrained=pretrained, frames=frames, token_space=token_space, token_pool=token_pool,
        token_dtype=token_dtype, text_tokens=text_tokens, batch_size=batch_size, workers=workers, device=device,
        precision=precision, shard_index=shard_index, shard_count=shard_count,
        part_videos=part_videos, overwrite=overwrite, resize=resize,
    )
    summary = runner.run_extraction(config, progress=not quiet)
    click.echo(summary.line())
    if under_launcher:  # every rank waits; rank 0 merges and judges the whole run
        summary = runner.merge_after_torchrun(config, summary.seconds)
        if summary is None:
            return
        click.echo(f"merged {shard_count} shards: {summary.line()}")
    if summary.ok == 0 and summary.videos > 0:
        click.echo(f"error: every video failed; see videos/error in {summary.out}", err=True)
        sys.exit(1)


@main.group()
def cache() -> None:
    """Inspect, check, merge and compact caches."""


@cache.command("info")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def cache_info_cmd(path: str, as_json: bool) -> None:
    """Counts, encoder, sampling, token layout, shapes and size of a cache."""
    from tvrerank.cache.inspect import cache_info

    info = cache_info(path)
    if as_json:
        click.echo(json.dumps(info, sort_keys=True))
        return
    enc = info["encoder"]
    click.echo(f"cache      {info['path']} ({info['schema']}, tvrerank {info['tool_version']}, {info['created']})")
    click.echo(f"videos     {info['videos']} ({info['videos_ok']} ok, {info['videos_failed']} failed, "
               f"{info['videos_pending']} pending)")
    click.echo(f"captions   {info['captions']}")
    click.echo(f"encoder    {enc['model']} pretrained={enc['pretrained']} image {enc['image_size']}px "
               f"{enc['precision']}")
    click.echo(f"sampling   {info['frames']} frames ({info['sampling']['strategy']}), resized by "
               f"{info['sampling']['resize']} ({enc['interpolation']}, {enc['resize_mode']})")
    click.echo(f"tokens     {info['tokens_per_frame']} per frame x {info['token_dim']} "
               f"({info['token_space']}, pool {info['token_pool']}, {info['token_dtype']}); text {info['text_tokens']} x "
               f"{info['text_token_dim']}; embeddings {info['embed_dim']}")
    for name, (shape, dtype) in sorted(info["shapes"].items()):
        click.echo(f"  {name:<18} {str(tuple(shape)):<24} {dtype}")
    click.echo(f"on disk    {_human(info['bytes_on_disk'])} in {len(info['files'])} file(s)")


@cache.command("check")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
def cache_check_cmd(path: str) -> None:
    """Schema, checksums (damaged bytes), NaN/inf and completeness; exits non-zero on any problem."""
    from tvrerank.cache.inspect import check_cache, checksum_notes

    problems = check_cache(path)
    for problem in problems:
        click.echo(f"problem: {problem}", err=True)
    for note in checksum_notes(path):
        click.echo(f"note: {path}: {note}", err=True)
    if problems:
        sys.exit(1)
    click.echo(f"{path}: ok")


@cache.command("compact")
@click.argument("source", metavar="CACHE", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Compact cache to write (.h5).")
@click.option("--token-dtype", type=click.Choice(TOKEN_DTYPES), default="int8", show_default=True,
              help="Encoding of the tokens in OUT.")
@click.option("--pool", "token_pool", type=click.Choice(list(POOLS)), default=None,
              callback=lambda ctx, param, value: None if value is None else POOLS[value],
              help="Also average 2x2 windows of the patch grid (default: keep CACHE's grid).")
@click.option("--overwrite", is_flag=True, help="Start over, discarding an unfinished compaction.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def cache_compact_cmd(source: str, out: str, token_dtype: str, token_pool: str | None, overwrite: bool,
                      quiet: bool) -> None:
    """Convert CACHE's tokens to 8 bits (and/or pool them) without extracting again: part by part, resumable,
    every chunk read checked against CACHE's checksums. Artifacts of CACHE (index, re-ranker) do not carry
    over: build them on OUT."""
    from tvrerank.cache.compact import compact_cache

    compact_cache(source, out, token_dtype=token_dtype, pool=token_pool, overwrite=overwrite, progress=not quiet)
    before, after = Path(source).stat().st_size, Path(out).stat().st_size
    click.echo(f"{out}: {_human(before)} -> {_human(after)} ({after / max(1, before):.0%}), tokens {token_dtype}")


@cache.command("merge")
@click.argument("shards", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), callback=_writable)
@click.option("--join", is_flag=True, help="The files are whole caches of separate runs (same encoder and --videos "
                                           "root, no shared video id), joined in the order given into one gallery.")
def cache_merge_cmd(shards, out: str, join: bool) -> None:
    """Join shard caches into one with HDF5 virtual datasets (no copy; keep the shards)."""
    from tvrerank.cache.merge import join_caches, merge_shards

    if join:
        click.echo(f"joined {len(shards)} caches into {join_caches(shards, out)}")
        return
    merged = merge_shards(shards, out)
    click.echo(f"merged {len(shards)} shards into {merged}")


@main.command()
@click.option("--model", required=True, help="open_clip model name or model-config JSON.")
@click.option("--videos", "num_videos", required=True, type=click.IntRange(min=1), help="Number of videos.")
@click.option("--frames", default=12, show_default=True, type=click.IntRange(min=1))
@click.option("--captions", "num_captions", type=click.IntRange(min=1), default=None, help="Number of captions (default: = videos).")
@click.option("--token-space", type=click.Choice(["joint", "raw"]), default="joint", show_default=True)
@pool_option
@token_dtype_option
@click.option("--text-tokens", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--caption-tokens", type=click.FloatRange(min=1), default=None,
              help="Mean real tokens per caption (start and end included): 8-bit caches store no padding "
                   "(default: all --text-tokens, an upper bound).")
@click.option("--json", "as_json", is_flag=True)
def plan(model, num_videos, frames, num_captions, token_space, token_pool, token_dtype, text_tokens, caption_tokens,
         as_json) -> None:
    """Estimate a cache's size on disk from the model config (no weights built), for every token encoding and
    pool, and whether training could hold it in memory here."""
    from dataclasses import asdict

    from tvrerank.cache.rows import available_memory, default_memory_budget
    from tvrerank.extract.plan import plan_every_option

    plans = plan_every_option(model, num_videos, captions=num_captions, frames=frames, token_space=token_space,
                              text_tokens=text_tokens, caption_tokens=caption_tokens)
    estimate = next(p for p in plans if (p.token_dtype, p.pool) == (token_dtype, token_pool))
    budget = default_memory_budget()
    if as_json:
        click.echo(json.dumps(dict(asdict(estimate), bytes_total=estimate.bytes_total, memory_budget=budget,
                                   options=[dict(asdict(p), bytes_total=p.bytes_total) for p in plans])))
        return
    click.echo(f"{model}: {estimate.tokens_per_frame} tokens/frame (grid {estimate.grid[0]}x{estimate.grid[1]}) "
               f"x {estimate.token_dim} ({token_space}, pool {token_pool}, {token_dtype}), "
               f"embeddings {estimate.embed_dim}")
    click.echo(f"per frame  {_human(estimate.bytes_per_frame)}; per video ({frames} frames) "
               f"{_human(estimate.bytes_per_frame * frames)}")
    click.echo(f"tokens     {_human(estimate.bytes_tokens)}")
    click.echo(f"embeddings {_human(estimate.bytes_embeddings)}")
    length = (f"{caption_tokens:g} real tokens each on average" if caption_tokens and token_dtype != "float16"
              else f"{text_tokens} tokens each{'' if token_dtype == 'float16' else ', at most'}")
    click.echo(f"captions   {_human(estimate.bytes_text)} ({estimate.captions} captions, {length})")
    click.echo("every option (extract --token-dtype, --pool):")
    click.echo(f"  {'':<9}{'pool 1':>12}{'pool 2':>12}")
    for dtype in TOKEN_DTYPES:
        row = {p.pool: p.bytes_total for p in plans if p.token_dtype == dtype}
        click.echo(f"  {dtype:<9}{_human(row['none']):>12}{_human(row['2x2']):>12}")
    fits = estimate.bytes_in_memory <= budget
    click.echo(f"in memory  training holds {_human(estimate.bytes_in_memory)} (tokens as stored, frame embeddings); "
               f"{'fits' if fits else 'does not fit'} half of this machine's {_human(available_memory())} available"
               f"{'' if fits else ' (train --in-memory auto reads from the file; on a GPU it fits half its free memory)'}")
    click.echo(f"total      {_human(estimate.bytes_total)} for {num_videos} videos")


@main.command()
@click.argument("cache_path", metavar="CACHE", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False),
              callback=_writable, help="Index folder to write.")
@click.option("--factory", default="Flat", show_default=True,
              help="FAISS factory string (Flat, HNSW32, IVF1024,PQ64x8, ...) or auto (by size and memory).")
@click.option("--memory-budget-gb", default=4.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="For --factory auto.")
@click.option("--video-emb", type=click.Path(exists=True, dir_okay=False),
              help="Index a trained first stage's video_emb.npy (tvrerank firststage embed) instead of the cache's.")
def index(cache_path: str, out: str, factory: str, memory_budget_gb: float, video_emb: str | None) -> None:
    """FAISS inner-product index over the cache's video embeddings (ok videos only)."""
    from tvrerank.index.store import build_index_dir

    config = build_index_dir(cache_path, out, factory, int(memory_budget_gb * 2**30), video_emb=video_emb)
    click.echo(f"{out}: {config.factory} over {config.count} videos ({config.reason})")


@main.command()
@click.argument("cache_path", metavar="CACHE", type=click.Path(exists=True, dir_okay=False))
@click.option("--index", "index_dir", type=click.Path(exists=True, file_okay=False), help="Index folder of CACHE.")
@click.option("--text-emb", type=click.Path(exists=True, dir_okay=False),
              help="External first stage: caption embeddings (.npy, one row per caption of CACHE).")
@click.option("--video-emb", type=click.Path(exists=True, dir_okay=False),
              help="External first stage: video embeddings (.npy, one row per video of CACHE).")
@click.option("--similarity", type=click.Path(exists=True, dir_okay=False),
              help="External first stage: a captions x videos score matrix (.npy).")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              callback=_writable, help="Candidates file to write (.h5).")
@click.option("--k", default=15, show_default=True, type=click.IntRange(min=1), help="Candidates per caption.")
def candidates(cache_path, index_dir, text_emb, video_emb, similarity, out, k) -> None:
    """Top-K stage-1 candidates (and every caption's true stage-1 rank) for every caption."""
    from tvrerank.index.candidates import build_candidates, write_candidates

    lists = build_candidates(cache_path, k=k, index_dir=index_dir, text_emb=text_emb, video_emb=video_emb,
                             similarity=similarity)
    write_candidates(out, lists, cache_path)
    valid = lists.true_rank[lists.true_rank > 0]
    within = float((valid <= lists.video.shape[1]).mean() * 100) if len(valid) else 0.0
    click.echo(f"{out}: top-{lists.video.shape[1]} for {len(lists.true_rank)} captions from {lists.source}; "
               f"the true video is within K for {within:.1f}%")


@main.group()
def firststage() -> None:
    """A first stage trained from the cache (temporal pooling of the frame embeddings)."""


@firststage.command("train")
@click.option("--cache", "cache_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Training cache (its frame and caption embeddings are all that is read).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              callback=_writable, help="Run folder.")
@click.option("--val-fraction", type=click.FloatRange(0, 0.9, min_open=True), default=None,
              help="Hold out this fraction of the training videos to pick the kept weights.")
@click.option("--val-cache", type=click.Path(exists=True, dir_okay=False), help="A validation cache instead.")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              help="JSON of first-stage options (steps, batch, lr, model: {pooling, layers, ...}).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Override the number of steps.")
@click.option("--device", default=None, help="auto, cpu, cuda (overrides the config).")
@click.option("--resume", is_flag=True, help="Continue from the run folder's last checkpoint.")
def firststage_train(cache_path, out, val_fraction, val_cache, config_path, steps, device, resume) -> None:
    """Train a CLIP4Clip-style first stage on a cache (symmetric InfoNCE over in-batch pairs)."""
    from tvrerank.firststage.train import load_config, train_first_stage

    config = load_config(config_path, steps=steps, device=device, val_fraction=val_fraction)
    metrics = train_first_stage(cache_path, out, config, val_cache=val_cache, resume=resume)
    line = f"{out}: {metrics['steps']} steps"
    if metrics["validation"]:
        line += (f"; validation R@1 {metrics['zero_shot_validation']['R1']:.1f} (zero-shot) -> "
                 f"{metrics['validation']['R1']:.1f} (kept step {metrics['kept_step']})")
    click.echo(line)


@firststage.command("embed")
@click.option("--run", "run_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--cache", "cache_path", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False),
              callback=_writable, help="Folder for text_emb.npy, video_emb.npy.")
@click.option("--device", default="cpu", show_default=True)
def firststage_embed(run_dir, cache_path, out, device) -> None:
    """Embeddings of every caption and video of a cache (for `candidates --text-emb --video-emb`)."""
    from tvrerank.devices import resolve_device
    from tvrerank.firststage.store import embed_cache

    record = embed_cache(run_dir, cache_path, out, device=str(resolve_device(device)))
    click.echo(f"{out}: text_emb.npy ({record['captions']} captions), video_emb.npy ({record['videos']} videos); "
               f"use: tvrerank candidates {cache_path} --text-emb {out}/text_emb.npy --video-emb {out}/video_emb.npy")


@main.command()
@click.option("--cache", "cache_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Training cache.")
@click.option("--candidates", "candidates_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Candidates of the training cache.")
@click.option("--val-fraction", type=click.FloatRange(0, 0.9, min_open=True), default=None,
              help="Hold out this fraction of the training cache's videos (seeded) to tune the fusion weight "
                   "and choose the checkpoint; they are never trained on.")
@click.option("--val-cache", type=click.Path(exists=True, dir_okay=False),
              help="Or: a validation cache of its own (never the split you report).")
@click.option("--val-candidates", type=click.Path(exists=True, dir_okay=False), help="Candidates of --val-cache.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              callback=_writable, help="Run folder.")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              help="Training options as JSON (TrainConfig fields; 'model' holds RerankerConfig fields).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Override the number of steps.")
@click.option("--device", default=None, help="auto, cpu, cuda (overrides the config).")
@click.option("--workers", type=click.IntRange(min=0), default=None, help="DataLoader worker processes.")
@click.option("--in-memory", type=click.Choice(["auto", "on", "off"]), default=None,
              help="Load the cache's tokens once (in their stored encoding) and gather every step from memory: auto "
                   "when they fit memory_budget_gb (on CUDA: half the GPU's free memory, held there); default auto.")
@click.option("--resume", is_flag=True, help="Continue from RUN_DIR's last checkpoint.")
def train(cache_path, candidates_path, val_fraction, val_cache, val_candidates, out, config_path, steps, device,
          workers, in_memory, resume) -> None:
    """Train the re-ranker from the cache and candidate lists alone (DDP under torchrun)."""
    from tvrerank.train.loop import load_train_config, train as run_training

    if (val_cache is None) != (val_candidates is None):
        raise click.UsageError("--val-cache and --val-candidates go together")
    if val_cache is not None and val_fraction is not None:
        raise click.UsageError("give --val-fraction or --val-cache/--val-candidates, not both")
    from tvrerank.evaluation import fusion_label

    config = load_train_config(config_path, steps=steps, device=device, workers=workers, val_fraction=val_fraction,
                               in_memory=in_memory)
    metrics = run_training(cache_path, candidates_path, out, config, val_cache=val_cache,
                           val_candidates=val_candidates, resume=resume)
    line = f"{out}: {config.optim.steps} steps, final loss {metrics['final_loss']:.3f}"
    if "val" in metrics:
        val = metrics["val"]
        line += (f"; validation R@1 {val['stage1']['R1']:.1f} -> {val['reranked']['R1']:.1f} "
                 f"({fusion_label(val)}, step {metrics['best_step']})")
    else:
        line += "; no validation split (alpha from the config; consider --val-fraction 0.1)"
    click.echo(line)


@main.command("eval")
@click.option("--cache", "cache_path", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--candidates", "candidates_path", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--reranker", "run_dir", type=click.Path(exists=True, file_okay=False),
              help="A trained re-ranker's run folder: adds the re-ranked columns.")
@click.option("--dsl", is_flag=True, help="Also report dual-softmax (inverted softmax) re-weighted stage 1, apart.")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--ranks-out", type=click.Path(dir_okay=False), callback=_writable,
              help="With --reranker: write every caption's rank under each variant to this CSV file.")
def evaluate(cache_path: str, candidates_path: str, run_dir: str | None, dsl: bool, device: str,
             as_json: bool, ranks_out: str | None) -> None:
    """Retrieval metrics (R@1/5/10, MdR, MnR): stage 1, and re-ranked with --reranker."""
    from tvrerank.evaluation import VARIANTS, evaluate_run, fusion_label, stage1_evaluation, write_rank_table
    from tvrerank.metrics import format_table

    if ranks_out is not None and run_dir is None:
        raise click.UsageError("--ranks-out needs --reranker")
    result = stage1_evaluation(cache_path, candidates_path, dsl=dsl)
    if run_dir is not None:
        reranked = evaluate_run(run_dir, cache_path, candidates_path, device=device, keep_ranks=ranks_out is not None)
        if ranks_out is not None:
            write_rank_table(ranks_out, cache_path, reranked["ranks"])
        result.update({key: reranked[key] for key in (*VARIANTS, "alpha", "fusion", "tuned_on_this_split",
                                                      "trained_on_this_split", "selectors") if key in reranked})
    if as_json:
        click.echo(json.dumps(result, sort_keys=True))
        return
    click.echo(f"text->video, {result['evaluated']} of {result['captions']} captions "
               f"(true video within top-{result['k']}: {result['recall_at_k']:.1f}%)")
    columns = {"stage 1": result["stage1"]}
    if "reranked" in result:
        columns.update({"re-ranker alone": result["reranker_only"], "plain sum": result["plain_sum"],
                        fusion_label(result): result["reranked"]})
    click.echo(format_table(columns))
    for flag, what in (("trained_on_this_split", "trained"), ("tuned_on_this_split", "tuned")):
        if result.get(flag):
            click.echo(f"warning: the re-ranker was {what} on this split: these are not held-out numbers", err=True)
    if "selectors" in result:
        from tvrerank.selector_recall import format_recalls

        click.echo(format_recalls(result["selectors"]))
    if "v2t" in result:
        click.echo("video->text")
        click.echo(format_table({"stage 1": result["v2t"]["stage1"]}))
    if "dsl" in result:
        click.echo("text->video with dual softmax (uses every test query at once; not comparable)")
        click.echo(format_table({"stage 1 + DSL": result["dsl"]["stage1"]}))


def read_text_lines(path: str, where: str) -> list[str]:
    """The lines of a UTF-8 text file (``-``: stdin); a byte that is not UTF-8 is an error naming its line."""
    from tvrerank.errors import InputError

    data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputError(f"{where}: line {line} is not UTF-8 text; save the file as UTF-8 (one query per line)") \
            from None


@main.command()
@click.argument("queries", nargs=-1)
@click.option("--gallery", required=True, type=click.Path(exists=True, dir_okay=False), help="The gallery's cache.")
@click.option("--index", "index_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--reranker", "run_dir", type=click.Path(exists=True, file_okay=False),
              help="Trained re-ranker run folder (needed unless --no-rerank).")
@click.option("--queries-file", type=click.Path(allow_dash=True, dir_okay=False),
              help="One query per line; - reads standard input.")
@click.option("--top", default=10, show_default=True, type=click.IntRange(min=1), help="Results per query.")
@click.option("--k", default=15, show_default=True, type=click.IntRange(min=1),
              help="Stage-1 candidates the re-ranker re-orders.")
@click.option("--no-rerank", is_flag=True, help="Stage 1 only.")
@click.option("--no-store", is_flag=True, help="Ignore the gallery store (compute selected tokens on the fly).")
@click.option("--device", default="auto", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for torch and FAISS (default: theirs).")
@click.option("--first-stage", "first_stage", type=click.Path(exists=True, file_okay=False),
              help="A trained first stage (firststage train); --index must hold its video embeddings.")
@click.option("--candidates-file", type=click.Path(allow_dash=True, dir_okay=False),
              help='Re-rank another first stage\'s candidates: one JSON line per query, {"q": ..., "video_ids": '
                   '[...]} (at most --k ids of the gallery; optional "stage1": their scores); - reads stdin.')
@click.option("--json", "as_json", is_flag=True, help="One JSON object per query.")
def retrieve(queries, gallery, index_dir, run_dir, queries_file, top, k, no_rerank, no_store, device, threads,
             first_stage, candidates_file, as_json) -> None:
    """Search the gallery for text queries: FAISS top-K, re-ranked (or re-rank given candidates)."""
    from tvrerank.retrieve.retriever import Retriever, check_queries, set_cpu_threads

    if candidates_file is not None:
        if queries or queries_file is not None or no_rerank:
            raise click.UsageError("--candidates-file goes alone: not with queries, --queries-file or --no-rerank")
        if run_dir is None:
            raise click.UsageError("--candidates-file needs --reranker RUN_DIR")
        from tvrerank.retrieve.external import parse_candidate_lines
        from tvrerank.retrieve.retriever import candidate_rows

        where = "stdin" if candidates_file == "-" else candidates_file
        lines = parse_candidate_lines(read_text_lines(candidates_file, where), where)
        if threads is not None:
            set_cpu_threads(threads)
        with Retriever(gallery, index_dir, run_dir, device=device, use_store=not no_store,
                       first_stage=first_stage) as retriever:
            for line in lines:  # every id checked before anything is scored
                candidate_rows(line.video_ids, retriever.row_of, retriever.indexed, k, where=line.where,
                               not_indexed=retriever.not_indexed)
            results = [retriever.rerank(line.query, line.video_ids, stage1=line.stage1, k=k, top=top)
                       for line in lines]
        _print_results(results, as_json)
        return
    texts, names = list(queries), [f"query {i + 1} (argument)" for i in range(len(queries))]
    if queries_file is not None:
        where = "stdin" if queries_file == "-" else queries_file
        lines = read_text_lines(queries_file, where)
        for number, line in enumerate(lines, start=1):
            if line == "":
                continue  # blank separator lines are not queries
            texts.append(line)
            names.append(f"{where} line {number}")
    if not texts:
        raise click.UsageError("give queries as arguments, --queries-file FILE, or --queries-file - (stdin)")
    if run_dir is None and not no_rerank:
        raise click.UsageError("--reranker RUN_DIR is needed (or pass --no-rerank for stage 1 only)")
    check_queries(texts, names)
    if threads is not None:
        set_cpu_threads(threads)
    with Retriever(gallery, index_dir, None if no_rerank else run_dir, device=device,
                   use_store=not no_store, first_stage=first_stage) as retriever:
        results = retriever.search(texts, top=top, k=k, rerank=not no_rerank)
    _print_results(results, as_json)


def _print_results(results, as_json: bool) -> None:
    for result in results:
        if as_json:
            click.echo(json.dumps(result.to_json(), ensure_ascii=False))
            continue
        click.echo(f"query: {result.query}")
        click.echo(f"  {'rank':>4}  {'video':<20} {'stage1':>7} {'rerank':>7} {'score':>7}  path")
        for rank, hit in enumerate(result.results, start=1):
            rerank = "-" if hit.rerank is None else f"{hit.rerank:.3f}"
            click.echo(f"  {rank:>4}  {hit.video_id:<20} {hit.stage1:>7.3f} {rerank:>7} {hit.score:>7.3f}  {hit.path}")


@main.command()
@click.option("--gallery", required=True, type=click.Path(exists=True, dir_okay=False), help="The gallery's cache.")
@click.option("--reranker", "run_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--device", default="auto", show_default=True)
def gallery(gallery: str, run_dir: str, device: str) -> None:
    """Precompute the re-ranker's selected tokens of every gallery video (used by retrieve)."""
    from tvrerank.devices import resolve_device
    from tvrerank.retrieve.gallery_store import build_for_run, describe

    path = build_for_run(gallery, run_dir, resolve_device(device))
    info = describe(path)
    click.echo(f"{path}: selected tokens of {info['videos']} videos ({_human(info['bytes'])})")


@main.command()
@click.argument("demo_dir", required=False, type=click.Path(exists=True, file_okay=False))
@click.option("--gallery", type=click.Path(exists=True, dir_okay=False), help="The gallery's cache.")
@click.option("--index", "index_dir", type=click.Path(exists=True, file_okay=False), help="Index folder of --gallery.")
@click.option("--reranker", "run_dir", type=click.Path(exists=True, file_okay=False), help="Trained re-ranker run folder.")
@click.option("--videos", type=click.Path(exists=True, file_okay=False),
              help="The videos folder (default: the one recorded in the cache).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (no authentication!).")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535), help="0: any free port.")
@click.option("--k", default=15, show_default=True, type=click.IntRange(min=1),
              help="Stage-1 candidates the re-ranker re-orders.")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for torch and FAISS (default: theirs).")
@click.option("--first-stage", "first_stage", type=click.Path(exists=True, file_okay=False),
              help="A trained first stage; --index must hold its video embeddings.")
@click.option("--device", default="auto", show_default=True)
@click.option("--shards", default=None, help="URL,URL,...: search the shard servers (`tvrerank serve SHARD_DIR` each) "
              "as one gallery; this process holds no model (K is the shards' --k).")
def serve(demo_dir, gallery, index_dir, run_dir, videos, host, port, k, threads, first_stage, device, shards) -> None:
    """A local search page: stage 1 beside re-ranked, and what the re-ranker looked at.

    DEMO_DIR, a `tvrerank demo` output folder, stands for its test gallery, index and run; a shard folder of
    `tvrerank split` for its slice of a gallery.
    """
    from tvrerank.serve import server

    server.require_web_stack()
    if shards is not None:
        if demo_dir or gallery or index_dir or run_dir or first_stage:
            raise click.UsageError("--shards serves shard servers' answers: give no folder, --gallery, --index, "
                                   "--reranker or --first-stage")
        _serve_front([url.strip() for url in shards.split(",") if url.strip()], host, port)
        return
    if demo_dir is not None:
        from tvrerank.retrieve.shards import is_shard_folder, read_shard

        found = read_shard(demo_dir) if is_shard_folder(demo_dir) else server.demo_artifacts(demo_dir)
        gallery, index_dir, run_dir = gallery or found["gallery"], index_dir or found["index"], run_dir or found["reranker"]
        videos = videos or found["videos"]  # the demo records its videos folder as it was given, maybe relative
        # (a shard's: the one given to split, else None: the cache's record)
    missing = [name for name, value in (("--gallery", gallery), ("--index", index_dir), ("--reranker", run_dir))
               if value is None]
    if missing:
        raise click.UsageError(f"give a demo folder, or {', '.join(missing)}")
    from tvrerank.retrieve.retriever import Retriever, set_cpu_threads
    from tvrerank.serve.app import create_app
    from tvrerank.serve.service import SearchService

    if threads is not None:
        set_cpu_threads(threads)
    sock = server.bind(host, port)
    with sock, Retriever(gallery, index_dir, run_dir, device=device, first_stage=first_stage) as retriever:
        service = SearchService(retriever, videos_root=videos, k=k)
        if not server.is_loopback(host):
            click.echo(f"warning: listening on {host} with no authentication: anyone who can reach this machine "
                       "can search the gallery and see its frames", err=True)
        click.echo(f"serving {gallery} ({len(service.row_of)} videos) at {server.url_of(sock, host)} "
                   "(Ctrl-C stops)", err=False)
        server.run(create_app(service, allowed_hosts=server.allowed_hosts(host)), sock)


def _serve_front(urls: list[str], host: str, port: int) -> None:
    """``serve --shards``: one search API over the shard servers at ``urls``."""
    from tvrerank.retrieve.sharded import ShardedRetriever
    from tvrerank.serve import server
    from tvrerank.serve.front import create_front_app

    sock = server.bind(host, port)
    with sock, ShardedRetriever(urls) as sharded:
        if not server.is_loopback(host):
            click.echo(f"warning: listening on {host} with no authentication", err=True)
        click.echo(f"serving {len(urls)} shards ({sharded.searchable} videos) at {server.url_of(sock, host)} "
                   "(Ctrl-C stops)")
        server.run(create_front_app(sharded, allowed_hosts=server.allowed_hosts(host)), sock)


@main.command()
@click.option("--gallery", required=True, type=click.Path(exists=True, dir_okay=False), help="The gallery's cache.")
@click.option("--index", "index_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Index folder of --gallery.")
@click.option("--reranker", "run_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="The re-ranker run folder (its gallery store is split too).")
@click.option("--shards", required=True, type=click.IntRange(min=1), help="Number of shards.")
@click.option("--out", required=True, type=click.Path(file_okay=False), callback=_writable,
              help="Folder of the shard folders (shard-I-of-N), replaced whole.")
@click.option("--videos", type=click.Path(exists=True, file_okay=False),
              help="The videos folder the shards serve frames from (default: the one recorded in the cache).")
def split(gallery, index_dir, run_dir, shards, out, videos) -> None:
    """Split a gallery's index and gallery store into shard folders, one `tvrerank serve SHARD_DIR` each."""
    from tvrerank.retrieve.shards import split_gallery

    for path in split_gallery(gallery, index_dir, run_dir, out, shards, videos=videos):
        click.echo(f"{path}")
    click.echo("serve each with `tvrerank serve SHARD_DIR --port P`, then one front with "
               "`tvrerank serve --shards http://127.0.0.1:P1/,...`")


@main.group()
def toy() -> None:
    """The embedded toy world (synthetic videos with known answers)."""


@toy.command("make")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              callback=_writable, help="Folder to write the toy world to.")
@click.option("--videos", default=240, show_default=True, type=click.IntRange(min=8),
              help="Videos in all (a quarter are test).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--world", type=click.Choice(WORLDS), default="events", show_default=True,
              help="events: confusers differ in event order or direction; detail: each video also shows a small "
                   "glyph in a few frames, named by its captions, and the confusers differ only in it.")
def toy_make(out: str, videos: int, seed: int, world: str) -> None:
    """Write toy videos (mp4) with train/test captions in the generic JSONL format."""
    from tvrerank.toy.make import ToyWorldConfig, make_toy_world

    make_toy_world(out, ToyWorldConfig(videos=videos, seed=seed, world=world))
    click.echo(f"{world} toy world written to {out} (train.jsonl, test.jsonl, videos/, scripts.json); use --videos {out}"
               + (" and --pretrained toy-detail; then `tvrerank toy truth` on each cache" if world == "detail" else ""))


@toy.command("truth")
@click.argument("world_dir", metavar="WORLD", type=click.Path(exists=True, file_okay=False))
@click.argument("caches", metavar="CACHE...", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
def toy_truth(world_dir: str, caches: tuple[str, ...]) -> None:
    """Record a toy world's name and ground truth (where the detail is, per sampled frame) in caches
    extracted from it; `eval --reranker` then reports the selectors' known-answer recalls."""
    from tvrerank.toy.truth import attach_world_truth

    for cache in caches:
        found = attach_world_truth(cache, world_dir)
        click.echo(f"{cache}: {found['world']} world, {found['videos']} videos"
                   + (f", {found['detail_frames']} sampled frames show the detail" if found["world"] == "detail" else ""))


@toy.command("pretrain")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              callback=_writable, help="Weights file to write (.safetensors).")
@click.option("--steps", default=1500, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", default=1e-3, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--threads", default=0, show_default=True, type=click.IntRange(min=0), help="torch threads (0: default).")
@click.option("--world", type=click.Choice(WORLDS), default="events", show_default=True,
              help="detail: half the frames also show a detail glyph their captions never name (--pretrained toy-detail).")
@click.option("--warmup", default=100, show_default=True, type=click.IntRange(min=0), help="Warm-up steps.")
@click.option("--init", default="", help="tvr-toy weights to start from (a shipped tag, e.g. toy, or a file); "
                                         "default: seeded random weights.")
def toy_pretrain(out: str, steps: int, batch_size: int, lr: float, seed: int, threads: int, world: str, warmup: int,
                 init: str) -> None:
    """Train the toy encoder (tvr-toy) on single toy frames; rebuilds the shipped weights."""
    from tvrerank.extract.encoder import FrozenClipEncoder
    from tvrerank.toy.pretrain import PretrainConfig, pretrain, zero_shot_accuracy
    from tvrerank.toy.probe import detail_probe, format_probe

    config = PretrainConfig(optim={"steps": steps, "lr": lr, "warmup": warmup}, batch_size=batch_size, seed=seed,
                            threads=threads, world=world, init=init)
    result = pretrain(config, out)
    encoder = FrozenClipEncoder(model="tvr-toy", pretrained=out, device="cpu")
    accuracy = zero_shot_accuracy(encoder)
    click.echo(f"{out}: {result['bytes'] / 2**20:.1f} MiB, final loss {result['final_loss']:.3f}, "
               f"{result['seconds'] / 60:.1f} min; zero-shot frame->caption top-1 over 256: "
               f"{accuracy:.1%} (chance 0.4%)")
    click.echo(format_probe(detail_probe(encoder)))


@toy.command("probe")
@click.option("--pretrained", default="toy-detail", show_default=True,
              help="tvr-toy weights: a shipped tag (toy, toy-detail) or a .safetensors file.")
@click.option("--frames", "count", default=1500, show_default=True, type=click.IntRange(min=30))
@click.option("--cache", "cache_path", type=click.Path(exists=True, dir_okay=False),
              help="Probe a detail world's cache instead (its tokens as extracted; needs --world).")
@click.option("--world", "world_dir", type=click.Path(exists=True, file_okay=False), help="The cache's toy world folder.")
def toy_probe(pretrained: str, count: int, cache_path: str | None, world_dir: str | None) -> None:
    """Linear probes of the detail glyph's colour and shape: from its patch token vs the frame embedding."""
    from tvrerank.toy.probe import cache_probe, detail_probe, format_probe

    if (cache_path is None) != (world_dir is None):
        raise click.UsageError("--cache and --world go together")
    if cache_path is not None:
        result = cache_probe(cache_path, world_dir)
        click.echo(f"{cache_path}: {result['frames']} sampled frames showing the glyph, {result['videos']} videos "
                   "(probe fitted on two thirds of the videos, scored on the rest)")
        click.echo(format_probe(result))
        return
    from tvrerank.extract.encoder import FrozenClipEncoder

    encoder = FrozenClipEncoder(model="tvr-toy", pretrained=pretrained, device="cpu")
    click.echo(format_probe(detail_probe(encoder, count=count)))


@main.command()
@click.option("--out", default="demo-out", show_default=True, type=click.Path(file_okay=False), callback=_writable)
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--videos", default=360, show_default=True, type=click.IntRange(min=48),
              help="Toy videos in all (train/val/test).")
@click.option("--steps", default=None, type=click.IntRange(min=1), help="Re-ranker training steps (default: the demo's).")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=0),
              help="Decoding processes for extraction.")
@click.option("--world", type=click.Choice(WORLDS), default="events", show_default=True,
              help="The toy world (see `tvrerank toy make --help`).")
@pool_option
@token_dtype_option
def demo(out: str, seed: int, videos: int, steps: int | None, workers: int, world: str, token_pool: str,
         token_dtype: str) -> None:
    """Run the whole pipeline on the toy world and print stage 1 vs re-ranked."""
    import dataclasses

    from tvrerank.metrics import format_table
    from tvrerank.toy.demo import DemoConfig, first_stage_table, format_examples, metric_columns, run_demo

    config = DemoConfig(out=out, seed=seed, videos=videos, workers=workers, token_dtype=token_dtype,
                        token_pool=token_pool, world=world)
    summary = run_demo(config if steps is None else dataclasses.replace(config, steps=steps))
    metrics = summary["metrics"]
    click.echo(f"test split, text->video ({metrics['evaluated']} captions; true video within top-{metrics['k']}: "
               f"{metrics['recall_at_k']:.1f}%):")
    click.echo(format_table(metric_columns(metrics)))

    click.echo(format_examples(summary["examples"]))
    click.echo(first_stage_table(metrics))
    if "selectors" in metrics:
        from tvrerank.selector_recall import format_recalls

        click.echo(format_recalls(metrics["selectors"]))
    click.echo(f"R@1 {metrics['stage1']['R1']:.1f} -> {metrics['reranked']['R1']:.1f} "
               f"({metrics['reranked']['R1'] - metrics['stage1']['R1']:+.1f}); "
               f"{summary['total_seconds']:.0f}s in all; report: {out}/report.md")
    command = sys.argv[0] if Path(sys.argv[0]).name == "tvrerank" else "tvrerank"  # .venv/bin/tvrerank under make
    click.echo(f"search page: {command} serve {out}")


if __name__ == "__main__":
    main()
