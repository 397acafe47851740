"""paro_kernels.formats: the one table of formats, their kernel codes and the kernels' capabilities."""

import subprocess
import sys

import torch

from paro_kernels import formats
from paro_kernels.formats import CODE, FLOAT, FP8, INT, PV_FORMATS, QK_FORMATS, QMAX, is_scaled

ALL_FORMATS = set(QK_FORMATS) | set(PV_FORMATS)


def test_torch_path_imports_without_triton():
    """formats, quant and the reference import with Triton unimportable (the torch backend and
    the recipe rules need no GPU toolchain); the kernels, as a control, do not."""
    script = (
        "import sys\n"
        "sys.modules['triton'] = None  # any `import triton...` now raises ImportError\n"
        "import paro_kernels.formats, paro_kernels.quant, paro_kernels.reference\n"
        "try:\n"
        "    import paro_kernels.triton_attention\n"
        "except ImportError:\n"
        "    print('kernels need triton')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] == "kernels need triton"


def test_every_format_has_one_code_shared_by_every_kernel():
    assert len({FLOAT, INT, FP8}) == 3
    assert set(CODE) == ALL_FORMATS
    assert set(CODE.values()) == {FLOAT, INT, FP8}
    for names in (QK_FORMATS, PV_FORMATS):
        assert len(set(names)) == len(names)


def test_scaled_formats_are_those_the_kernels_quantise():
    """A format needs a scale exactly when the kernels compute in integer or FP8 codes, and
    those are the formats a kernel stores in one byte; the others are casts."""
    from paro_kernels.quant import FLOAT_CASTS
    from paro_kernels.triton_attention import STORAGE

    assert set(QMAX) <= ALL_FORMATS
    assert {f for f in ALL_FORMATS if not is_scaled(f)} == set(FLOAT_CASTS)
    for fmt in ALL_FORMATS:
        assert is_scaled(fmt) == (CODE[fmt] != FLOAT), fmt
    for fmt, dtype in STORAGE.items():
        assert is_scaled(fmt) == (dtype.itemsize == 1), fmt
        assert (CODE[fmt] == INT) == (dtype == torch.int8), fmt
        assert (CODE[fmt] == FP8) == (dtype == torch.float8_e4m3fn), fmt


def test_kernel_capabilities_are_known_formats():
    from paro_kernels.triton_attention import P_SCALE, STORAGE

    assert set(formats.TRITON_QK_FORMATS) <= set(QK_FORMATS)
    assert set(formats.TRITON_PV_FORMATS) <= set(PV_FORMATS)
    assert set(formats.HOPPER_PV_FORMATS) <= set(formats.TRITON_PV_FORMATS)
    assert set(formats.TRITON_QK_FORMATS) | set(formats.TRITON_PV_FORMATS) == set(STORAGE)
    assert set(P_SCALE) == {f for f in formats.TRITON_PV_FORMATS if is_scaled(f)}  # a static scale for 8-bit P
    assert 0 < formats.TRITON_MIN_HEAD_DIM <= formats.TRITON_MAX_HEAD_DIM
    assert min(formats.TRITON_BLOCKS) >= 32  # 8-bit tensor-core products reduce over >= 32 tokens
