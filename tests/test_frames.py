"""Frame sampling with PyAV against the decode-everything reference, and every kind of bad file."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BROKEN, make_dataset, make_video, set_display_rotation

from tvrerank.errors import InputError
from tvrerank.extract.frames import (
    RESIZE_METHODS,
    VideoDecodeError,
    center_crop,
    check_resize,
    decode_all_reference,
    resize_to_input,
    resized_size,
    sample_frames,
    sample_or_error,
    target_times,
)


def test_target_times_are_segment_centres():
    np.testing.assert_allclose(target_times(0.0, 12.0, 4), [1.5, 4.5, 7.5, 10.5])
    np.testing.assert_allclose(target_times(2.0, 2.0, 2), [2.0, 2.0])


def test_resize_keeps_aspect_and_crop_is_central():
    assert resized_size(640, 360, 224) == (398, 224)
    assert resized_size(17, 33, 32) == (32, 62)
    image = np.arange(6 * 8).reshape(6, 8, 1)
    np.testing.assert_array_equal(center_crop(image, 4)[:, :, 0], image[1:5, 2:6, 0])
    np.testing.assert_array_equal(center_crop(np.stack([image, image + 1]), 4)[1, :, :, 0], image[1:5, 2:6, 0] + 1)


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


def test_torchvision_resize_is_torchvisions_own_and_pils_to_one_grey_level(tmp_path):
    """The default method: libswscale's RGB of the decoded frame, then exactly torchvision's
    antialiased resize and a central crop; PIL's bicubic (open_clip's own preprocessing) within 1
    grey level but for a few values in ten thousand."""
    import av
    import torch
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2.functional import resize

    from tvrerank.toy.videos import write_video

    yy, xx = np.mgrid[0:72, 0:96]
    scene = np.stack([xx * 255 // 96, yy * 255 // 72, (xx + yy) * 128 // 168], -1).astype(np.uint8)
    scene[20:50, 30:60] = (230, 40, 10)  # a gradient and a red square: edges and smooth parts
    path = write_video(tmp_path / "v.mp4", [scene] * 6, fps=6)
    sample = sample_frames(path, num_frames=1, image_size=40)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frame = next(f for f in container.decode(stream) if f.time == sample.timestamps[0])
        rgb = frame.to_ndarray(format="rgb24")  # (72, 96, 3)
    for interpolation in ("bicubic", "bilinear", "nearest"):  # exactly torchvision's resize, down and up
        for size, width, left in ((40, 53, 6), (100, 133, 16)):
            ours = sample_frames(path, num_frames=1, image_size=size, interpolation=interpolation).frames[0]
            expected = resize(torch.from_numpy(rgb).permute(2, 0, 1), [size, width], antialias=True,
                              interpolation=InterpolationMode[interpolation.upper()])
            np.testing.assert_array_equal(ours, expected.permute(1, 2, 0).numpy()[:, left : left + size])

    def close_to_pil(ours, pil):
        differences = np.abs(pil.astype(int) - ours)
        return differences.mean() < 0.3 and (differences > 1).mean() < 1e-3 and differences.max() <= 4

    assert close_to_pil(sample.frames[0], np.asarray(Image.fromarray(rgb).resize((53, 40), Image.BICUBIC))[:, 6:46])
    large = sample_frames(path, num_frames=1, image_size=100)  # upscaling
    assert close_to_pil(large.frames[0], np.asarray(Image.fromarray(rgb).resize((133, 100), Image.BICUBIC))[:, 16:116])
    # libswscale's one-call method is not the same resize
    assert not np.array_equal(large.frames, sample_frames(path, num_frames=1, image_size=100,
                                                          resize="libswscale").frames)


@pytest.mark.parametrize("capability", ["AVX512", "DEFAULT"])  # torchvision resizes bilinear in float without AVX2
def test_the_resize_is_torchvisions_on_every_cpu(monkeypatch, capability):
    import torch
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2.functional import resize

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    images = [np.random.default_rng(1).integers(0, 256, (30, 50, 3), np.uint8)]
    for interpolation in ("bicubic", "bilinear", "nearest"):
        ours = resize_to_input(images, 20, interpolation)[0]
        theirs = resize(torch.from_numpy(images[0]).permute(2, 0, 1), [20], antialias=True,
                        interpolation=InterpolationMode[interpolation.upper()])
        np.testing.assert_array_equal(ours, theirs.permute(1, 2, 0).numpy()[:, 6:26])


def test_frames_of_several_sizes_are_each_resized_from_their_own_shape():
    """A stream whose resolution changes mid-way: each shape is its own resize call."""
    rng = np.random.default_rng(0)
    wide, tall = rng.integers(0, 256, (30, 50, 3), np.uint8), rng.integers(0, 256, (60, 40, 3), np.uint8)
    together = resize_to_input([wide, tall, wide], 20)
    np.testing.assert_array_equal(together[0], resize_to_input([wide], 20)[0])
    np.testing.assert_array_equal(together[1], resize_to_input([tall], 20)[0])
    np.testing.assert_array_equal(together[2], together[0])


@pytest.mark.parametrize("resize", list(RESIZE_METHODS))
def test_display_rotation_is_applied(tmp_path, resize):
    frames = []
    for _ in range(4):
        frame = np.zeros((32, 64, 3), np.uint8)
        frame[:, :32] = 255  # left half white
        frames.append(frame)
    from tvrerank.toy.videos import write_video

    path = write_video(tmp_path / "rot.mp4", frames, fps=4)
    upright = sample_frames(path, num_frames=1, image_size=32, resize=resize).frames[0].mean(-1)
    # the display matrix FFmpeg writes for "rotate 90 degrees clockwise" (phones shot portrait)
    set_display_rotation(path, (0, 0x10000, 0, -0x10000, 0, 0, 0, 0, 0x40000000))
    rotated = sample_frames(path, num_frames=1, image_size=32, resize=resize).frames[0].mean(-1)
    # unrotated: the 32 px crop of a 64x32 frame resized to 64x32 shows the boundary in the middle
    assert upright[:, :8].mean() > 200 and upright[:, -8:].mean() < 50
    # rotated clockwise the left half becomes the top half; the frame is now 32 wide, 64 tall
    assert rotated[:8].mean() > 200 and rotated[-8:].mean() < 50


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


@pytest.mark.parametrize("resize", list(RESIZE_METHODS))
def test_the_encoders_recorded_interpolation_is_the_one_used(tmp_path, resize):
    check_resize(resize, "Bicubic")
    check_resize(resize, "random")  # open_clip's "random" is bicubic at inference
    with pytest.raises(InputError, match="'hamming'"):
        check_resize(resize, "hamming")
    with pytest.raises(InputError, match="'hamming'"):
        sample_frames(tmp_path / "never-opened.mp4", num_frames=3, image_size=32, interpolation="hamming")
    with pytest.raises(InputError, match="'ffmpeg'.*supported: torchvision, libswscale"):
        check_resize("ffmpeg", "bicubic")
    video = make_video(tmp_path / "v.mp4", num_frames=12, height=60, width=84)
    bicubic = sample_frames(video, num_frames=3, image_size=32, interpolation="bicubic", resize=resize)
    bilinear = sample_frames(video, num_frames=3, image_size=32, interpolation="bilinear", resize=resize)
    random = sample_frames(video, num_frames=3, image_size=32, interpolation="random", resize=resize)
    assert not np.array_equal(bicubic.frames, bilinear.frames)  # the option reaches the resizer
    np.testing.assert_array_equal(random.frames, bicubic.frames)


@pytest.mark.parametrize("mode", ["shortest", "squash", "longest"])
@pytest.mark.parametrize("height, width, size", [(72, 96, 40), (57, 83, 30), (83, 57, 30), (40, 56, 64)])
def test_frames_are_open_clips_own_eval_preprocessing(tmp_path, mode, height, width, size):
    """open_clip's image_transform (PIL) on the decoded RGB frame, for each resize_mode, odd sizes and
    an upscale: same geometry, values within 1 grey level but for a few in ten thousand."""
    import av
    import open_clip
    from PIL import Image

    from tvrerank.toy.videos import write_video

    yy, xx = np.mgrid[0:height, 0:width]
    scene = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) * 128 // (width + height)], -1)
    scene = scene.astype(np.uint8)
    scene[height // 4 : height // 2, width // 3 : width // 2] = (230, 40, 10)
    path = write_video(tmp_path / "v.mp4", [scene] * 4, fps=4, pix_fmt="yuv444p")
    sample = sample_frames(path, num_frames=1, image_size=size, resize_mode=mode, fill=0)
    with av.open(str(path)) as container:
        rgb = next(f for f in container.decode(video=0) if f.time == sample.timestamps[0]).to_ndarray(format="rgb24")
    ours = sample.frames[0]
    transform = open_clip.transform.image_transform(size, is_train=False, mean=(0, 0, 0), std=(1, 1, 1),
                                                    resize_mode=mode, interpolation="bicubic", fill_color=0)
    theirs = (transform(Image.fromarray(rgb)).permute(1, 2, 0).numpy() * 255).round().astype(int)
    differences = np.abs(theirs - ours)
    assert differences.mean() < 0.3 and (differences > 1).mean() < 2e-3, (differences.max(), differences.mean())
    with pytest.raises(InputError, match="'squash'.*with libswscale"):
        check_resize("libswscale", "bicubic", "squash")


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
