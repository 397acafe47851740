"""Attention backends: a small table of same-signature functions with their constraints
declared beside them, checked once when a plan is applied. A backend the user asked for never
falls back silently: if it cannot run here, that is a BackendError.

Nothing here imports Triton: the Triton backend's kernels load when it is chosen.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from paro_kernels import formats
from paro_kernels.block_sparse import block_sparse_op

from . import __version__
from .errors import BackendError


def _torch_attention(q, k, v, *, perm, kept, kv_index, kv_count, block, layout, qk, pv):
    """Block-sparse plain torch (paro_kernels.block_sparse, through its custom op: one opaque
    node under torch.compile): the kept tiles only, with the reference's semantics, computed in
    float32 (float64 inputs stay float64)."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    return block_sparse_op(
        q, k, v, perm, kv_index, kv_count, block, layout.text_len, layout.text_first, qk, pv, compute
    )  # fmt: skip


def _triton_attention(q, k, v, *, perm, kept, kv_index, kv_count, block, layout, qk, pv):
    """The Triton kernel through its custom op (one opaque node under torch.compile)."""
    return torch.ops.paro.attention(
        q, k, v, perm, kv_index, kv_count, block, layout.text_len, layout.text_first, qk, pv, q.shape[-1] ** -0.5
    )


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    fn: Callable[..., torch.Tensor]
    devices: tuple[str, ...]
    qk_formats: tuple[str, ...]
    pv_formats: tuple[str, ...]
    head_dims: tuple[int, ...] | None  # None: any
    dtypes: tuple[torch.dtype, ...] | None  # model dtypes served; None: any
    block_sizes: tuple[int, ...] | None
    # Whether runs on it also fuse work around attention: the QK norm and RoPE (intercept.py)
    # and the feed-forward's tanh-GELU projections (models/fused_gelu.py). The Triton kernels'
    # runs do, on a GPU in bf16/fp16; the torch path keeps the stock modules.
    fuses: bool = False

    def check(self, device: torch.device, dtype: torch.dtype, head_dim: int, block: int, qk: str, pv: str) -> None:
        if device.type not in self.devices:
            raise BackendError(f"backend {self.name!r} does not run on {device.type}", "use backend: auto or torch")
        if self.dtypes is not None and dtype not in self.dtypes:
            raise BackendError(
                f"backend {self.name!r} needs a bf16/fp16 model, this one runs in {dtype}",
                "set sampling.dtype: bfloat16",
            )
        if self.block_sizes is not None and block not in self.block_sizes:
            raise BackendError(
                f"backend {self.name!r} does not support block size {block}",
                "recalibrate with block_size " + "/".join(map(str, self.block_sizes)),
            )
        if qk not in self.qk_formats or pv not in self.pv_formats:
            raise BackendError(
                f"backend {self.name!r} has no QK {qk} / PV {pv} mode", "choose another precision or backend"
            )
        if self.head_dims is not None and head_dim not in self.head_dims:
            raise BackendError(f"backend {self.name!r} does not support head dim {head_dim}", "use backend: torch")


BACKENDS = {
    # The CPU path (and CUDA runs the Triton kernel cannot serve): block-sparse plain torch with
    # the reference's semantics; the reference itself (paro_kernels.reference) scores every key
    # and stays the tests' oracle.
    "torch": AttentionBackend(
        name="torch",
        fn=_torch_attention,
        devices=("cpu", "cuda"),
        qk_formats=formats.QK_FORMATS,
        pv_formats=formats.PV_FORMATS,
        head_dims=None,
        dtypes=None,
        block_sizes=None,
    ),
    # Reordering fused into loads and stores, kept tiles only; INT4 is simulated (Hopper has no
    # INT4 tensor cores), so it is never faster.
    "triton": AttentionBackend(
        name="triton",
        fn=_triton_attention,
        devices=("cuda",),
        qk_formats=formats.TRITON_QK_FORMATS,
        pv_formats=formats.TRITON_PV_FORMATS,
        head_dims=tuple(range(formats.TRITON_MIN_HEAD_DIM, formats.TRITON_MAX_HEAD_DIM + 1)),
        dtypes=(torch.bfloat16, torch.float16),
        block_sizes=formats.TRITON_BLOCKS,
        fuses=True,
    ),
}


def select_backend(
    requested: str, device: torch.device, dtype: torch.dtype, head_dim: int, block: int, qk: str, pv: str
) -> AttentionBackend:
    """Resolve "auto" (Triton where it can serve the run, else torch) and check the backend."""
    if requested == "auto":
        try:
            BACKENDS["triton"].check(device, dtype, head_dim, block, qk, pv)
            requested = "triton"
        except BackendError:
            requested = "torch"
    if requested not in BACKENDS:
        raise BackendError(
            f"backend {requested!r} is not available in paro {__version__}", "available: " + ", ".join(BACKENDS)
        )
    backend = BACKENDS[requested]
    backend.check(device, dtype, head_dim, block, qk, pv)
    if backend.name == "triton":
        import paro_kernels.ops  # noqa: F401  (registers torch.ops.paro.attention)
    return backend
