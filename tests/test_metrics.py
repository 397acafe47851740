"""Video metrics against independent references (a per-pixel SSIM loop, closed forms)."""

import math

import torch

from paro_cli.bench.metrics import cosine, psnr, ssim


def naive_ssim(a, b, size=11, sigma=1.5):
    """Per pixel, per frame and channel: Gaussian-weighted statistics over the window clipped to
    the frame, weights renormalised; the mean of the SSIM map."""
    a, b = a.double(), b.double()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    half = size // 2
    values = []
    for f in range(a.shape[0]):
        for c in range(3):
            x, y = a[f, :, :, c], b[f, :, :, c]
            for i in range(x.shape[0]):
                for j in range(x.shape[1]):
                    r0, r1, c0, c1_ = (
                        max(0, i - half),
                        min(x.shape[0], i + half + 1),
                        max(0, j - half),
                        min(x.shape[1], j + half + 1),
                    )
                    ii, jj = torch.meshgrid(torch.arange(r0, r1), torch.arange(c0, c1_), indexing="ij")
                    w = torch.exp(-((ii - i) ** 2 + (jj - j) ** 2) / (2 * sigma**2)).double()
                    w = w / w.sum()
                    px, py = x[r0:r1, c0:c1_], y[r0:r1, c0:c1_]
                    mx, my = (w * px).sum(), (w * py).sum()
                    vx, vy = (w * px * px).sum() - mx**2, (w * py * py).sum() - my**2
                    cxy = (w * px * py).sum() - mx * my
                    values.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return torch.stack(values).mean().item()


def test_ssim_matches_a_per_pixel_loop():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (2, 9, 13, 3), generator=g, dtype=torch.uint8)
    b = (a.int() + torch.randint(-40, 41, a.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    assert abs(ssim(a, b) - naive_ssim(a, b)) < 1e-9
    assert ssim(a, a) == 1.0


def test_psnr_and_cosine_closed_forms():
    a = torch.full((2, 4, 4, 3), 100, dtype=torch.uint8)
    assert abs(psnr(a, a + 1) - 10 * math.log10(255**2)) < 1e-9  # MSE 1
    assert psnr(a, a) is None
    x = torch.randint(0, 256, (2, 4, 4, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    assert abs(cosine(x, x) - 1) < 1e-12 and abs(cosine(x, 255 - x) + 1) < 1e-12  # 255 - x mirrors around 127.5
