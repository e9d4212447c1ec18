"""The toy world: coloured shapes on a textured, noisy background, acting out 2–3 events in order.

A video is a ``Script``: a list of ``Event``s, each filling an equal share of the clip.

- ``appear``: an object fades in at a place and stays;
- ``move``: an object slides across the frame in a direction (left, right, up, down);
- ``corner``: a small object shows up in a corner.

The *detail* world (``toy make --world detail``) adds to each script one ``Detail``: a small glyph
(a colour and a shape of ``DETAIL_SHAPES``, one or two patches of the toy encoder's grid) near an
edge of the frame, visible in only part of the clip. Captions name it; the toy encoder for that
world is pretrained with captions that never do (``toy/pretrain.py``), as web captions rarely name
small details, so its frame embeddings do not carry it while its patch tokens do.

Objects that appeared or moved stay on screen afterwards (at their end position), so two
scripts that differ only in the order of their events, or in a direction, end in similar
frames: a mean-pooled embedding struggles to tell them apart, and a model that looks at
frames in order can. Captions describe the events in order with several paraphrases.

Everything here is pure: ``render`` returns arrays, ``captions_for`` returns strings.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 200),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
PLACES = {"top left": (0.28, 0.28), "top right": (0.72, 0.28), "bottom left": (0.28, 0.72),
          "bottom right": (0.72, 0.72), "centre": (0.5, 0.5)}
CORNERS = ("top left", "top right", "bottom left", "bottom right")
KINDS = ("appear", "move", "corner")
WORLDS = ("events", "detail")
DETAIL_SHAPES = ("cross", "ring", "bar")
DETAIL_EDGES = ("top", "bottom", "left", "right")
#: positions along an edge, in half cells: even slots centre the glyph on a cell (one patch), odd slots
#: on the border of two neighbouring cells (two patches); cells 2..5 of the edge's row or column
DETAIL_SLOTS = 7
DETAIL_RADIUS = 0.047  # half the glyph's width, as a fraction of the frame (a cell is 1/8 = 0.125)
#: the toy encoder's patch grid (64-pixel input, 8-pixel patches: extract/model_configs/tvr-toy.json)
TOY_GRID = (8, 8)


@dataclass(frozen=True)
class Event:
    kind: str  # appear | move | corner
    colour: str
    shape: str
    where: str  # a place (appear), a direction (move) or a corner (corner)

    def key(self) -> tuple[str, str, str, str]:
        return (self.kind, self.colour, self.shape, self.where)


@dataclass(frozen=True)
class Detail:
    """A small glyph near an edge, on screen from ``start`` to ``end`` (fractions of the clip)."""

    colour: str
    shape: str  # one of DETAIL_SHAPES
    edge: str  # one of DETAIL_EDGES
    slot: int  # 0..DETAIL_SLOTS-1 along the edge (even: one patch, odd: two)
    start: float
    end: float

    def key(self) -> tuple[str, str, str]:
        """What captions say of it: colour, shape and edge (not the exact slot, not when it shows)."""
        return (self.colour, self.shape, self.edge)

    def centre(self) -> tuple[float, float]:
        """(x, y) of the glyph's centre as fractions of the frame."""
        rows, cols = TOY_GRID
        along = 2.5 + self.slot / 2  # in cells
        if self.edge in ("top", "bottom"):
            return along / cols, (0.5 if self.edge == "top" else rows - 0.5) / rows
        return (0.5 if self.edge == "left" else cols - 0.5) / cols, along / rows

    def visible_at(self, position: float) -> bool:
        """Whether the glyph is on screen at ``position`` in [0, 1) of the clip."""
        return self.start <= position < self.end


@dataclass(frozen=True)
class Script:
    events: tuple[Event, ...]
    background_seed: int = 0
    detail: Detail | None = None

    def key(self) -> tuple:
        """What the captions describe (the background is not part of it)."""
        events = tuple(e.key() for e in self.events)
        return events if self.detail is None else events + (("detail",) + self.detail.key(),)


# --------------------------------------------------------------------------- drawing
def shape_mask(shape: str, size: int, cx: float, cy: float, radius: float) -> np.ndarray:
    """(size, size) bool mask of a shape centred at pixel (cx, cy)."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= radius * radius
    if shape == "square":
        half = radius * 0.88
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "triangle":  # pointing up
        return (dy <= radius * 0.8) & (dy >= -radius) & (np.abs(dx) <= (dy + radius) * 0.62)
    raise ValueError(f"unknown shape {shape!r}")


def detail_mask(shape: str, size: int, cx: float, cy: float, radius: float) -> np.ndarray:
    """(size, size) bool mask of a detail glyph centred at pixel (cx, cy), ``radius`` its half width."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    dx, dy = np.abs(xx - cx), np.abs(yy - cy)
    inside = (dx <= radius) & (dy <= radius)
    if shape == "cross":
        return inside & ((dx <= radius * 0.3) | (dy <= radius * 0.3))
    if shape == "ring":
        distance = np.sqrt(dx * dx + dy * dy)
        return (distance <= radius) & (distance >= radius * 0.5)
    if shape == "bar":
        return inside & (dy <= radius * 0.35)
    raise ValueError(f"unknown detail shape {shape!r}")


def detail_pixels(detail: Detail, size: int) -> np.ndarray:
    """(size, size) bool: the pixels of the glyph in a ``size``-pixel frame."""
    x, y = detail.centre()
    return detail_mask(detail.shape, size, x * size, y * size, DETAIL_RADIUS * size)


def patch_mask(pixels: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(S, S) bool pixels → (H, W) bool: the cells of an (H, W) patch grid over the frame that hold any."""
    size = pixels.shape[0]
    rows, cols = np.nonzero(pixels)
    cells = np.zeros(grid, dtype=bool)
    cells[(rows * grid[0]) // size, (cols * grid[1]) // size] = True
    return cells


def pooled_patch_mask(cells: np.ndarray, pool: str) -> np.ndarray:
    """(H, W) bool cells → the cells of the grid ``cache.encoding.pool_grid`` leaves (``2x2``: a pooled
    cell holds the detail when any of the cells it averages does; partial windows at odd edges)."""
    if pool == "none":
        return cells
    if pool != "2x2":
        raise ValueError(f"unknown pool {pool!r}")
    h, w = cells.shape
    padded = np.zeros((h + h % 2, w + w % 2), dtype=bool)
    padded[:h, :w] = cells
    return padded.reshape(padded.shape[0] // 2, 2, padded.shape[1] // 2, 2).any(axis=(1, 3))


def detail_patches(detail: Detail, grid: tuple[int, int] = TOY_GRID, *, size: int = 96, pool: str = "none") -> list[int]:
    """Row-major indices of the patches the glyph covers on the encoder's ``grid`` (pooled by ``pool``),
    drawn at ``size`` pixels as the videos are."""
    return [int(i) for i in np.flatnonzero(pooled_patch_mask(patch_mask(detail_pixels(detail, size), grid), pool))]


def frame_position(frame: int, num_frames: int) -> float:
    """Where frame ``frame`` of ``num_frames`` lies in the clip, in [0, 1) (its centre)."""
    return (frame + 0.5) / num_frames


def detail_frames(script: Script, num_frames: int) -> list[int]:
    """The rendered frames (of ``num_frames``) that show the script's detail; [] without one."""
    if script.detail is None:
        return []
    return [f for f in range(num_frames) if script.detail.visible_at(frame_position(f, num_frames))]


def background(size: int, seed: int) -> np.ndarray:
    """A textured, noisy background: a soft colour gradient with low-contrast blotches."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = rng.uniform(60, 120, 3)
    tilt = rng.uniform(-30, 30, (2, 3))
    image = base + xx[..., None] * tilt[0] + yy[..., None] * tilt[1]
    coarse = rng.normal(0, 10, (size // 8 + 1, size // 8 + 1, 3)).repeat(8, 0).repeat(8, 1)[:size, :size]
    return np.clip(image + coarse, 0, 255)


def _paint(image: np.ndarray, mask: np.ndarray, colour: str, alpha: float = 1.0) -> None:
    image[mask] = (1 - alpha) * image[mask] + alpha * np.asarray(COLOURS[colour], dtype=np.float64)


def _positions(event: Event, progress: float) -> tuple[tuple[float, float], float, float]:
    """(centre in [0,1]², radius as a fraction of the frame, opacity) of an event at progress in [0, 1]."""
    if event.kind == "appear":
        return PLACES[event.where], 0.14, min(1.0, progress * 3)
    if event.kind == "corner":
        x, y = PLACES[event.where]
        return ((x - 0.5) * 1.45 + 0.5, (y - 0.5) * 1.45 + 0.5), 0.065, min(1.0, progress * 3)
    dx, dy = DIRECTIONS[event.where]
    start = 0.5 - 0.3 * dx, 0.5 - 0.3 * dy
    return (start[0] + 0.6 * dx * progress, start[1] + 0.6 * dy * progress), 0.13, 1.0


def draw_event(image: np.ndarray, event: Event, progress: float) -> None:
    """Paint one event's object onto an (S, S, 3) float image at ``progress`` in [0, 1]."""
    size = image.shape[0]
    (x, y), radius, alpha = _positions(event, progress)
    _paint(image, shape_mask(event.shape, size, x * size, y * size, radius * size), event.colour, alpha)


def _finish(image: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    return np.clip(image + rng.normal(0, noise, image.shape), 0, 255).astype(np.uint8)


def draw_detail(image: np.ndarray, detail: Detail) -> None:
    """Paint a detail glyph onto an (S, S, 3) float image (over everything else)."""
    _paint(image, detail_pixels(detail, image.shape[0]), detail.colour)


def render(script: Script, *, num_frames: int, size: int, noise: float = 6.0, seed: int = 0) -> np.ndarray:
    """(num_frames, size, size, 3) uint8 frames of a script; events share the clip equally; the detail
    (if any) shows in ``detail_frames``."""
    rng = np.random.default_rng(seed)
    base = background(size, script.background_seed)
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    showing = set(detail_frames(script, num_frames))
    for f in range(num_frames):
        t = frame_position(f, num_frames) * len(script.events)  # event index + progress
        image = base.copy()
        for i, event in enumerate(script.events):
            if t < i:
                break
            draw_event(image, event, min(1.0, t - i))
        if f in showing:
            draw_detail(image, script.detail)
        frames[f] = _finish(image, rng, noise)
    return frames


def render_still(objects: list[tuple[Event, float]], *, size: int, seed: int, noise: float = 6.0,
                 detail: Detail | None = None) -> np.ndarray:
    """One (size, size, 3) uint8 frame with each (event, progress) drawn, as in a video frame, and
    ``detail`` over them."""
    image = background(size, seed)
    for event, progress in objects:
        draw_event(image, event, progress)
    if detail is not None:
        draw_detail(image, detail)
    return _finish(image, np.random.default_rng(seed), noise)


# --------------------------------------------------------------------------- language
_PHRASES = {
    "appear": ["a {c} {s} appears in the {w}", "a {c} {s} shows up in the {w}", "a {c} {s} pops up at the {w}"],
    "move": ["a {c} {s} moves {w}", "a {c} {s} slides {w}", "a {c} {s} goes {w}"],
    "corner": ["a small {c} {s} appears in the {w} corner", "a tiny {c} {s} shows up in the {w} corner",
               "a little {c} {s} pops up in the {w} corner"],
}
_JOINS = [("", ", then ", ", then "), ("first ", ", afterwards ", ", and finally "),
          ("", " and then ", " and after that ")]


def event_phrase(event: Event, variant: int) -> str:
    where = {"left": "to the left", "right": "to the right"}.get(event.where, event.where)
    if variant == 0 or event.kind != "move":
        where = event.where
    phrases = _PHRASES[event.kind]
    return phrases[variant % len(phrases)].format(c=event.colour, s=event.shape, w=where)


_DETAIL_PHRASES = [", and a small {c} {s} flashes near the {w}", ", while a tiny {c} {s} blinks near the {w}",
                   "; briefly a little {c} {s} shows near the {w}"]
_EDGE_WORDS = {"top": "top", "bottom": "bottom", "left": "left", "right": "right"}  # short: captions fit 48 tokens


def detail_phrase(detail: Detail, variant: int) -> str:
    """The clause naming a detail, appended to the events' description."""
    return _DETAIL_PHRASES[variant % len(_DETAIL_PHRASES)].format(c=detail.colour, s=detail.shape,
                                                                   w=_EDGE_WORDS[detail.edge])


def captions_for(script: Script, count: int = 3) -> list[str]:
    """``count`` paraphrases describing the events in order (and then the detail, if any)."""
    captions = []
    for variant in range(count):
        first, then, last = _JOINS[variant % len(_JOINS)]
        parts = [event_phrase(e, variant) for e in script.events]
        text = first + parts[0]
        for i, part in enumerate(parts[1:], start=1):
            text += (last if i == len(parts) - 1 and len(parts) > 2 else then) + part
        if script.detail is not None:
            text += detail_phrase(script.detail, variant)
        captions.append(text)
    return captions


def frame_caption(event: Event, rng: random.Random) -> str:
    """A frame-level caption (colour, shape, position, size) for encoder pretraining."""
    size = "small " if event.kind == "corner" else rng.choice(["", "big ", "large "])
    if event.kind == "move":
        return f"a {size}{event.colour} {event.shape}"
    where = f"{event.where} corner" if event.kind == "corner" else event.where
    return f"a {size}{event.colour} {event.shape} in the {where}"


# --------------------------------------------------------------------------- scripts
def random_event(rng: random.Random, kind: str | None = None, used: set | None = None) -> Event:
    kind = kind or rng.choice(KINDS)
    while True:
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        if used is None or (colour, shape) not in used:
            break
    where = {"appear": lambda: rng.choice(list(PLACES)), "move": lambda: rng.choice(list(DIRECTIONS)),
             "corner": lambda: rng.choice(CORNERS)}[kind]()
    return Event(kind, colour, shape, where)


def random_script(rng: random.Random, *, min_events: int = 2, max_events: int = 3) -> Script:
    """2–3 events with distinct (colour, shape) objects; at most one corner event."""
    count = rng.randint(min_events, max_events)
    events, used = [], set()
    for _ in range(count):
        kind = rng.choice([k for k in KINDS if k != "corner" or all(e.kind != "corner" for e in events)])
        event = random_event(rng, kind, used)
        used.add((event.colour, event.shape))
        events.append(event)
    return Script(tuple(events), background_seed=rng.randrange(1 << 30))


def random_detail(rng: random.Random, *, segments: int = 12, edge: str | None = None, slot: int | None = None,
                  used: set | None = None) -> Detail:
    """A glyph of a random colour and shape (not in ``used``) at ``edge``/``slot`` (random when None),
    on screen for 2–5 of ``segments`` equal segments of the clip in a row."""
    while True:
        colour, shape = rng.choice(list(COLOURS)), rng.choice(DETAIL_SHAPES)
        if used is None or (colour, shape) not in used:
            break
    edge = rng.choice(DETAIL_EDGES) if edge is None else edge
    slot = rng.randrange(DETAIL_SLOTS) if slot is None else slot
    count = rng.randint(min(2, segments), min(5, segments))
    first = rng.randrange(segments - count + 1)
    return Detail(colour, shape, edge, slot, first / segments, (first + count) / segments)


def random_detail_script(rng: random.Random, *, segments: int = 12) -> Script:
    """``random_script`` with a detail."""
    script = random_script(rng)
    return Script(script.events, script.background_seed, random_detail(rng, segments=segments))


def detail_confusers(script: Script, rng: random.Random, size: int = 4, *, segments: int = 12) -> list[Script]:
    """``script`` plus variants that differ ONLY in the detail: the same events, the glyph at the same
    place in another colour and shape (each shown at its own time), another background."""
    group, used = [script], {(script.detail.colour, script.detail.shape)}
    while len(group) < size:
        detail = random_detail(rng, segments=segments, edge=script.detail.edge, slot=script.detail.slot, used=used)
        used.add((detail.colour, detail.shape))
        group.append(Script(script.events, rng.randrange(1 << 30), detail))
    return group


_OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def confusers(script: Script, rng: random.Random, size: int = 4) -> list[Script]:
    """``script`` plus variants with the same objects that differ in order, direction or a small detail."""
    group, seen = [script], {script.key()}
    events = list(script.events)

    def variants():
        yield tuple(reversed(events))  # order
        for i in range(len(events)):  # order: swap neighbours
            for j in range(i + 1, len(events)):
                swapped = events.copy()
                swapped[i], swapped[j] = swapped[j], swapped[i]
                yield tuple(swapped)
        for i, e in enumerate(events):  # direction / place / corner detail
            if e.kind == "move":
                alt = Event(e.kind, e.colour, e.shape, _OPPOSITE[e.where])
            elif e.kind == "corner":
                alt = Event(e.kind, e.colour, e.shape, rng.choice([c for c in CORNERS if c != e.where]))
            else:
                alt = Event(e.kind, e.colour, e.shape, rng.choice([p for p in PLACES if p != e.where]))
            yield tuple(events[:i] + [alt] + events[i + 1:])

    for candidate in variants():
        variant = Script(candidate, background_seed=rng.randrange(1 << 30))
        if variant.key() not in seen:
            group.append(variant)
            seen.add(variant.key())
        if len(group) == size:
            break
    return group
