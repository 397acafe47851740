"""The backend table (paro_cli/backends.py): auto picks what can serve the run, an asked-for
backend never falls back."""

import pytest
import torch

from paro_cli.backends import select_backend
from paro_cli.errors import BackendError


def test_backend_selection():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert select_backend("auto", cpu, torch.bfloat16, 64, 64, "int8", "fp8").name == "torch"
    assert select_backend("auto", cuda, torch.float32, 64, 64, "int8", "fp8").name == "torch"  # Triton needs 16-bit
    with pytest.raises(BackendError, match="'triton' does not run on cpu"):
        select_backend("triton", cpu, torch.bfloat16, 64, 64, "bf16", "bf16")
    with pytest.raises(BackendError, match="needs a bf16/fp16 model"):
        select_backend("triton", cuda, torch.float32, 64, 64, "int8", "fp8")
    with pytest.raises(BackendError, match="head dim 160"):
        select_backend("triton", cuda, torch.bfloat16, 160, 64, "int8", "fp8")
    with pytest.raises(BackendError, match="no QK fp32"):
        select_backend("triton", cuda, torch.bfloat16, 64, 64, "fp32", "fp8")
    with pytest.raises(BackendError, match="'flash' is not available"):
        select_backend("flash", cpu, torch.bfloat16, 64, 64, "bf16", "bf16")
