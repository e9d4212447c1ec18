"""How a decoded frame becomes the encoder's input: torchvision's resize with open_clip's eval geometry
(checked against torchvision, PIL and open_clip's own transform), libswscale's one-call method, the
display rotation, and the refusal of what cannot be done."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_video, set_display_rotation

from tvrerank.errors import InputError
from tvrerank.extract.frames import sample_frames
from tvrerank.extract.preprocess import RESIZE_METHODS, center_crop, check_resize, resize_to_input, resized_size


def test_resize_keeps_aspect_and_crop_is_central():
    assert resized_size(640, 360, 224) == (398, 224)
    assert resized_size(17, 33, 32) == (32, 62)
    image = np.arange(6 * 8).reshape(6, 8, 1)
    np.testing.assert_array_equal(center_crop(image, 4)[:, :, 0], image[1:5, 2:6, 0])
    np.testing.assert_array_equal(center_crop(np.stack([image, image + 1]), 4)[1, :, :, 0], image[1:5, 2:6, 0] + 1)


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

