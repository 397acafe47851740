"""How far a generated video is from the dense one: PSNR, SSIM and cosine similarity.

All take 8-bit videos of one shape, (..., F, H, W, 3) uint8, and compare them as a whole.
"""

from __future__ import annotations

import math

import torch


def psnr(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """PSNR in dB of 8-bit videos; None when they are identical (infinite)."""
    mse = (a.double() - b.double()).pow(2).mean().item()
    return None if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, data
    range 255) over every frame and colour channel; windows are clipped at the frame border
    (zero padding, renormalised), so small frames keep their edges."""
    x = a.double().reshape(-1, *a.shape[-3:]).permute(0, 3, 1, 2).reshape(-1, 1, *a.shape[-3:-1])
    y = b.double().reshape(-1, *b.shape[-3:]).permute(0, 3, 1, 2).reshape(-1, 1, *b.shape[-3:-1])
    w = _gaussian_window()
    pad = w.shape[-1] // 2
    norm = torch.nn.functional.conv2d(torch.ones_like(x[:1]), w, padding=pad)

    def blur(t):
        return torch.nn.functional.conv2d(t, w, padding=pad) / norm

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.mean().item()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of the videos as vectors of pixel values in [-1, 1]."""
    x, y = a.double().flatten() / 127.5 - 1, b.double().flatten() / 127.5 - 1
    return (x @ y / (x.norm() * y.norm()).clamp_min(1e-12)).item()
