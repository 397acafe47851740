"""Shared fixtures. Without a GPU, Triton kernels run under the interpreter: the flag must be
set before any kernel module is imported."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def position_in_order(order: str, grid, f, h, w):
    """Position of token (f, h, w) when tokens are laid out in `order` (outermost first).

    Written from strides, independently of paro_kernels.orders, to serve as the tests' oracle.
    """
    sizes = dict(zip("FHW", grid))
    coords = {"F": f, "H": h, "W": w}
    pos, stride = 0, 1
    for axis in reversed(order):  # image orders ("HW") leave F, of size 1, out
        pos += coords[axis] * stride
        stride *= sizes[axis]
    return pos


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def structured_qkv(b, s, h, d, seed=0, dtype=torch.float32, logit_std=2.5):
    """Inputs with real structure: per-channel means, a few outlier channels, not just randn.

    q and k are scaled together so the attention logits q.k/sqrt(d) have about `logit_std`
    spread, as in trained models (sharp enough to matter, not one-hot).
    """
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(3):
        x = torch.randn(b, s, h, d, generator=g)
        x = x + 1.5 * torch.randn(1, 1, h, d, generator=g)  # channel means (K's is what smoothing removes)
        x[..., : max(1, d // 16)] *= 4.0  # outlier channels
        out.append(x)
    q, k, v = out
    logits = torch.einsum("bshd,bthd->bhst", q, k) / d**0.5
    c = (logit_std / logits.std()).sqrt()
    return [x.to(dtype) for x in (q * c, k * c, v)]


@pytest.fixture(scope="session")
def demo_model():
    from paro_cli.models.loading import load_model

    return load_model("planted")


@pytest.fixture(scope="session")
def demo_calibration(demo_model):
    """(recipe, plan) of the planted model at the planted recipe, on a short schedule."""
    from paro_cli.calibration import calibrate
    from paro_cli.recipe import load_recipe

    recipe = load_recipe("planted", {"sampling.steps": 4})
    return recipe, calibrate(demo_model, recipe)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """tiny_pipeline(kind) -> the folder of that tiny random-weight diffusers pipeline
    (tests/tiny_pipelines.py), built and saved once per session on first use."""
    root, built = tmp_path_factory.mktemp("tiny-pipelines"), {}

    def folder(kind: str):
        from tiny_pipelines import build_pipeline

        if kind not in built:
            built[kind] = build_pipeline(kind, root / kind)
        return built[kind]

    return folder
