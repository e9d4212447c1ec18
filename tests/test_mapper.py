"""The extraction's mapper (``PartEncoder``): every frame lands in its slot, parts come out in order across
queued batches, a batch starts as soon as its last frame arrives, and the device's time is summed."""

from __future__ import annotations

import numpy as np
from conftest import TINY_VIT

from tvrerank.extract.encoder import FrozenClipEncoder
from tvrerank.extract.frames import SampledFrames
from tvrerank.extract.mapper import PartEncoder, encode_part


def test_encode_part_puts_every_batch_in_its_slots():
    """Batches are queued one ahead of storing: every frame's embedding and tokens still land in its own
    (video, slot), padded and failed videos stay zero, as encoding each frame alone gives."""
    encoder = FrozenClipEncoder(model=str(TINY_VIT), pretrained=None, device="cpu")
    size, rng = encoder.config.image_size, np.random.default_rng(0)

    def sample(valid: int) -> SampledFrames:
        frames = np.zeros((4, size, size, 3), dtype=np.uint8)
        frames[:valid] = rng.integers(0, 256, (valid, size, size, 3), dtype=np.uint8)
        return SampledFrames(frames, np.arange(4) < valid, np.full(4, np.nan))

    decoded = [(sample(4), ""), (None, "broken"), (sample(3), ""), (sample(4), "")]
    part = encode_part(encoder, np.arange(4), decoded, np.arange(2), ["a box", "two boxes"], frames=4, batch_size=3)
    for video, (frames, _) in enumerate(decoded):
        for slot in range(4):
            emb, tokens = part.videos["frame_emb"][video, slot], part.videos["tokens"][video, slot]
            if frames is None or not frames.mask[slot]:
                assert not emb.any() and not tokens.any()
                continue
            alone_emb, alone_tokens = encoder.encode_frames(frames.frames[slot : slot + 1], dtype=np.float16)
            np.testing.assert_allclose(emb, alone_emb[0], atol=2e-3)
            np.testing.assert_allclose(tokens, alone_tokens[0], atol=2e-3)


def test_part_encoder_finishes_parts_in_order_across_queued_batches():
    """The next part's first batch is queued before the last part is finished: parts still come out in
    order, one each, equal to encoding each part alone, a part without frames included."""
    encoder = FrozenClipEncoder(model=str(TINY_VIT), pretrained=None, device="cpu")
    size, rng = encoder.config.image_size, np.random.default_rng(1)

    def sample() -> SampledFrames:
        return SampledFrames(rng.integers(0, 256, (4, size, size, 3), dtype=np.uint8), np.ones(4, bool),
                             np.zeros(4))

    parts = [([(sample(), ""), (sample(), "")], ["one", "two"]), ([(None, "broken")], ["three"]),
             ([(sample(), "")], ["four"])]
    encoding, out = PartEncoder(encoder, frames=4, batch_size=3), []
    for key, (decoded, texts) in enumerate(parts):
        finished = encoding.encode(key, np.arange(len(decoded)), decoded, np.arange(len(texts)), texts)
        assert key not in [k for k, _ in finished]  # its last batch is still queued (or waits for the one before)
        out += finished
    out += encoding.flush()
    assert [key for key, _ in out] == [0, 1, 2]
    for (_, part), (decoded, texts) in zip(out, parts):
        alone = encode_part(encoder, np.arange(len(decoded)), decoded, np.arange(len(texts)), texts, frames=4,
                            batch_size=3)
        for group in ("videos", "texts"):
            for name, array in getattr(alone, group).items():
                np.testing.assert_array_equal(getattr(part, group)[name], array, err_msg=name)


def test_a_batch_starts_as_soon_as_its_last_frame_arrives():
    """The encoder gets a part's first batch before the part's last video is decoded; batches are the
    same runs of frames as encoding the whole part at once (equal arrays)."""
    encoder = FrozenClipEncoder(model=str(TINY_VIT), pretrained=None, device="cpu")
    size, rng = encoder.config.image_size, np.random.default_rng(2)
    submitted = []
    submit = encoder.submit_frames
    encoder.submit_frames = lambda frames, **kwargs: submitted.append(len(frames)) or submit(frames, **kwargs)

    def sample(valid: int) -> SampledFrames:
        return SampledFrames(rng.integers(0, 256, (4, size, size, 3), dtype=np.uint8), np.arange(4) < valid,
                             np.zeros(4))

    decoded = [(sample(4), ""), (sample(2), ""), (None, "broken"), (sample(4), ""), (sample(3), "")]
    texts = ["one", "two"]
    encoding = PartEncoder(encoder, frames=4, batch_size=5)
    encoding.open(0, np.arange(5), np.arange(2), texts)
    after_each = []
    for frames, error in decoded:
        assert encoding.add(frames, error) == []
        after_each.append(list(submitted))
    assert after_each == [[], [5], [5], [5, 5], [5, 5]]  # 13 frames: batches of 5, 5 and, at close, 3
    (key, part), = encoding.close() + encoding.flush()
    assert submitted == [5, 5, 3] and key == 0
    # a part whose videos so far fill whole batches is still not finished before it is closed: a run that
    # fails while decoding it (the runner then flushes) must not write it
    unfinished = PartEncoder(encoder, frames=4, batch_size=4)
    unfinished.open(1, np.arange(2), np.arange(1), texts[:1])
    assert unfinished.add(*decoded[0]) == [] and unfinished.flush() == []
    submitted.clear()
    alone = encode_part(encoder, np.arange(5), decoded, np.arange(2), texts, frames=4, batch_size=5)
    for group in ("videos", "texts"):
        for name, array in getattr(alone, group).items():
            np.testing.assert_array_equal(getattr(part, group)[name], array, err_msg=name)


def test_the_device_time_of_stored_batches_is_summed():
    """``PartEncoder.device_seconds`` adds each stored batch's ``device_seconds()`` (CUDA events on a GPU);
    on the CPU there is none, and a run's summary says 0."""
    encoder = FrozenClipEncoder(model=str(TINY_VIT), pretrained=None, device="cpu")
    size, rng = encoder.config.image_size, np.random.default_rng(3)
    assert encoder.submit_frames(np.zeros((1, size, size, 3), np.uint8)).device_seconds() is None
    submit = encoder.submit_frames

    def timed_submit(frames, **kwargs):
        pending = submit(frames, **kwargs)
        pending.device_seconds = lambda: 0.25 * len(frames)  # as CUDA events would say
        return pending

    encoder.submit_frames = timed_submit
    decoded = [(SampledFrames(rng.integers(0, 256, (4, size, size, 3), dtype=np.uint8), np.arange(4) < valid,
                              np.zeros(4)), "") for valid in (4, 3)]
    encoding = PartEncoder(encoder, frames=4, batch_size=5)
    encoding.encode(0, np.arange(2), decoded, np.arange(1), ["one"])
    assert encoding.device_seconds == 0.25 * 5  # the second batch (2 frames) is still queued
    encoding.flush()
    assert encoding.device_seconds == 0.25 * 7

