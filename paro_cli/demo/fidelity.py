"""Prompt fidelity: read a demo-world video back and score how well it matches its caption.

The world's backgrounds are grey and its objects saturated (demo/world.py), so:
- object pixels are the saturated ones, and their hue names their colour (mixing with grey, as
  anti-aliased edges and blurry generations do, keeps the hue); an object is the largest
  connected blob of its colour in each frame;
- an object's motion is the drift of its colour's centroid over the frames;
- its shape is how much of its bounding box it fills (square ~1, circle ~pi/4, triangle ~1/2);
- the background is read from the grey pixels: flat (plain), varying only from row to row
  (striped), or varying along rows too (checkered).

The score of one video is the share of the caption's facts it shows: the background, and per
object its colour, shape and direction; objects it shows that the caption does not name count
against it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .world import BACKGROUNDS, COLOURS, DIRECTIONS, SHAPES

SATURATED = 80.0  # max - min channel: palette colours have >= 180, greys 0
GREY = 30.0
MIN_PIXELS = 16.0  # fewest pixels of an object in one 32x32 frame (the smallest, a triangle, has ~40)
CAPTION = re.compile(
    rf"a ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) moving ({'|'.join(DIRECTIONS)})"
    rf"(?: and a ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) moving ({'|'.join(DIRECTIONS)}))?"
    rf" on a ({'|'.join(BACKGROUNDS)}) background"
)


@dataclass(frozen=True)
class Reading:
    """What a video shows: per colour seen, (shape, direction); and the background."""

    objects: dict[str, tuple[str, str]]
    background: str


def parse_caption(caption: str) -> tuple[list[tuple[str, str, str]], str]:
    """([(colour, shape, direction), ...], background) of a caption of the world's grammar."""
    m = CAPTION.fullmatch(caption.strip().lower())
    if not m:
        raise ValueError(f"not a caption of the demo world: {caption!r}")
    g = m.groups()
    objects = [g[0:3]] + ([g[3:6]] if g[3] else [])
    return [tuple(o) for o in objects], g[6]


def _hue(rgb: torch.Tensor) -> torch.Tensor:
    """Hue in degrees [0, 360) of (..., 3) float RGB."""
    r, g, b = rgb.unbind(-1)
    mx, mn = rgb.max(-1).values, rgb.min(-1).values
    c = (mx - mn).clamp_min(1e-6)
    h = torch.where(mx == r, ((g - b) / c) % 6, torch.where(mx == g, (b - r) / c + 2, (r - g) / c + 4))
    return h * 60.0


PALETTE_HUES = {name: float(_hue(torch.tensor(rgb, dtype=torch.float32))) for name, rgb in COLOURS.items()}


def _largest_blobs(mask: torch.Tensor) -> torch.Tensor:
    """Per frame, the largest 8-connected component of `mask` (F, H, W): stray pixels of a
    colour elsewhere in the frame do not belong to the object."""
    frames, height, width = mask.shape
    m = mask.float().unsqueeze(1)
    labels = torch.arange(1, height * width + 1, dtype=torch.float32).view(1, 1, height, width) * m
    while True:  # every pixel takes the largest label among its neighbours, inside the mask
        grown = torch.nn.functional.max_pool2d(labels, 3, stride=1, padding=1) * m
        if torch.equal(grown, labels):
            break
        labels = grown
    labels = labels[:, 0]
    out = torch.zeros_like(mask)
    for f in range(frames):
        values, counts = labels[f][labels[f] > 0].unique(return_counts=True)
        if len(values):
            out[f] = labels[f] == values[counts.argmax()]
    return out


def _shape_of(mask: torch.Tensor) -> str | None:
    """Shape from the median bounding-box fill over frames where the object is wholly inside."""
    inside, cut = [], []
    frames, height, width = mask.shape
    for f in range(frames):
        ys, xs = torch.nonzero(mask[f], as_tuple=True)
        if len(ys) < 6:
            continue
        fill = len(ys) / float((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
        touches = ys.min() == 0 or xs.min() == 0 or ys.max() == height - 1 or xs.max() == width - 1
        (cut if touches else inside).append(fill)
    fills = inside or cut  # frames cut by the border only when there are no others
    if not fills:
        return None
    fill = float(torch.tensor(fills).median())
    return "square" if fill >= 0.88 else "circle" if fill >= 0.65 else "triangle"


def _direction_of(mask: torch.Tensor) -> str | None:
    """Direction of the least-squares drift of the mask's centroid over the frames."""
    t, cx, cy = [], [], []
    for f in range(mask.shape[0]):
        ys, xs = torch.nonzero(mask[f], as_tuple=True)
        if len(ys) >= 4:
            t.append(float(f))
            cx.append(xs.float().mean())
            cy.append(ys.float().mean())
    if len(t) < 2:
        return None
    tt = torch.tensor(t) - sum(t) / len(t)
    vx = float((tt * torch.stack(cx)).sum() / (tt**2).sum())
    vy = float((tt * torch.stack(cy)).sum() / (tt**2).sum())
    if abs(vx) >= abs(vy):
        return "right" if vx > 0 else "left"
    return "down" if vy > 0 else "up"


def _background_of(video: torch.Tensor, saturation: torch.Tensor) -> str:
    """Plain, striped or checkered, from the grey pixels away from any object."""
    near_object = torch.nn.functional.max_pool2d((saturation > GREY).float(), 3, stride=1, padding=1) > 0
    luma = video.mean(-1)
    grey = ~near_object
    if grey.sum() < 16:
        return "plain"
    values = luma[grey]
    if float(values.std()) < 8.0:
        return "plain"
    # how much of the grey variation do rows explain? (striped: all of it; checkered: about half)
    counts = grey.sum(-1).clamp_min(1)
    row_means = (luma * grey).sum(-1) / counts
    residual = (luma - row_means.unsqueeze(-1))[grey]
    return "striped" if float(residual.var() / values.var()) < 0.25 else "checkered"


def read_video(video: torch.Tensor) -> Reading:
    """video: (F, H, W, 3) uint8."""
    x = video.float()
    saturation = x.max(-1).values - x.min(-1).values
    hue = _hue(x)
    names = list(PALETTE_HUES)
    hues = torch.tensor([PALETTE_HUES[n] for n in names])
    distance = (hue.unsqueeze(-1) - hues).abs()
    nearest = torch.minimum(distance, 360 - distance).argmin(-1)
    saturated = saturation > SATURATED
    objects = {}
    for i, name in enumerate(names):
        blobs = _largest_blobs(saturated & (nearest == i))
        if _is_object(blobs):
            objects[name] = (_shape_of(blobs), _direction_of(blobs))
    return Reading(objects, _background_of(x, saturation))


def _is_object(mask: torch.Tensor) -> bool:
    """A colour is an object when, in most frames, its largest blob is compact and of an
    object's size (in noise, blobs are small or thread-like and fill little of their box)."""
    frames, height, width = mask.shape
    area = height * width / 1024  # pixels per 32x32-frame pixel
    good = 0
    for f in range(frames):
        ys, xs = torch.nonzero(mask[f], as_tuple=True)
        if not MIN_PIXELS * area <= len(ys) <= 250 * area:
            continue
        box = float((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
        good += len(ys) / box >= 0.35 and box <= 400 * area
    return good * 2 >= frames


def fidelity(video: torch.Tensor, caption: str) -> float:
    """Share of the caption's facts the video shows, in [0, 1]; an object the caption does not
    mention counts as one more fact missed."""
    expected, background = parse_caption(caption)
    reading = read_video(video)
    points = float(reading.background == background)
    for colour, shape, direction in expected:
        seen = reading.objects.get(colour)
        if seen is not None:
            points += 1 + (seen[0] == shape) + (seen[1] == direction)
    extra = len(set(reading.objects) - {colour for colour, _, _ in expected})
    return points / (1 + 3 * len(expected) + extra)
