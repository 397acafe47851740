"""PNG heat maps of one head's attention before and after reordering, kept blocks outlined.

The map is softmax(Q K^T / sqrt(d)) of the chosen layer and head at one denoising step (the
conditional branch of the first prompt), captured from a dense run. "Before" shows it in
arrival order; "after" in the head's order from the plan, with the plan's kept blocks for that
step drawn over it: reordering should gather the mass into the outlined blocks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from paro_kernels.layout import block_mask_rows
from paro_kernels.orders import order_permutation

from ..errors import ParoError
from ..fileio import atomic_path, check_output_file
from ..intercept import DenseFn, routed
from ..plan import Plan
from ..runner import sample
from ..steps import StepTracker

# anchors of a dark-to-bright colour map (black, purple, orange, pale yellow)
_ANCHORS = np.array([[0, 0, 0], [90, 20, 120], [230, 110, 30], [255, 250, 200]], dtype=np.float64)
OUTLINE = (80, 220, 255)


class _QKCapture:
    """Handler that records (q, k) of one layer at one denoising step, attention untouched."""

    def __init__(self, layer: int, step: int):
        self.layer, self.step = layer, step
        self.tracker = StepTracker()
        self.current = -1
        self.qk: tuple[torch.Tensor, torch.Tensor] | None = None

    def on_forward(self, grid, layout, t):
        self.current = self.tracker.see(grid, layout, t)

    def attention(self, layer: int, q, k, v, dense: DenseFn, layout):
        if layer == self.layer and self.current == self.step and self.qk is None:
            self.qk = (q[-1].detach().float().cpu(), k[-1].detach().float().cpu())  # last batch row: conditional branch
            self.layout = layout
        return dense()


def _colour(values: np.ndarray) -> np.ndarray:
    x = np.clip(values, 0, 1) * (len(_ANCHORS) - 1)
    i = np.minimum(x.astype(int), len(_ANCHORS) - 2)
    f = (x - i)[..., None]
    return (_ANCHORS[i] * (1 - f) + _ANCHORS[i + 1] * f).astype(np.uint8)


def _image(attn: torch.Tensor, kept: torch.Tensor | None, block: int, size: int = 512) -> np.ndarray:
    """(N, N) probabilities -> RGB, log scale over 4 decades, pooled to <= size pixels."""
    n = attn.shape[0]
    factor = max(1, -(-n // size))
    pooled = torch.nn.functional.avg_pool2d(attn[None, None], factor, ceil_mode=True)[0, 0]
    logv = torch.log10(pooled.clamp_min(1e-12))
    top = float(logv.max())
    img = _colour(((logv - (top - 4)) / 4).numpy())
    if kept is not None:  # outline each kept block
        step = block / factor
        for i, j in kept.nonzero().tolist():
            r0, c0 = int(i * step), int(j * step)
            r1, c1 = min(int((i + 1) * step), img.shape[0]) - 1, min(int((j + 1) * step), img.shape[1]) - 1
            img[r0, c0 : c1 + 1] = img[r1, c0 : c1 + 1] = OUTLINE
            img[r0 : r1 + 1, c0] = img[r0 : r1 + 1, c1] = OUTLINE
    return img


def check_layer_and_head(layer: int, head: int, layers: int, heads: int) -> None:
    if not 0 <= layer < layers or not 0 <= head < heads:
        raise ParoError(
            f"--layer {layer} / --head {head} is outside the model's {layers} layers x {heads} heads",
            f"choose --layer 0..{layers - 1} and --head 0..{heads - 1}",
        )


def write_heatmaps(
    loaded, recipe, plan: Plan, prompt: str, seed: int, layer: int, head: int, out_dir: Path, on_step=lambda i: None
) -> dict:
    """Capture the attention at the middle step and write before.png / after.png into out_dir;
    `on_step(i)` follows the capturing run's steps."""
    import imageio.v3 as iio

    comp = plan.components["transformer"]
    check_layer_and_head(layer, head, comp.num_layers, comp.num_heads)
    step = recipe.sampling.steps // 2
    capture = _QKCapture(layer, step)
    with routed(
        loaded.components, loaded.adapter, dict.fromkeys(loaded.components, capture)
    ):  # whichever expert runs the step
        sample(
            loaded, recipe, [prompt], [seed], on_step=lambda i: capture.tracker.step_done() or on_step(i), decode=False
        )
    t = capture.tracker.timesteps[step]
    ran = loaded.transformer_at(t * loaded.adapter.num_train_timesteps)
    comp = plan.components[next(name for name, tr in loaded.components.items() if tr is ran)]
    layout = capture.layout
    q, k = (layout.split(x, dim=0)[1] for x in capture.qk)  # visual tokens only: the plan orders those
    attn = torch.softmax(q[:, head] @ k[:, head].T / q.shape[-1] ** 0.5, dim=-1)
    order = comp.orders[layer][head]
    perm = order_permutation(order, plan.grid)
    kept = comp.slot_masks(plan.slot_of(t))[layer, head]
    out_dir.mkdir(parents=True, exist_ok=True)
    before, after = (
        out_dir / f"attention_l{layer}_h{head}_before.png",
        out_dir / f"attention_l{layer}_h{head}_after.png",
    )
    reordered, n = attn[perm][:, perm], attn.shape[0]
    for path, img in ((before, _image(attn, None, plan.block_size)), (after, _image(reordered, kept, plan.block_size))):
        with atomic_path(check_output_file(path)) as tmp:
            iio.imwrite(tmp, img, extension=".png")
    return {
        "layer": layer,
        "head": head,
        "step": step,
        "order": order,
        "before": str(before),
        "after": str(after),
        "kept_mass": float((reordered * block_mask_rows(kept[None], plan.block_size, n, 0, n)[0]).sum() / n),
    }
