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


def dit_qkv(b, s, h, d, seed=0, dtype=torch.float32, logit_std=3.0):
    """Inputs shaped like a DiT's, where INT8 QK suffers (issue 23): channel means (Q's 1-2 sigma,
    K's 5-10 sigma, far above its spread; V's about 1 sigma) and, per head, d // 16 outlier
    channels 4x the others in Q and as many in K. The two sets are disjoint: a channel loud in
    both is loud in Q K^T itself, which no balance of Q against K (quant.channel_balance)
    changes. Q and K are scaled together so that the logits softmax sees, q.(k - mean k)/sqrt(d),
    spread about `logit_std`."""
    g = torch.Generator().manual_seed(seed)

    def means(low, high):  # per (head, channel): a size in [low, high] sigma, a random sign
        return (low + (high - low) * torch.rand(h, d, generator=g)) * torch.randn(h, d, generator=g).sign()

    n = max(1, d // 16)
    loud = torch.rand(h, d, generator=g).argsort(dim=1)  # per head, channels in a random order
    q_gain, k_gain = (torch.ones(h, d).scatter(1, loud[:, i * n : (i + 1) * n], 4.0) for i in range(2))
    q = (torch.randn(b, s, h, d, generator=g) + means(1.0, 2.0)) * q_gain
    k = (torch.randn(b, s, h, d, generator=g) + means(5.0, 10.0)) * k_gain
    v = torch.randn(b, s, h, d, generator=g) + torch.randn(h, d, generator=g)
    logits = torch.einsum("bshd,bthd->bhst", q[:, :256], k - k.mean(dim=1, keepdim=True)) / d**0.5
    c = (logit_std / logits.std()).sqrt()
    return [x.to(dtype) for x in (q * c, k * c, v)]


def attention_case(
    grid,
    text_len,
    text_first,
    heads,
    dim,
    block,
    batch=1,
    density=0.4,
    seed=0,
    device="cpu",
    dtype=torch.bfloat16,
    inputs=structured_qkv,
):
    """q, k, v (`inputs`: structured_qkv or dit_qkv) with per-head orders and random kept blocks
    (diagonal kept): the arguments of one paro attention call, as a dict."""
    from paro_kernels.layout import SequenceLayout, num_blocks
    from paro_kernels.orders import candidate_orders, head_permutations

    n = grid[0] * grid[1] * grid[2]
    nb = num_blocks(n, block)
    g = torch.Generator().manual_seed(seed)
    kept = (torch.rand(heads, nb, nb, generator=g) < density) | torch.eye(nb, dtype=torch.bool)
    orders = [candidate_orders(grid)[(seed + h) % 6] for h in range(heads)]
    q, k, v = (x.to(device=device, dtype=dtype) for x in inputs(batch, n + text_len, heads, dim, seed=seed))
    return dict(
        q=q,
        k=k,
        v=v,
        perm=head_permutations(orders, grid).to(device),
        kept=kept.to(device),
        block=block,
        layout=SequenceLayout(text_len, text_first),
    )


@pytest.fixture(scope="session")
def planted_model():
    from paro_cli.models.loading import load_model

    return load_model("planted")


@pytest.fixture(scope="session")
def planted_calibration(planted_model):
    """(recipe, plan) of the planted model at the planted recipe, on a short schedule."""
    from paro_cli.calibration import calibrate
    from paro_cli.recipe import load_recipe

    recipe = load_recipe("planted", {"sampling.steps": 4})
    return recipe, calibrate(planted_model, recipe)


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


class Recorder:
    """Attention handler that runs every call's stock attention and records what it saw: each
    forward's (grid, text tokens, normalised timestep) and each call's (layer, q shape)."""

    def __init__(self):
        self.forwards, self.calls = [], []

    @property
    def timesteps(self) -> list[float]:
        return [t for *_, t in self.forwards]

    def on_forward(self, grid, layout, t):
        self.forwards.append((tuple(grid), layout.text_len, t))

    def attention(self, layer, q, k, v, dense, layout):
        self.calls.append((layer, tuple(q.shape)))
        return dense()


TINY_WAN = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=4,
    out_channels=4,
    text_dim=16,
    freq_dim=256,
    ffn_dim=32,
    num_layers=2,
    rope_max_seq_len=32,
)


def tiny_wan(seed=0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(**TINY_WAN).eval()


def run_tiny_wan(model, x):
    """One forward of a tiny_wan model on x (batch 2) at timestep 700, with fixed text."""
    with torch.no_grad():
        text = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
        return model(
            hidden_states=x, timestep=torch.tensor([700.0, 700.0]), encoder_hidden_states=text, return_dict=False
        )[0]


def full_plan(model, grid, orders, qk="fp32", pv="fp32", block=16):
    """A plan that keeps every block (two timestep slots) with the given orders [layer][head]."""
    from paro_cli.models import config_fingerprint
    from paro_cli.plan import ComponentPlan, make_plan
    from paro_kernels.layout import SequenceLayout, num_blocks

    nb = num_blocks(grid[0] * grid[1] * grid[2], block)
    masks = torch.ones(2, len(orders), len(orders[0]), nb, nb, dtype=torch.bool)
    component = ComponentPlan.from_masks(config_fingerprint(model), orders, masks, 1.0, 6)
    return make_plan(
        model_id="tiny",
        family="wan",
        grid=grid,
        layout=SequenceLayout(0),
        block_size=block,
        density=1.0,
        qk=qk,
        pv=pv,
        components={"transformer": component},
        slot_policy="half",
        slot_bounds=[0.5],
        calibration_timesteps=[1.0, 0.0],
        prompts=["x"],
        seeds=[0],
    )


def paro(capsys, *args):
    """Run `paro ARGS` in this process; returns (exit code, stdout, stderr)."""
    from paro_cli.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err
