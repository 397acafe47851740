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


@dataclass(frozen=True)
class _Blob:
    """One frame's blob of one colour."""

    pixels: int
    box: float  # bounding-box area
    centre: tuple[float, float]  # (x, y)
    touches: bool  # reaches the frame border

    @property
    def fill(self) -> float:
        return self.pixels / self.box


def _frame_blobs(mask: torch.Tensor) -> list[_Blob | None]:
    """Per frame of `mask` (F, H, W), its pixels' summary, or None where there are none."""
    frames, height, width = mask.shape
    blobs = []
    for f in range(frames):
        ys, xs = torch.nonzero(mask[f], as_tuple=True)
        if not len(ys):
            blobs.append(None)
            continue
        box = float((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
        touches = bool(ys.min() == 0 or xs.min() == 0 or ys.max() == height - 1 or xs.max() == width - 1)
        blobs.append(_Blob(len(ys), box, (float(xs.float().mean()), float(ys.float().mean())), touches))
    return blobs


def _shape_of(blobs: list[_Blob | None]) -> str | None:
    """Shape from the median bounding-box fill over frames where the object is wholly inside."""
    inside = [b.fill for b in blobs if b and b.pixels >= 6 and not b.touches]
    cut = [b.fill for b in blobs if b and b.pixels >= 6 and b.touches]
    fills = inside or cut  # frames cut by the border only when there are no others
    if not fills:
        return None
    fill = float(torch.tensor(fills).median())
    return "square" if fill >= 0.88 else "circle" if fill >= 0.65 else "triangle"


def _direction_of(blobs: list[_Blob | None]) -> str | None:
    """Direction of the least-squares drift of the blob's centroid over the frames."""
    seen = [(float(f), b.centre) for f, b in enumerate(blobs) if b and b.pixels >= 4]
    if len(seen) < 2:
        return None
    t = torch.tensor([f for f, _ in seen])
    tt = t - t.mean()
    cx, cy = torch.tensor([c[0] for _, c in seen]), torch.tensor([c[1] for _, c in seen])
    vx = float((tt * cx).sum() / (tt**2).sum())
    vy = float((tt * cy).sum() / (tt**2).sum())
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
        blobs = _frame_blobs(_largest_blobs(saturated & (nearest == i)))
        if _is_object(blobs, x.shape[1] * x.shape[2] / 1024):
            objects[name] = (_shape_of(blobs), _direction_of(blobs))
    return Reading(objects, _background_of(x, saturation))


def _is_object(blobs: list[_Blob | None], area: float) -> bool:
    """A colour is an object when, in most frames, its largest blob is compact and of an
    object's size (in noise, blobs are small or thread-like and fill little of their box).
    `area`: frame pixels per pixel of a 32x32 frame."""
    good = sum(
        MIN_PIXELS * area <= b.pixels <= 250 * area and b.fill >= 0.35 and b.box <= 400 * area for b in blobs if b
    )
    return good * 2 >= len(blobs)


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
