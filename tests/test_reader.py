"""The extraction's reader (``DecodeQueue``): look-ahead handed to the workers, results in row order."""

from __future__ import annotations

from conftest import make_video

from tvrerank.extract.reader import DecodeQueue


def test_decode_queue_hands_out_look_ahead_videos_before_the_first_result(tmp_path):
    """The workers get ``look_ahead`` videos before the caller takes the first result, so they decode
    the next part while the caller encodes this one; results still come in order."""
    video = make_video(tmp_path / "v.mp4")
    drawn = []

    def items():
        for row in range(8):
            drawn.append(row)
            yield row, video

    queue = DecodeQueue(1)
    try:
        results = queue.run(items(), look_ahead=5, num_frames=2, image_size=32)
        first = next(results)
        assert len(drawn) == 5 and first[0] == 0 and first[1] is not None
        assert [row for row, _, _ in results] == list(range(1, 8))
    finally:
        queue.close()

