"""Frame sampling with PyAV against the decode-everything reference, and every kind of bad file."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BROKEN, make_dataset, make_video

from tvrerank.extract.frames import VideoDecodeError, decode_all_reference, sample_frames, sample_or_error, target_times


def test_target_times_are_segment_centres():
    np.testing.assert_allclose(target_times(0.0, 12.0, 4), [1.5, 4.5, 7.5, 10.5])
    np.testing.assert_allclose(target_times(2.0, 2.0, 2), [2.0, 2.0])


@pytest.mark.parametrize("seek_min_packets, resize", [(0, "torchvision"), (4, "torchvision"), (1000, "torchvision"),
                                                      (4, "libswscale")])  # always seek, the default, never seek
@pytest.mark.parametrize("gop", [5, 50])
def test_sampler_matches_decoding_everything(tmp_path, gop, seek_min_packets, resize, monkeypatch):
    from tvrerank.extract import frames

    monkeypatch.setattr(frames, "SEEK_MIN_PACKETS", seek_min_packets)
    path = make_video(tmp_path / "gop.mp4", num_frames=120, fps=24, keyframe_interval=gop)
    ours = sample_frames(path, num_frames=8, image_size=24, resize=resize)
    reference = decode_all_reference(path, num_frames=8, image_size=24, resize=resize)
    assert ours.num_valid == 8
    np.testing.assert_array_equal(ours.timestamps, reference.timestamps)
    np.testing.assert_array_equal(ours.frames, reference.frames)
    # frames are distinct and in time order
    assert np.all(np.diff(ours.timestamps) > 0)


def test_packets_between_and_decoding_threads():
    from tvrerank.extract.frames import PacketIndex, decoding_threads

    index = PacketIndex(start=0.0, end=1.0, keyframes=[0.0, 0.5], pts=np.arange(10) * 10, time_base=0.01)
    assert index.packets_between(-np.inf, 0.5) == 5  # packets at 0.0 .. 0.4
    assert index.packets_between(0.1, 0.5) == 3 and index.packets_between(0.4, 0.5) == 0
    unknown = PacketIndex(start=0.0, end=1.0, keyframes=[0.0], pts=np.zeros(0, np.int64), time_base=0.01)
    assert unknown.packets_between(0.0, 0.9) > 1000  # no pts: always seek, as before
    assert decoding_threads(320, 240) == 1 and decoding_threads(1280, 720) == 0 and decoding_threads(0, 0) == 0


def test_variable_frame_rate_uses_timestamps(tmp_path):
    times = [0, 0.1, 0.15, 0.2, 1.0, 1.1, 1.2, 1.3, 2.0, 2.05, 2.1, 2.2, 3.0, 3.5, 4.0, 4.5]
    path = make_video(tmp_path / "vfr.mp4", num_frames=len(times), frame_times=times)
    ours = sample_frames(path, num_frames=6, image_size=16)
    reference = decode_all_reference(path, num_frames=6, image_size=16)
    # the video spans [0, 4.5 + last duration); each target takes the last frame at or before it
    targets = target_times(0.0, ours.timestamps[-1] + 0.5, 6)
    assert all(stamp <= t + 1e-9 for stamp, t in zip(ours.timestamps, targets[: len(ours.timestamps)]))
    np.testing.assert_array_equal(ours.timestamps, reference.timestamps)
    np.testing.assert_array_equal(ours.frames, reference.frames)


def test_a_frame_on_screen_for_several_targets_is_taken_once_not_the_next_one(tmp_path):
    """Variable frame rate: several targets in a row see the frame shown from 0 s; the sampler once
    took the frame after it for the next one (at 4, 6, 8 and 10 targets here), a frame no target is on."""
    path = make_video(tmp_path / "gap.mp4", num_frames=4, frame_times=[0, 5.0, 5.05, 9.0])
    for num_frames in range(2, 11):
        ours = sample_frames(path, num_frames=num_frames, image_size=16)
        reference = decode_all_reference(path, num_frames=num_frames, image_size=16)
        np.testing.assert_array_equal(ours.timestamps, reference.timestamps)
        np.testing.assert_array_equal(ours.frames, reference.frames)


def test_two_frames_with_one_pts_give_the_later_one_as_decoding_everything_does(tmp_path):
    import av

    path = tmp_path / "dup.mkv"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mjpeg", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuvj420p"
        stream.time_base = __import__("fractions").Fraction(1, 1000)
        stamps = iter([0, 100, 200, 300, 500, 500, 600, 700, 800, 900])  # what the packets say
        for i in range(10):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), i * 25, np.uint8), format="rgb24")
            frame.pts, frame.time_base = i * 100, stream.time_base
            for packet in stream.encode(frame):
                packet.pts = packet.dts = next(stamps)
                container.mux(packet)
    ours = sample_frames(path, num_frames=8, image_size=16)
    reference = decode_all_reference(path, num_frames=8, image_size=16)
    np.testing.assert_array_equal(ours.timestamps, reference.timestamps)
    np.testing.assert_array_equal(ours.frames, reference.frames)


def test_short_video_is_padded_and_masked(tmp_path):
    sample = sample_frames(make_video(tmp_path / "short.mp4", num_frames=3), num_frames=12, image_size=16)
    assert sample.mask.tolist() == [True] * 3 + [False] * 9
    assert np.all(sample.frames[3:] == 0) and np.isnan(sample.timestamps[3:]).all()
    assert len(set(sample.timestamps[:3])) == 3


def test_one_frame_video_gives_one_valid_frame(tmp_path):
    sample = sample_frames(make_video(tmp_path / "one.mp4", num_frames=1), num_frames=4, image_size=16)
    assert sample.num_valid == 1 and sample.frames[0].any()


def test_odd_sizes_are_resized_and_cropped(tmp_path):
    path = make_video(tmp_path / "odd.mp4", num_frames=5, height=17, width=33, pix_fmt="yuv444p")
    sample = sample_frames(path, num_frames=2, image_size=20)
    assert sample.frames.shape == (2, 20, 20, 3) and sample.num_valid == 2


@pytest.mark.parametrize("kind, reason", [
    ("missing", "file not found"),
    ("empty", "empty file"),
    ("text", "not a readable video"),
    ("truncated", "not a readable video"),
    ("audio", "no video stream"),
])
def test_bad_files_give_a_reason(tmp_path, kind, reason):
    make_dataset(tmp_path, num_videos=1)
    path = tmp_path / "videos" / BROKEN[kind]
    with pytest.raises(VideoDecodeError, match=reason):
        sample_frames(path, num_frames=4, image_size=16)
    sample, error = sample_or_error(path, num_frames=4, image_size=16)
    assert sample is None and reason in error


@pytest.mark.parametrize("kind", ["png", "jpeg", "folder", "fifo"])
def test_a_still_image_or_a_non_file_named_mp4_is_failed_not_a_video(tmp_path, kind):
    """A picture renamed .mp4 would otherwise be a one-frame video; a FIFO would block the reader."""
    import os

    from PIL import Image

    path = tmp_path / "x.mp4"
    if kind in ("png", "jpeg"):
        Image.fromarray(np.full((32, 48, 3), 128, np.uint8)).save(path, format=kind.upper())
        reason = "a still image"
    elif kind == "folder":
        path.mkdir()
        reason = "not a regular file"
    else:
        os.mkfifo(path)
        reason = "not a regular file"
    sample, error = sample_or_error(path, num_frames=4, image_size=16)
    assert sample is None and reason in error, error
