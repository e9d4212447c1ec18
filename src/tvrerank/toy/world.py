"""The toy world: coloured shapes on a textured, noisy background, acting out 2–3 events in order.

A video is a ``Script``: a list of ``Event``s, each filling an equal share of the clip.

- ``appear``: an object fades in at a place and stays;
- ``move``: an object slides across the frame in a direction (left, right, up, down);
- ``corner``: a small object shows up in a corner.

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


@dataclass(frozen=True)
class Event:
    kind: str  # appear | move | corner
    colour: str
    shape: str
    where: str  # a place (appear), a direction (move) or a corner (corner)

    def key(self) -> tuple[str, str, str, str]:
        return (self.kind, self.colour, self.shape, self.where)


@dataclass(frozen=True)
class Script:
    events: tuple[Event, ...]
    background_seed: int = 0

    def key(self) -> tuple:
        """What the captions describe (the background is not part of it)."""
        return tuple(e.key() for e in self.events)


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


def render(script: Script, *, num_frames: int, size: int, noise: float = 6.0, seed: int = 0) -> np.ndarray:
    """(num_frames, size, size, 3) uint8 frames of a script; events share the clip equally."""
    rng = np.random.default_rng(seed)
    base = background(size, script.background_seed)
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    for f in range(num_frames):
        t = (f + 0.5) / num_frames * len(script.events)  # event index + progress
        image = base.copy()
        for i, event in enumerate(script.events):
            if t < i:
                break
            draw_event(image, event, min(1.0, t - i))
        frames[f] = _finish(image, rng, noise)
    return frames


def render_still(objects: list[tuple[Event, float]], *, size: int, seed: int, noise: float = 6.0) -> np.ndarray:
    """One (size, size, 3) uint8 frame with each (event, progress) drawn, as in a video frame."""
    image = background(size, seed)
    for event, progress in objects:
        draw_event(image, event, progress)
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


def captions_for(script: Script, count: int = 3) -> list[str]:
    """``count`` paraphrases describing the events in order."""
    captions = []
    for variant in range(count):
        first, then, last = _JOINS[variant % len(_JOINS)]
        parts = [event_phrase(e, variant) for e in script.events]
        text = first + parts[0]
        for i, part in enumerate(parts[1:], start=1):
            text += (last if i == len(parts) - 1 and len(parts) > 2 else then) + part
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
