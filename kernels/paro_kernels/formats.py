"""The number formats paro computes attention in, and which kernel serves which: the one place
these facts live. quant.py, reference.py, both kernels, the recipe rules and the backend table
read them here. Plain Python, so that the torch path imports without Triton installed.

Kernels branch on a format's code, which says how they compute with it rather than which
format it is: the 16-bit formats share FLOAT (the tensors' dtype tells them apart) and int8
and int4 share INT (int4 is simulated: int8 codes in [-7, 7]). The attention kernels and the
prep pass read the same codes.
"""

from __future__ import annotations

QK_FORMATS = ("fp32", "bf16", "fp16", "int8", "fp8", "int4")
PV_FORMATS = ("fp32", "bf16", "fp16", "fp8", "int8")

# The scaled formats (quantised with a scale per granule) and the largest magnitude their
# codes hold: symmetric, so int8 leaves -128 unused.
QMAX = {"int8": 127.0, "int4": 7.0, "fp8": 448.0}

FLOAT, INT, FP8 = 0, 1, 2
CODE = {"fp32": FLOAT, "bf16": FLOAT, "fp16": FLOAT, "int8": INT, "int4": INT, "fp8": FP8}

# The portable Triton kernel (triton_attention.py). It takes bf16/fp16 inputs only, hence no fp32.
TRITON_QK_FORMATS = ("bf16", "fp16", "int8", "fp8", "int4")
TRITON_PV_FORMATS = ("bf16", "fp16", "fp8", "int8")
TRITON_MIN_HEAD_DIM = 8
TRITON_MAX_HEAD_DIM = 128
TRITON_BLOCKS = (32, 64, 128)  # 8-bit tensor-core products reduce over >= 32 tokens

# The Hopper kernel (hopper_attention.py), which serves part of the portable kernel's calls.
HOPPER_PV_FORMATS = ("bf16", "fp16", "fp8")


def is_scaled(fmt: str) -> bool:
    """True for the formats that need a scale (integers and fp8)."""
    return fmt in QMAX
