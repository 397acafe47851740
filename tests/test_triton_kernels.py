"""Triton kernels against float64 references: under the CPU interpreter on small shapes, and
(marked gpu) on the GPU at larger ones. Inputs carry real structure (channel means, outlier
channels; conftest.dit_qkv: shaped like a DiT's), masks are random with the diagonal kept, sizes
are ragged."""

import pytest
import torch

from paro_kernels.layout import SequenceLayout, kept_block_lists, num_blocks, to_paro_order
from paro_kernels.orders import candidate_orders
from paro_kernels.quant import channel_balance, channel_shift, choose_scale, quantize
from paro_kernels.reference import paro_attention_reference
from paro_kernels.triton_attention import (
    INTERPRET,
    channel_smoothing,
    padded_head_dim,
    paro_attention_triton,
    prepare_kv,
)

from conftest import attention_case, dit_qkv, rel_l2, structured_qkv

interpreted = pytest.mark.skipif(not INTERPRET, reason="CPU interpreter tests (TRITON_INTERPRET=1)")

# (QK, PV) -> bound on relative L2 error vs the exact float64 masked attention
BOUNDS = {
    ("native", "native"): 1e-2,
    ("int8", "native"): 2e-2,
    ("native", "fp8"): 4e-2,
    ("int8", "fp8"): 4e-2,
    ("fp8", "fp8"): 5e-2,
    ("int8", "int8"): 4e-2,
    ("int4", "native"): 1.2e-1,
}


def run_kernel(c, qk, pv, poison=True, config=None):
    native = {torch.bfloat16: "bf16", torch.float16: "fp16"}[c["q"].dtype]
    qk, pv = (native if f == "native" else f for f in (qk, pv))
    index, count = kept_block_lists(c["kept"])
    out = torch.full_like(c["q"], float("nan")) if poison else None
    return (
        paro_attention_triton(
            c["q"],
            c["k"],
            c["v"],
            perm=c["perm"],
            kv_index=index,
            kv_count=count,
            block=c["block"],
            layout=c["layout"],
            qk=qk,
            pv=pv,
            out=out,
            config=config,
        ),
        qk,
        pv,
    )


def exact(c):
    return paro_attention_reference(
        c["q"], c["k"], c["v"], perm=c["perm"], kept=c["kept"], block=c["block"], layout=c["layout"]
    )


def same_semantics(c, qk, pv):
    """The reference with the kernel's formats: it differs from the kernel only by fp32 sums and
    by 8-bit P, which the kernel rounds against running row maxima."""
    return paro_attention_reference(
        c["q"], c["k"], c["v"], perm=c["perm"], kept=c["kept"], block=c["block"], layout=c["layout"], qk=qk, pv=pv
    )


def with_loud_tokens(c, share=0.1, gain=30.0, seed=0):
    """V with a random tenth of its tokens 30 times louder: V's scale then changes by up to 30x
    from tile to tile, which the kernels carry in their accumulator's units."""
    loud = torch.rand(c["v"].shape[1], generator=torch.Generator().manual_seed(seed)) < share
    c["v"][:, loud.to(c["v"].device)] *= gain
    return c


def with_loud_second_halves(c, gain=30.0):
    """Queries 30 times louder in the second 64 rows of every 128-row visual tile (in each head's
    order; no text): one query scale per tile would leave the first halves a few codes."""
    assert c["layout"].text_len == 0 and c["block"] == 128
    n = c["perm"].shape[1]
    for h in range(c["perm"].shape[0]):
        loud = c["perm"][h][(torch.arange(n, device=c["perm"].device) % 128) >= 64]
        c["q"][:, loud, h] *= gain
    return c


@interpreted
@pytest.mark.parametrize("modes", list(BOUNDS), ids=lambda m: f"{m[0]}-{m[1]}")
@pytest.mark.parametrize("text_len,text_first", [(0, True), (9, True), (5, False)])
def test_interpreted_kernel_matches_reference(modes, text_len, text_first):
    c = attention_case((3, 5, 9), text_len, text_first, heads=2, dim=32, block=32, seed=text_len)
    out, qk, pv = run_kernel(c, *modes)
    assert not out.isnan().any()  # every element written over the NaN poison
    assert rel_l2(out, exact(c)) <= BOUNDS[modes]
    assert rel_l2(out, same_semantics(c, qk, pv)) <= 1e-2


@interpreted
@pytest.mark.parametrize("modes", [("int8", "native"), ("int8", "fp8"), ("fp8", "fp8")], ids=lambda m: f"{m[0]}-{m[1]}")
def test_interpreted_kernel_on_dit_activations(modes):
    """On DiT-shaped inputs (conftest.dit_qkv), where the balance of Q against K sets most of the
    8-bit error, the kernel (Q divided by it in registers, K multiplied by it in the prep pass)
    matches the reference."""
    c = attention_case((3, 5, 9), 9, True, heads=2, dim=64, block=32, seed=1, inputs=dit_qkv)
    out, qk, pv = run_kernel(c, *modes)
    assert not out.isnan().any()
    assert rel_l2(out, exact(c)) <= BOUNDS[modes]
    assert rel_l2(out, same_semantics(c, qk, pv)) <= 1e-2


@interpreted
@pytest.mark.parametrize("modes", [("int8", "fp8"), ("fp8", "fp8"), ("int8", "int8")], ids=lambda m: f"{m[0]}-{m[1]}")
def test_interpreted_v_scale_changing_between_tiles(modes):
    """A wrong change of V's scale between key tiles is an error of order 1 here, not 1e-2."""
    c = with_loud_tokens(attention_case((3, 5, 9), 9, True, heads=2, dim=32, block=32, seed=0))
    out, qk, pv = run_kernel(c, *modes)
    assert rel_l2(out, same_semantics(c, qk, pv)) <= 2e-2


@interpreted
@pytest.mark.parametrize("qk,pv", [("int8", "fp8"), ("bf16", "fp8"), ("int8", "bf16")])
@pytest.mark.parametrize("seq,dim", [(328, 24), (1000, 64), (40, 16)])
def test_interpreted_smoothing_is_quants(qk, pv, seq, dim):
    """One launch gives quant.channel_shift of K and V and quant.channel_balance, from the same
    samples (every ceil(S / 256)-th token: 164, 250 and 40 of them), to float32 rounding; what the
    formats do not use is not computed."""
    q, k, v = (x.to(torch.bfloat16) for x in dit_qkv(2, seq, 3, dim, seed=seq))
    k_shift, v_shift, balance = channel_smoothing(q, k, v, qk, pv)
    if qk == "int8":
        torch.testing.assert_close(k_shift, channel_shift(k), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(balance, channel_balance(q, k, channel_shift(k)), rtol=1e-5, atol=0)
    else:
        assert k_shift.numel() == balance.numel() == 1
    if pv == "fp8":
        torch.testing.assert_close(v_shift, channel_shift(v), rtol=1e-5, atol=1e-5)
    else:
        assert v_shift.numel() == 1


@interpreted
@pytest.mark.parametrize("qk,pv", [("int8", "fp8"), ("fp8", "int8")])
@pytest.mark.parametrize("text_len,text_first,dim", [(0, True, 32), (40, True, 24), (9, False, 16)])
def test_interpreted_prep_pass_rounds_as_the_quantiser(qk, pv, text_len, text_first, dim):
    """The prep pass's K and V codes and per-tile scales are, bit for bit, quant's for blocks of
    each segment (text, then visual in the head's order) after the channel shifts and, for K,
    times the balance that channel_smoothing gives (test_interpreted_smoothing_is_quants)."""
    block = 32
    c = attention_case((4, 8, 9), text_len, text_first, heads=2, dim=dim, block=block, seed=5)
    n_text_tiles, nb = num_blocks(text_len, block), num_blocks(288, block)
    kp, vp, k_scale, v_scale, v_shift, balance = prepare_kv(
        c["q"], c["k"], c["v"], c["perm"], block, c["layout"], qk, pv, n_text_tiles, nb
    )
    k_shift, same_v_shift, same_balance = channel_smoothing(c["q"], c["k"], c["v"], qk, pv)
    assert torch.equal(v_shift, same_v_shift) and torch.equal(balance, same_balance)
    vp = vp.transpose(-1, -2)  # 8-bit V is stored channels first
    for x, fmt, codes, scales, factor, shift in (
        (c["k"], qk, kp, k_scale, balance.unsqueeze(2), k_shift.unsqueeze(2)),
        (c["v"], pv, vp, v_scale, 1.0, v_shift.unsqueeze(2)),
    ):
        row = tile = 0
        for segment in to_paro_order(x.float(), c["layout"], c["perm"]):
            tiles = num_blocks(segment.shape[2], block)
            smoothed = (segment - shift) * factor
            want_scale = choose_scale(smoothed, fmt, block)
            want = quantize(smoothed, want_scale, fmt, block).float()
            got = codes[:, :, row : row + tiles * block].float()
            assert torch.equal(scales[:, :, tile : tile + tiles], want_scale.squeeze(-1))
            assert torch.equal(got[:, :, : segment.shape[2], :dim], want)
            assert not got[:, :, segment.shape[2] :].any() and not got[..., dim:].any()  # zero padding
            row, tile = row + tiles * block, tile + tiles
        assert codes.shape[-1] == padded_head_dim(dim) and row == codes.shape[2]


@interpreted
@pytest.mark.parametrize("modes", [("int8", "fp8"), ("native", "native")], ids=lambda m: f"{m[0]}-{m[1]}")
def test_interpreted_q_k_v_may_have_different_strides(modes):
    """Each of q, k, v is read with its own strides: the same values stored heads-first (as a
    caller's transpose leaves them) give the same output."""
    c = attention_case((3, 5, 9), 9, True, heads=2, dim=32, block=32, seed=6)
    want, _, _ = run_kernel(c, *modes)
    for name in ("k", "v"):
        heads_first = c[name].transpose(1, 2).contiguous().transpose(1, 2)
        got, _, _ = run_kernel({**c, name: heads_first}, *modes)
        assert torch.equal(got, want), name


@interpreted
@pytest.mark.parametrize(
    "modes",
    [("int8", "fp8"), ("fp8", "fp8"), ("int8", "int8"), ("int8", "native"), ("native", "native")],
    ids=lambda m: f"{m[0]}-{m[1]}",
)
@pytest.mark.parametrize("block", [32, 128])
def test_interpreted_split_tiles_equal_whole_tiles(modes, block):
    """Two programs per query tile, each with half its rows (the H100 launch at head dim 64 with
    8-bit QK), compute exactly what one program does: a 32-row tile's halves share its query
    scale, a 128-row tile's halves have one each (quant.QUERY_SCALE_ROWS)."""
    c = attention_case((3, 5, 9), 9, True, heads=2, dim=32, block=block, seed=3)
    whole, _, _ = run_kernel(c, *modes)
    halves, _, _ = run_kernel(c, *modes, config={"num_warps": 1, "num_stages": 1, "split": 2})
    assert not halves.isnan().any()
    assert torch.equal(halves, whole)


@interpreted
@pytest.mark.parametrize("modes", [("int8", "fp8"), ("int8", "native"), ("fp8", "fp8")], ids=lambda m: f"{m[0]}-{m[1]}")
@pytest.mark.parametrize("split", [1, 2])
def test_interpreted_query_scale_per_64_rows(modes, split):
    """In 128-row tiles each 64 query rows have their own scale, in one program or two: with the
    queries of every tile's second half 30 times louder, a scale for the whole tile would leave
    the first half a few codes (an error of order 1e-1 against the reference)."""
    c = with_loud_second_halves(attention_case((3, 5, 9), 0, True, heads=2, dim=32, block=128, seed=7))
    out, qk, pv = run_kernel(c, *modes, config={"num_warps": 1, "num_stages": 1, "split": split})
    assert rel_l2(out, same_semantics(c, qk, pv)) <= 1e-2


@interpreted
def test_split_must_cut_tiles_into_whole_parts():
    c = attention_case((2, 4, 6), 0, True, heads=1, dim=32, block=64)
    for split in (3, 8):
        with pytest.raises(ValueError, match=f"split {split} does not cut block 64"):
            run_kernel(c, "int8", "fp8", config={"num_warps": 1, "num_stages": 1, "split": split})


@interpreted
@pytest.mark.parametrize("modes", [("int8", "fp8"), ("fp8", "fp8")], ids=lambda m: f"{m[0]}-{m[1]}")
@pytest.mark.parametrize("block", [32, 64, 128])
def test_interpreted_swizzled_v_gives_the_same_product(modes, block):
    """V's keys swizzled by the prep pass and P's columns by the kernel (the H100 launch at head
    dim 64): the same P V, up to the order of fp32 sums."""
    c = attention_case((3, 5, 9), 9, True, heads=2, dim=32, block=block, seed=4)
    whole, _, _ = run_kernel(c, *modes)
    swizzled, _, _ = run_kernel(c, *modes, config={"num_warps": 1, "num_stages": 1, "split": 2, "swizzle_v": True})
    assert not swizzled.isnan().any()
    assert rel_l2(swizzled, whole) <= 1e-5


@interpreted
@pytest.mark.parametrize("dim", [16, 24])  # 24: channels padded to 32 and masked
def test_interpreted_fp16_is_tight(dim):
    c = attention_case((2, 4, 6), 3, True, heads=2, dim=dim, block=32, dtype=torch.float16)
    out, _, _ = run_kernel(c, "native", "native")
    assert rel_l2(out, exact(c)) <= 1e-3
    out, _, _ = run_kernel(c, "int8", "fp8")
    assert rel_l2(out, exact(c)) <= 4e-2


@interpreted
@pytest.mark.parametrize("modes", [("int8", "fp8"), ("native", "native")], ids=lambda m: f"{m[0]}-{m[1]}")
def test_interpreted_row_with_no_key_outputs_zero(modes):
    """As the reference: no key, no output (not V's shift, which the 8-bit PV path adds back)."""
    c = attention_case((2, 4, 8), 0, True, heads=2, dim=32, block=32, density=0.5)
    c["kept"][1, 1] = False
    out, _, _ = run_kernel(c, *modes)
    rows = c["perm"][1, 32:64].long()
    assert torch.equal(out[:, rows, 1], torch.zeros_like(out[:, rows, 1]))
    assert rel_l2(out, exact(c)) <= BOUNDS[modes]


@pytest.mark.parametrize("device", ["cpu" if INTERPRET else "cuda"])
def test_custom_op_and_shape_checks(device):
    import paro_kernels.ops  # noqa: F401

    c = attention_case((2, 4, 8), 0, True, heads=2, dim=16, block=32, device=device)
    index, count = kept_block_lists(c["kept"])
    out = torch.ops.paro.attention(c["q"], c["k"], c["v"], c["perm"], index, count, 32, 0, True, "int8", "fp8", 0.25)
    assert rel_l2(out, exact(c)) <= 4e-2
    with pytest.raises(ValueError, match="head dim 160"):
        q = torch.zeros(1, 32, 2, 160, dtype=torch.bfloat16, device=device)
        paro_attention_triton(q, q, q, perm=c["perm"], kv_index=index, kv_count=count, block=32)
    with pytest.raises(ValueError, match="bf16 or fp16"):
        paro_attention_triton(
            c["q"].float(), c["k"].float(), c["v"].float(), perm=c["perm"], kv_index=index, kv_count=count, block=32
        )
    with pytest.raises(ValueError, match="do not fit"):
        paro_attention_triton(c["q"], c["k"], c["v"], perm=c["perm"], kv_index=index, kv_count=count, block=64)


# ---------------------------------------------------------------------------------------------
# On the GPU (run on the H100 before a kernel change lands)

GPU_CASES = [
    ((5, 12, 18), 226, True, 64),
    ((4, 9, 16), 0, True, 128),
    ((3, 16, 16), 512, True, 128),
    ((6, 10, 14), 33, False, 64),
]


@pytest.mark.gpu
@pytest.mark.parametrize("modes", list(BOUNDS), ids=lambda m: f"{m[0]}-{m[1]}")
@pytest.mark.parametrize("grid,text_len,text_first,dim", GPU_CASES, ids=lambda x: str(x))
def test_gpu_kernel_matches_reference(modes, grid, text_len, text_first, dim):
    c = attention_case(grid, text_len, text_first, heads=3, dim=dim, block=64, batch=2, density=0.3, device="cuda")
    out, qk, pv = run_kernel(c, *modes)
    assert not out.isnan().any()
    assert rel_l2(out, exact(c)) <= BOUNDS[modes]
    assert rel_l2(out, same_semantics(c, qk, pv)) <= 1e-2


# DiT-shaped (conftest.dit_qkv): CogVideoX-like (head dim 64, text in front) and Wan-like (head
# dim 128; Wan's text enters by cross-attention, so none here)
DIT_CASES = [((4, 12, 18), 226, True, 64), ((4, 16, 16), 0, True, 128)]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "modes", [("native", "native"), ("int8", "native"), ("int8", "fp8")], ids=lambda m: f"{m[0]}-{m[1]}"
)
@pytest.mark.parametrize("block", [64, 128])
@pytest.mark.parametrize("grid,text_len,text_first,dim", DIT_CASES, ids=lambda x: str(x))
def test_gpu_kernels_on_dit_activations(modes, block, grid, text_len, text_first, dim):
    """Both kernels on DiT-shaped inputs, within the budgets against float64 exact attention. On
    an H100 block 128 goes to the Hopper kernel at head dim 128 and, in 16-bit, at 64; the rest
    to the portable kernel (split in two programs at block 128, head dim 64, 8-bit QK, FP8 PV)."""
    c = attention_case(
        grid, text_len, text_first, heads=3, dim=dim, block=block, batch=2, density=0.3, device="cuda", inputs=dit_qkv
    )
    out, qk, pv = run_kernel(c, *modes)
    assert not out.isnan().any()
    assert rel_l2(out, exact(c)) <= BOUNDS[modes]
    assert rel_l2(out, same_semantics(c, qk, pv)) <= 1e-2


@pytest.mark.gpu
def test_gpu_identity_order_and_density_one_equal_flash():
    c = attention_case((4, 8, 8), 0, True, heads=4, dim=64, block=64, batch=2, device="cuda", dtype=torch.float16)
    c["perm"] = torch.arange(256, device="cuda").expand(4, 256).contiguous()
    c["kept"] = torch.ones_like(c["kept"])
    out, _, _ = run_kernel(c, "native", "native")
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        *(x.transpose(1, 2) for x in (c["q"], c["k"], c["v"]))
    ).transpose(1, 2)
    assert rel_l2(out, sdpa) <= 2e-3


@pytest.mark.gpu
def test_gpu_statistics_kernel_matches_torch():
    from paro_kernels.stats import block_statistics, mass_recall

    grid = (5, 12, 18)
    q, k, _ = (x.cuda().bfloat16() for x in structured_qkv(2, 1080 + 226, 3, 64, seed=3))
    orders = [[o] * 3 for o in candidate_orders(grid)]
    layout = SequenceLayout(226, True)
    fast = block_statistics(q, k, orders=orders, grid=grid, block=64, layout=layout, use_triton=True)
    slow = block_statistics(q, k, orders=orders, grid=grid, block=64, layout=layout, use_triton=False)
    torch.testing.assert_close(fast.mass, slow.mass, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(fast.incoherence, slow.incoherence, atol=1e-3, rtol=1e-3)
    assert torch.equal(mass_recall(fast.mass, 0.3).argmax(0), mass_recall(slow.mass, 0.3).argmax(0))


HOPPER_CASES = [
    ((5, 12, 18), 226, True, 64),
    ((4, 9, 16), 0, True, 128),
    ((3, 16, 16), 512, True, 128),
    ((6, 10, 14), 33, False, 96),
]


@pytest.mark.gpu
@pytest.mark.parametrize("modes", list(BOUNDS), ids=lambda m: f"{m[0]}-{m[1]}")
@pytest.mark.parametrize("grid,text_len,text_first,dim", HOPPER_CASES, ids=lambda x: str(x))
def test_gpu_block_128_matches_reference(modes, grid, text_len, text_first, dim):
    """Block 128 is the warp-specialised Hopper kernel's (kernels/paro_kernels/hopper_attention.py) on an
    H100, for the calls it covers; an empty kept row outputs what the reference does."""
    c = attention_case(grid, text_len, text_first, heads=3, dim=dim, block=128, batch=2, density=0.3, device="cuda")
    c["kept"][1, 1] = False  # with no text, the row attends to nothing
    out, qk, pv = run_kernel(c, *modes)
    assert not out.isnan().any()
    assert rel_l2(out, exact(c)) <= BOUNDS[modes]
    assert rel_l2(out, same_semantics(c, qk, pv)) <= 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("modes", [("int8", "fp8"), ("fp8", "fp8")], ids=lambda m: f"{m[0]}-{m[1]}")
@pytest.mark.parametrize("block,dim", [(128, 128), (128, 64), (64, 128)])
def test_gpu_v_scale_changing_between_tiles(modes, block, dim):
    """As the interpreted test, on the kernels an H100 runs: the Hopper kernel (block 128, head
    dim 128), the split portable kernel (block 128, head dim 64), the portable kernel."""
    c = with_loud_tokens(
        attention_case((8, 12, 16), 226, True, heads=2, dim=dim, block=block, batch=2, density=0.5, device="cuda")
    )
    out, qk, pv = run_kernel(c, *modes)
    assert rel_l2(out, same_semantics(c, qk, pv)) <= 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("modes", [("int8", "fp8"), ("int8", "bf16")], ids=lambda m: f"{m[0]}-{m[1]}")
@pytest.mark.parametrize("dim", [128, 64])
def test_gpu_query_scale_per_64_rows(modes, dim):
    """As the interpreted test, on the kernels an H100 runs at block 128: the Hopper kernel (head
    dim 128: a scale per consumer warpgroup), the portable kernel split in two programs (head dim
    64, FP8 PV) and whole (head dim 64, 16-bit PV: a scale per row)."""
    c = with_loud_second_halves(
        attention_case((8, 12, 16), 0, True, heads=2, dim=dim, block=128, batch=2, density=0.5, device="cuda")
    )
    out, qk, pv = run_kernel(c, *modes)
    assert rel_l2(out, same_semantics(c, qk, pv)) <= 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0), reason="needs an sm_90 GPU"
)
def test_gpu_hopper_kernel_serves_block_128_on_sm90():
    from paro_kernels import hopper_attention

    device = torch.device("cuda")
    assert hopper_attention.available(device)
    for qk, pv in (("bf16", "bf16"), ("int8", "fp8"), ("fp8", "fp8"), ("int8", "bf16")):
        assert hopper_attention.chosen(device, 128, 128, qk, pv)
    assert hopper_attention.chosen(device, 128, 64, "bf16", "bf16")
    assert not hopper_attention.chosen(device, 128, 64, "int8", "fp8")  # the portable kernel is faster there
    assert not hopper_attention.chosen(device, 64, 128, "bf16", "bf16")
    assert not hopper_attention.chosen(device, 128, 128, "int8", "int8")


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0), reason="needs an sm_90 GPU"
)
def test_gpu_calls_the_hopper_kernel_chooses_reach_its_launch_and_no_others(monkeypatch):
    """The dispatch itself: paro_attention_triton hands exactly the calls `chosen` names to
    hopper_attention.launch (whose outputs match the reference), every other call to the portable kernel."""
    from paro_kernels import hopper_attention

    launches = []
    real_launch = hopper_attention.launch
    monkeypatch.setattr(hopper_attention, "launch", lambda *a, **k: launches.append(1) or real_launch(*a, **k))
    for block, dim, qk, pv, hopper in (
        (128, 128, "int8", "fp8", True),
        (128, 64, "bf16", "bf16", True),
        (128, 64, "int8", "fp8", False),
        (64, 128, "bf16", "bf16", False),
    ):
        launches.clear()
        c = attention_case((2, 8, 16), 64, True, 2, dim, block, device="cuda")
        out, qk_, pv_ = run_kernel(c, qk, pv)
        assert len(launches) == hopper, (block, dim, qk, pv)
        assert rel_l2(out, same_semantics(c, qk_, pv_)) <= 1e-2
