"""The reference attention against independent float64 constructions."""

import pytest
import torch

from paro_kernels.layout import SequenceLayout
from paro_kernels.orders import candidate_orders, head_permutations
from paro_kernels.quant import channel_shift, fake_quantize
from paro_kernels.reference import paro_attention_reference

from conftest import dit_qkv, position_in_order, rel_l2, structured_qkv


def sdpa(q, k, v, mask=None):
    """torch SDPA in float64 on (B, S, H, D); mask (H, S, S) bool, True = attend."""
    qt, kt, vt = (x.double().transpose(1, 2) for x in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=None if mask is None else mask[None])
    return out.transpose(1, 2)


def element_mask(orders, kept, grid, block, text_len, text_first):
    """(H, S, S) mask in arrival order, from block masks in each head's order, built from the
    stride formula token by token (no use of paro_kernels.orders)."""
    f_, h_, w_ = grid
    n = f_ * h_ * w_
    s = n + text_len
    heads = len(orders)
    mask = torch.ones(heads, s, s, dtype=torch.bool)
    vis0 = text_len if text_first else 0
    for hd, order in enumerate(orders):
        pos = torch.empty(n, dtype=torch.long)
        for f in range(f_):
            for h in range(h_):
                for w in range(w_):
                    pos[f * h_ * w_ + h * w_ + w] = position_in_order(order, grid, f, h, w)
        blk = pos // block
        mask[hd, vis0 : vis0 + n, vis0 : vis0 + n] = kept[hd][blk[:, None], blk[None, :]]
    return mask


@pytest.mark.parametrize("order", candidate_orders((3, 4, 5)))
def test_dense_equals_sdpa_for_every_order(order):
    q, k, v = structured_qkv(2, 60, 3, 16, seed=1)
    perm = head_permutations([order] * 3, (3, 4, 5))
    out = paro_attention_reference(q, k, v, perm=perm, block=16, compute_dtype=torch.float32)
    assert out.dtype == torch.float32
    assert rel_l2(out, sdpa(q, k, v)) <= 1e-5


@pytest.mark.parametrize("text_len,text_first", [(0, True), (7, True), (5, False)])
def test_block_sparse_equals_masked_softmax(text_len, text_first):
    grid, block = (3, 5, 7), 16  # 105 visual tokens: a ragged last block
    orders = ["HWF", "WFH"]
    nb = 7
    g = torch.Generator().manual_seed(3)
    kept = torch.rand(2, nb, nb, generator=g) < 0.4
    kept |= torch.eye(nb, dtype=torch.bool)
    q, k, v = structured_qkv(2, 105 + text_len, 2, 8, seed=2, dtype=torch.float64)
    layout = SequenceLayout(text_len, text_first)
    out = paro_attention_reference(
        q, k, v, perm=head_permutations(orders, grid), kept=kept, block=block, layout=layout, max_chunk_elems=2000
    )  # several query chunks
    expect = sdpa(q, k, v, element_mask(orders, kept, grid, block, text_len, text_first))
    assert rel_l2(out, expect) <= 1e-12


def test_bounded_chunks_change_nothing():
    q, k, v = structured_qkv(1, 64, 2, 8, seed=4, dtype=torch.float64)
    kept = torch.eye(4, dtype=torch.bool).expand(2, 4, 4)
    a = paro_attention_reference(q, k, v, kept=kept, block=16, max_chunk_elems=1)
    b = paro_attention_reference(q, k, v, kept=kept, block=16, max_chunk_elems=1 << 30)
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "qk,pv,bound",
    [
        ("bf16", "bf16", 1e-2),
        ("int8", "bf16", 2e-2),
        ("int8", "fp8", 4e-2),
        ("fp8", "fp8", 4e-2),
        ("int8", "int8", 4e-2),
    ],
)
def test_quantised_error_within_budget(qk, pv, bound):
    q, k, v = structured_qkv(2, 200, 2, 32, seed=5)
    perm = head_permutations(["HFW", "WHF"], (2, 10, 10))
    out = paro_attention_reference(q, k, v, perm=perm, block=32, qk=qk, pv=pv)
    err = rel_l2(out, sdpa(q, k, v))
    assert err <= bound
    assert err > 1e-6  # the format really rounds


def int8_bf16_without_balance(q, k, v):
    """Dense INT8 QK / bf16 PV attention in float64 with K less its channel shift but Q and K not
    balanced, built from quant.fake_quantize alone: Q and K in blocks of 64 rows, P and V cast."""
    qh, kh, vh = (x.double().transpose(1, 2) for x in (q, k, v))
    qh = fake_quantize(qh, "int8", 64)
    kh = fake_quantize(kh - channel_shift(k, torch.float64).unsqueeze(2), "int8", 64)
    s = qh @ kh.transpose(-1, -2) * q.shape[-1] ** -0.5
    p = (s - s.amax(dim=-1, keepdim=True)).exp()
    o = p.bfloat16().double() @ vh.bfloat16().double() / p.sum(dim=-1, keepdim=True)
    return o.transpose(1, 2)


@pytest.mark.parametrize("dim", [64, 128])
def test_balance_keeps_int8_within_budget_on_dit_activations(dim):
    """On DiT-shaped inputs (conftest.dit_qkv, bf16 values as a model passes them) INT8 QK meets
    its budgets, and the balance of Q against K is what gets it there: the same rounding without
    it has about twice the error (seeds 0-3: 1.9-2.4% unbalanced, 0.8-1.1% balanced)."""
    q, k, v = (x.double() for x in dit_qkv(1, 1024, 4, dim, seed=0, dtype=torch.bfloat16))
    expect = sdpa(q, k, v)
    errors = {pv: rel_l2(paro_attention_reference(q, k, v, qk="int8", pv=pv), expect) for pv in ("bf16", "fp8")}
    assert errors["bf16"] <= 2e-2
    assert errors["fp8"] <= 4e-2
    assert rel_l2(int8_bf16_without_balance(q, k, v), expect) >= 1.5 * errors["bf16"]


def test_key_shift_makes_int8_blind_to_key_offsets():
    """A common offset in K leaves softmax unchanged; with K's channel shift removed first,
    INT8's rounding does not see it either, so the error stays what it was without the offset."""
    q, k, v = structured_qkv(1, 128, 1, 32, seed=6)
    errors = []
    for offset in (0.0, 30.0):
        shifted = k + offset
        out = paro_attention_reference(q, shifted, v, block=32, qk="int8", pv="fp32")
        errors.append(rel_l2(out, sdpa(q, shifted, v)))
    assert errors[1] == pytest.approx(errors[0], rel=0.05)
    assert errors[0] < 2e-2


def test_value_shift_makes_fp8_blind_to_value_offsets():
    """An offset shared by all values moves the output by the same offset (each row of P / l
    sums to 1); with V's shift removed first, FP8's rounding does not see it either."""
    q, k, v = structured_qkv(1, 128, 1, 32, seed=7)
    errors = []
    for offset in (0.0, 30.0):
        shifted = v + offset
        out = paro_attention_reference(q, k, shifted, block=32, qk="fp32", pv="fp8")
        errors.append(rel_l2(out - offset, sdpa(q, k, v)))
    assert errors[1] == pytest.approx(errors[0], rel=0.05)
    assert errors[0] < 4e-2


@pytest.mark.parametrize("pv", ["fp32", "fp8", "int8"])
def test_row_with_no_key_outputs_zero(pv):
    """Not V's shift, which the 8-bit formats add back to every row that saw a key."""
    q, k, v = structured_qkv(1, 64, 2, 16, seed=8)
    kept = torch.ones(2, 4, 4, dtype=torch.bool)
    kept[1, 2] = False
    out = paro_attention_reference(q, k, v + 5.0, kept=kept, block=16, qk="int8", pv=pv)
    assert torch.equal(out[:, 32:48, 1], torch.zeros_like(out[:, 32:48, 1]))
    assert out[:, :32].abs().min() > 0
