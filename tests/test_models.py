"""Model resolution (extract/models.py): every open_clip model either plans or says what to do."""

from __future__ import annotations

import open_clip
import pytest
from click.testing import CliRunner

from tvrerank.cli import main

#: the one-line answers a model that cannot be planned may give
KNOWN_REFUSALS = ("install it with `pip install 'tvrerank[hf]'`", "use --token-space raw")


@pytest.mark.slow
def test_plan_over_the_whole_open_clip_model_list():
    """Meta device: shapes only. Each model reports a layout or one known line, never a traceback."""
    runner, refused = CliRunner(), {}
    for name in open_clip.list_models():
        result = runner.invoke(main, ["plan", "--model", name, "--videos", "10", "--json"])
        assert result.exit_code in (0, 2), (name, result.exception)
        assert "Traceback" not in result.output, name
        if result.exit_code == 2:
            assert any(answer in result.output for answer in KNOWN_REFUSALS), (name, result.output)
            refused[name] = result.output
    assert len(refused) < len(open_clip.list_models()) / 4, sorted(refused)
