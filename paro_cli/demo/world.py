"""The procedural video world the embedded demo model is trained on, generated from a seed.

A scene is a grey background (plain, striped or checkered, at a random pair of grey levels)
with one or two objects (circle, square or triangle in one of five saturated colours; two
objects never share a colour) each moving left, right, up or down at a steady speed. Its
caption comes from a small grammar: "a red circle moving left on a striped background", or
"a red circle moving left and a blue square moving up on a plain background".

Backgrounds are grey and objects saturated on purpose: that is what lets the fidelity checker
(demo/fidelity.py) read a video back without knowing how it was made.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

SHAPES = ("circle", "square", "triangle")
COLOURS = {  # RGB in [0, 255]: far from grey and from each other
    "red": (225, 35, 35),
    "green": (35, 200, 50),
    "blue": (40, 70, 235),
    "yellow": (235, 215, 30),
    "magenta": (220, 40, 220),
}
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}  # (dx, dy), y down
BACKGROUNDS = ("plain", "striped", "checkered")
STRIPE = 4  # pixels per stripe / check at 32x32 (scaled with the frame height)


@dataclass(frozen=True)
class MovingObject:
    shape: str
    colour: str
    direction: str
    x: float  # centre at frame 0, pixels
    y: float
    size: float  # half-extent, pixels
    speed: float  # pixels per frame


@dataclass(frozen=True)
class Scene:
    background: str
    levels: tuple[int, int]  # the two grey levels of the pattern (equal for plain)
    objects: tuple[MovingObject, ...]

    @property
    def caption(self) -> str:
        parts = [f"a {o.colour} {o.shape} moving {o.direction}" for o in self.objects]
        return " and ".join(parts) + f" on a {self.background} background"


def sample_scene(rng: random.Random, frames: int, height: int, width: int) -> Scene:
    """One random scene whose objects stay inside the frame and apart from each other for all
    `frames` (so that each stays readable)."""
    background = rng.choice(BACKGROUNDS)
    low = rng.randint(30, 110)
    levels = (low, low) if background == "plain" else (low, min(low + rng.randint(35, 70), 170))
    colours = rng.sample(sorted(COLOURS), k=rng.choice((1, 2)))
    while True:
        objects = [_sample_object(rng, colour, frames, height, width) for colour in colours]
        if len(objects) == 1 or _apart(*objects, frames):
            return Scene(background, levels, tuple(objects))


def _sample_object(rng: random.Random, colour: str, frames: int, height: int, width: int) -> MovingObject:
    scale = height / 32
    direction = rng.choice(sorted(DIRECTIONS))
    dx, dy = DIRECTIONS[direction]
    size = rng.uniform(4.5, 6.0) * scale
    speed = rng.uniform(1.6, 2.4) * scale * 8 / frames  # a travel of 11-17 px over the clip at 32x32
    travel = speed * (frames - 1)

    def start(extent: float, d: float) -> float:  # the centre stays `size` inside the frame throughout
        lo, hi = size, extent - size
        if d > 0:
            hi -= travel
        elif d < 0:
            lo += travel
        return rng.uniform(lo, max(lo, hi))

    return MovingObject(rng.choice(SHAPES), colour, direction, start(width, dx), start(height, dy), size, speed)


def _apart(a: MovingObject, b: MovingObject, frames: int) -> bool:
    (ax, ay), (bx, by) = DIRECTIONS[a.direction], DIRECTIONS[b.direction]
    return all(
        math.hypot(a.x + ax * a.speed * t - b.x - bx * b.speed * t, a.y + ay * a.speed * t - b.y - by * b.speed * t)
        > 1.5 * (a.size + b.size)
        for t in range(frames)
    )


def sample_scenes(seed: int, count: int, frames: int, height: int, width: int) -> list[Scene]:
    rng = random.Random(seed)
    return [sample_scene(rng, frames, height, width) for _ in range(count)]


def _coverage(shape: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Anti-aliased coverage in [0, 1] of each pixel by a shape whose centre is (dx, dy) away:
    one pixel of soft edge around an approximate signed distance. `shape` indexes SHAPES; all
    arguments broadcast."""
    circle = torch.sqrt(dx**2 + dy**2) - size
    square = torch.maximum(dx.abs(), dy.abs()) - size * 0.9
    # triangle, apex up (y grows downwards): base at y = +0.8 size, apex at y = -1.2 size
    triangle = torch.maximum(dy - size * 0.8, (2 * dx.abs() - dy - size * 1.2) / math.hypot(2.0, 1.0))
    dist = torch.where(shape == 0, circle, torch.where(shape == 1, square, triangle))
    return (0.5 - dist).clamp(0.0, 1.0)


def render(
    scenes: list[Scene], frames: int, height: int, width: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(B, 3, F, H, W) float32 in [-1, 1]: what the demo model is trained to generate. One
    batched pass for all scenes (object slots without an object draw nothing)."""
    device = torch.device(device)
    f32 = dict(device=device, dtype=torch.float32)
    b = len(scenes)
    ys = torch.arange(height, **f32).view(1, 1, height, 1) + 0.5
    xs = torch.arange(width, **f32).view(1, 1, 1, width) + 0.5
    t = torch.arange(frames, **f32).view(1, frames, 1, 1)
    stripe = max(1, round(STRIPE * height / 32))
    rows = (ys // stripe) % 2
    checkered = torch.tensor([s.background == "checkered" for s in scenes], device=device).view(b, 1, 1, 1)
    pattern = torch.where(checkered, (rows + (xs // stripe)) % 2, rows)  # (B, 1, H, W)
    lo, hi = (torch.tensor([s.levels[i] for s in scenes], **f32).view(b, 1, 1, 1) for i in (0, 1))
    video = (lo + (hi - lo) * pattern).expand(b, frames, height, width).unsqueeze(1).repeat(1, 3, 1, 1, 1)
    slots = max(len(s.objects) for s in scenes)
    for k in range(slots):  # object k of every scene at once, drawn over what came before
        objs = [s.objects[k] if k < len(s.objects) else None for s in scenes]

        def value(fn, objs=objs):
            return torch.tensor([fn(o) if o else 0.0 for o in objs], **f32).view(b, 1, 1, 1)

        dx, dy = value(lambda o: DIRECTIONS[o.direction][0]), value(lambda o: DIRECTIONS[o.direction][1])
        speed, size = value(lambda o: o.speed), value(lambda o: o.size)
        cx, cy = value(lambda o: o.x) + dx * speed * t, value(lambda o: o.y) + dy * speed * t  # (B, F, 1, 1)
        present = value(lambda o: 1.0)  # 0 where a scene has no object k: it covers nothing
        alpha = _coverage(value(lambda o: SHAPES.index(o.shape)), xs - cx, ys - cy, size) * present
        colour = torch.tensor([COLOURS[o.colour] if o else (0, 0, 0) for o in objs], **f32).view(b, 3, 1, 1, 1)
        video = video * (1 - alpha.unsqueeze(1)) + colour * alpha.unsqueeze(1)
    return video / 127.5 - 1.0
