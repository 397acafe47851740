"""Kernel benchmark: paro's Triton attention against SDPA (flash, cuDNN) and FlexAttention with the
same block mask, at real models' attention shapes, all timed in one run on one device.

Times are medians of `triton.testing.do_bench`, taken `repeats` times in interleaved rounds
(every variant of a shape once per round) and reduced to their median: a shared GPU's clock or
load drifts during a run, and one-shot timings of the same call spread (BENCHMARKS.md).
"Effective TFLOPs" counts dense FLOPs (4 B H S^2 D), so for a sparse kernel it is a speed
figure, comparable across rows. Baselines run on the same tensors with no reordering at all
(they pay no permutation), and Flex gets the same kept tiles as paro, its BlockMask built
outside the timed call. A baseline that cannot run here is reported as skipped with the reason,
never dropped.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from statistics import median

import torch

from paro_kernels.layout import SequenceLayout, kept_block_lists, num_blocks
from paro_kernels.orders import candidate_orders, head_permutations

from ..errors import ParoError
from ..masks import random_kept


@dataclass(frozen=True)
class AttentionShape:
    name: str
    batch: int
    heads: int
    grid: tuple[int, int, int]
    head_dim: int
    text_len: int = 0
    text_first: bool = True

    @property
    def seq(self) -> int:
        return math.prod(self.grid) + self.text_len

    def label(self) -> str:
        text = f" + {self.text_len} text" if self.text_len else ""
        return f"{self.name} (B{self.batch} H{self.heads} {'x'.join(map(str, self.grid))}{text} D{self.head_dim})"


# Real models' self-attention calls at their recipes' geometry (batch 2 = classifier-free guidance).
SHAPES = {
    "cogvideox-5b": AttentionShape("cogvideox-5b", 2, 48, (13, 30, 45), 64, 226),
    "wan2.1-1.3b": AttentionShape("wan2.1-1.3b", 2, 12, (21, 30, 52), 128),
    "flux-1024": AttentionShape("flux-1024", 2, 24, (1, 64, 64), 128, 512),
}


def parse_shape(spec: str) -> AttentionShape:
    """A preset name, or "B,H,F,Hgrid,Wgrid,D[,T]"."""
    if spec in SHAPES:
        return SHAPES[spec]
    try:
        values = [int(x) for x in spec.split(",")]
        b, h, f, gh, gw, d, *rest = values
        if rest[1:] or min(values[:6]) < 1 or (rest and rest[0] < 0) or not 8 <= d <= 128:
            raise ValueError
    except ValueError:
        raise ParoError(
            f"bad --shape {spec!r}",
            "use a preset (" + ", ".join(SHAPES) + ") or B,H,F,Hgrid,Wgrid,D[,T], sizes >= 1, D in 8..128",
        ) from None
    return AttentionShape(spec, b, h, (f, gh, gw), d, rest[0] if rest else 0)


def dense_flops(shape: AttentionShape) -> float:
    return 4.0 * shape.batch * shape.heads * shape.seq**2 * shape.head_dim


class Problem:
    """Inputs for one shape: random q, k, v in diffusers' layout and one order per head."""

    def __init__(self, shape: AttentionShape, block: int, device: torch.device, dtype=torch.bfloat16, seed: int = 0):
        self.shape, self.block = shape, block
        g = torch.Generator(device=device).manual_seed(seed)
        size = (shape.batch, shape.seq, shape.heads, shape.head_dim)
        self.q, self.k, self.v = (torch.randn(size, device=device, dtype=dtype, generator=g) for _ in range(3))
        self.layout = SequenceLayout(shape.text_len, shape.text_first)
        orders = candidate_orders(shape.grid)
        self.perm = head_permutations([orders[h % len(orders)] for h in range(shape.heads)], shape.grid).to(device)
        self.identity = torch.arange(math.prod(shape.grid), device=device).expand(shape.heads, -1).contiguous()
        self.nb = num_blocks(math.prod(shape.grid), block)

    def lists(self, density: float):
        kept = random_kept(self.shape.heads, self.nb, density).to(self.q.device)
        return (kept, *kept_block_lists(kept))

    def heads_first(self):
        """(B, H, S, D) views for SDPA and Flex."""
        return [x.transpose(1, 2) for x in (self.q, self.k, self.v)]


def flex_block_mask(problem: Problem, kept: torch.Tensor):
    """The kept tiles as a FlexAttention BlockMask over the sequence (text tiles dense), built
    from kv-block lists: no N x N mask ever exists. Flex tiles the whole sequence from token 0,
    paro tiles the visual part from its first token, so when the text length is not a multiple
    of the block the two grids are offset and Flex's last visual tile row/column (a partial
    one) follows the text rule: the same work per row to within one tile, not the same tiles."""
    from torch.nn.attention.flex_attention import BlockMask

    b = problem.block
    s = problem.shape.seq
    total = num_blocks(s, b)
    text_tiles = num_blocks(problem.shape.text_len, b)
    full = torch.ones(problem.shape.heads, total, total, dtype=torch.bool, device=kept.device)
    vis = total - text_tiles
    full[:, text_tiles:, text_tiles:] = kept[:, :vis, :vis]
    index, count = kept_block_lists(full)
    zeros = torch.zeros_like(count)
    return BlockMask.from_kv_blocks(
        zeros[None], index[None], count[None], index[None], BLOCK_SIZE=b, seq_lengths=(s, s)
    )


def _timer():
    from triton.testing import do_bench

    return lambda fn: do_bench(fn, warmup=50, rep=300, return_mode="median")


def _paro_call(p: Problem, perm, index, count, qk: str, pv: str):
    t = p.layout
    return lambda: torch.ops.paro.attention(
        p.q, p.k, p.v, perm, index, count, p.block, t.text_len, t.text_first, qk, pv, p.shape.head_dim**-0.5
    )


def _time_shape(p: Problem, densities, precisions, repeats: int, timer, flex, skipped: list) -> list[dict]:
    """The rows of one shape: the dense baselines, then per density Flex and paro in each
    precision (and paro in arrival order), each call run once untimed, then timed in rounds."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sdpa = torch.nn.functional.scaled_dot_product_attention
    name = p.shape.name
    qh, kh, vh = p.heads_first()
    rows, timed = [], []  # timed: (row, call), each call run once, untimed, before the rounds

    def add(row, fn, baseline=None):
        """Run fn once and queue it for timing; a baseline that fails is reported as skipped
        (it may be missing on this GPU or torch), paro failing is an error."""
        rows.append(row)
        row["ms"] = None
        if baseline is None:
            out = fn()
        else:
            try:
                out = fn()
            except Exception as exc:
                skipped.append(f"{name}: {baseline}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
                return None
        timed.append((row, fn))
        return out

    reference = None  # dense attention's output, from a baseline's first call (or the default SDPA's)
    for kernel, backend in (("SDPA flash", SDPBackend.FLASH_ATTENTION), ("SDPA cuDNN", SDPBackend.CUDNN_ATTENTION)):

        def call(backend=backend):
            with sdpa_kernel([backend]):
                return sdpa(qh, kh, vh)

        out = add(dict(shape=name, kernel=kernel, density=1.0, qk="bf16", pv="bf16"), call, kernel)
        reference = out if reference is None else reference
    reference = sdpa(qh, kh, vh) if reference is None else reference
    for density in densities:
        kept, index, count = p.lists(density)
        # Flex's BlockMask is built by the untimed first call only, as paro's index lists are.
        block_mask = functools.cache(lambda kept=kept: flex_block_mask(p, kept))
        add(
            dict(shape=name, kernel="FlexAttention", density=density, qk="bf16", pv="bf16"),
            lambda block_mask=block_mask: flex(qh, kh, vh, block_mask=block_mask()),
            f"Flex d={density}",
        )
        ref = reference.transpose(1, 2).float() if density == 1.0 else None  # paro's (B, S, H, D) layout
        for qk, pv in precisions:
            row = dict(shape=name, kernel="paro", density=density, qk=qk, pv=pv)
            out = add(row, _paro_call(p, p.perm, index, count, qk, pv))
            row["rel_l2_vs_sdpa"] = None if ref is None else ((out.float() - ref).norm() / ref.norm()).item()
        del ref  # the fp32 reference (hundreds of MB at full size) is not held through the next density
        qk, pv = precisions[-1]
        add(
            dict(shape=name, kernel="paro, identity order", density=density, qk=qk, pv=pv),
            _paro_call(p, p.identity, index, count, qk, pv),
        )
    for (row, _), times in zip(timed, interleaved_times([fn for _, fn in timed], timer, repeats)):
        row["ms"] = median(times)
        row["ms_range"] = [min(times), max(times)]
    cudnn = next(r["ms"] for r in rows if r["kernel"] == "SDPA cuDNN")
    flex_ms = {r["density"]: r["ms"] for r in rows if r["kernel"] == "FlexAttention"}
    flops = dense_flops(p.shape)
    for row in rows:
        if row["kernel"].startswith("paro"):
            row["flex_ms"] = flex_ms[row["density"]]
        if row["ms"]:
            row["tflops_effective"] = flops / (row["ms"] * 1e-3) / 1e12
            row["vs_cudnn"] = cudnn / row["ms"] if cudnn else None
            row["vs_flex_same_mask"] = row["flex_ms"] / row["ms"] if row.get("flex_ms") else None
    return rows


def interleaved_times(calls: list, timer, repeats: int) -> list[list[float]]:
    """Each call's timings, `repeats` of them, taken in rounds that visit every call in turn, so
    that a drift during the run reaches every variant alike."""
    runs = [[] for _ in calls]
    for _ in range(repeats):
        for times, fn in zip(runs, calls):
            times.append(timer(fn))
    return runs


def run(
    shapes: list[AttentionShape],
    densities: list[float],
    precisions: list[tuple[str, str]],
    block: int,
    with_statistics: bool = True,
    repeats: int = 3,
    report=None,
    device: torch.device = torch.device("cuda"),
    timer=None,
) -> dict:
    """Time every variant; returns {"rows": [...], "skipped": [...], "statistics": ...}. A row's
    "ms" is the median of its `repeats` timings, "ms_range" their minimum and maximum. `timer`
    (fn -> ms; default do_bench's median) and `device` are for tests."""
    from torch.nn.attention.flex_attention import flex_attention

    import paro_kernels.ops  # noqa: F401

    timer = timer or _timer()
    flex = torch.compile(flex_attention, dynamic=False)
    rows, skipped = [], []
    for shape in shapes:
        rows += _time_shape(Problem(shape, block, device), densities, precisions, repeats, timer, flex, skipped)
        if report:
            report(
                f"{shape.name}: {sum(r['shape'] == shape.name and r['ms'] is not None for r in rows)} calls timed "
                f"{repeats}x"
            )
        torch.cuda.empty_cache()

    statistics = None
    if with_statistics:
        statistics = time_statistics(SHAPES["cogvideox-5b"], block, timer)
    return {
        "rows": rows,
        "skipped": skipped,
        "statistics": statistics,
        "repeats": repeats,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "torch": torch.__version__,
        "block": block,
    }


def time_statistics(shape: AttentionShape, block: int, timer) -> dict:
    """One layer's calibration statistics: all heads, every candidate order, one timestep, batch 1."""
    from paro_kernels.stats import block_statistics

    p = Problem(
        AttentionShape(shape.name, 1, shape.heads, shape.grid, shape.head_dim, shape.text_len),
        block,
        torch.device("cuda"),
    )
    grid = shape.grid
    orders = [[o] * shape.heads for o in candidate_orders(grid)]
    fn = lambda: block_statistics(p.q, p.k, orders=orders, grid=grid, block=block, layout=p.layout, use_triton=True)  # noqa: E731
    ms = timer(fn)
    return {"shape": shape.label().replace(f"B{shape.batch}", "B1"), "orders": len(orders), "ms": ms}
