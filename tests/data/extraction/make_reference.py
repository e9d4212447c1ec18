"""Run with the code of 3085ac9 (extraction before it was split into reader, mapper and writer):
the test clips of tests/conftest.py extracted as tests/test_runner.py's reference run does, twice (the
default settings, and a pooled grid resized by libswscale), for test_runner's comparison with today's code.

    PYTHONPATH=<checkout of 3085ac9>/src python tests/data/extraction/make_reference.py tests/data/extraction
"""
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # tests/, for conftest's clip maker

from conftest import TINY_VIT, make_dataset  # noqa: E402

from tvrerank.config import ExtractConfig  # noqa: E402
from tvrerank.extract.runner import run_extraction  # noqa: E402

SETTINGS = {"default": {}, "pooled-libswscale": {"token_pool": "2x2", "resize": "libswscale"}}

out = Path(sys.argv[1])
with tempfile.TemporaryDirectory() as tmp:
    annotations = make_dataset(Path(tmp) / "data", num_videos=6)
    for name, changes in SETTINGS.items():
        config = ExtractConfig(annotations=(str(annotations),), format="jsonl", videos=str(annotations.parent),
                               out=str(out / f"{name}.h5"), model=str(TINY_VIT), frames=4, batch_size=8, workers=0,
                               device="cpu", part_videos=2)
        run_extraction(replace(config, **changes), progress=False)
