"""The block-sparse CPU attention (paro_kernels/block_sparse.py) against the reference, its oracle.

Both round Q, K and V in one shared function, so with the same compute dtype they differ only in
the order of floating-point sums. In float64 that is ~1e-16: a rounding of P that flips between
them needs a product within 1e-16 of a rounding boundary, which these cases never meet, so the
comparison is at 1e-9 for every format. In float32, flips do happen (the explicit softmax rounds
~1e5 numbers per case), hence a bound on the whole output instead of per element there.
"""

import pytest
import torch

from paro_cli.backends import BACKENDS
from paro_kernels.block_sparse import block_sparse_attention, block_sparse_op
from paro_kernels.layout import SequenceLayout, kept_block_lists, num_blocks
from paro_kernels.orders import candidate_orders, head_permutations
from paro_kernels.reference import paro_attention_reference

from conftest import rel_l2, structured_qkv

FORMATS = [("fp32", "fp32"), ("bf16", "bf16"), ("int8", "fp8"), ("int8", "int8"), ("fp8", "fp8"), ("int4", "fp16")]
LAYOUTS = [(0, True), (7, True), (5, False)]  # no text, a text prefix, a text suffix
GRIDS = {"ragged": (3, 5, 7), "whole": (2, 4, 8)}  # 105 visual tokens (7 tiles of 16, the last 9 rows); 64 (4 tiles)


def kept_blocks(heads, nb, density, seed):
    """Random kept tiles at `density` (1.0: every tile, each head one unit of nb query tiles);
    "empty": sparse, and each head has a query tile that keeps nothing (a row of no key unless
    there is text); "shared": the query tiles of a head's second half keep the same key tiles
    (units of several query tiles), those of its first half those and their own."""
    g = torch.Generator().manual_seed(seed)
    if density == "empty":
        kept = torch.rand(heads, nb, nb, generator=g) < 0.3
        kept[torch.arange(heads), torch.arange(heads) % nb] = False
        return kept
    if density == "shared":
        kept = (torch.rand(heads, 1, nb, generator=g) < 0.4).expand(heads, nb, nb).clone()
        kept[:, : nb // 2] |= torch.eye(nb, dtype=torch.bool)[: nb // 2]
        return kept
    return (torch.rand(heads, nb, nb, generator=g) < density) | torch.eye(nb, dtype=torch.bool)


def case(grid="ragged", text_len=0, text_first=True, density=0.4, permuted=True, batch=2, heads=2, dim=16, seed=0):
    """(q, k, v, kept, arguments both functions take): q, k, v (B, S, H, D) float64."""
    grid, block = GRIDS[grid], 16
    n = grid[0] * grid[1] * grid[2]
    q, k, v = structured_qkv(batch, n + text_len, heads, dim, seed=seed, dtype=torch.float64)
    orders = [candidate_orders(grid)[(seed + h) % 6] for h in range(heads)]
    perm = head_permutations(orders, grid) if permuted else None
    kept = kept_blocks(heads, num_blocks(n, block), density, seed)
    return q, k, v, kept, dict(perm=perm, block=block, layout=SequenceLayout(text_len, text_first))


def sparse(q, k, v, kept, **kwargs):
    kv_index, kv_count = kept_block_lists(kept)
    return block_sparse_attention(q, k, v, kv_index=kv_index, kv_count=kv_count, **kwargs)


def max_error(out, expect):
    """Largest difference, relative to the output's largest magnitude."""
    return ((out.double() - expect.double()).abs().max() / expect.double().abs().max()).item()


@pytest.mark.parametrize("qk,pv", FORMATS)
@pytest.mark.parametrize("text_len,text_first", LAYOUTS)
@pytest.mark.parametrize("density", ["empty", "shared", 0.4, 1.0])
def test_float64_equals_reference(qk, pv, text_len, text_first, density):
    for grid, permuted in (("ragged", True), ("whole", False)):
        q, k, v, kept, args = case(grid, text_len, text_first, density, permuted, seed=text_len)
        expect = paro_attention_reference(q, k, v, kept=kept, qk=qk, pv=pv, **args)
        out = sparse(q, k, v, kept, qk=qk, pv=pv, compute_dtype=torch.float64, **args)
        assert out.dtype == torch.float64 and out.shape == q.shape
        assert max_error(out, expect) <= 1e-9, (grid, permuted)


@pytest.mark.parametrize("text_len,text_first", LAYOUTS)
@pytest.mark.parametrize("grid", GRIDS)
def test_float32_within_1e5_of_float64_reference(text_len, text_first, grid):
    q, k, v, kept, args = case(grid, text_len, text_first, density=0.4, seed=1)
    expect = paro_attention_reference(q, k, v, kept=kept, **args)
    q, k, v = (x.float() for x in (q, k, v))
    out = sparse(q, k, v, kept, **args)
    assert out.dtype == torch.float32
    assert max_error(out, expect) <= 1e-5


@pytest.mark.parametrize("qk,pv", FORMATS[1:])
def test_float32_rounds_as_the_reference_does(qk, pv):
    """Against the reference computed in float32 too: only rare rounding flips apart, far below
    the formats' own error (~1e-2 for the 8-bit ones), which a wrong scale or shift would show."""
    q, k, v, kept, args = case("ragged", 7, True, density=0.4, seed=2)
    q, k, v = (x.float() for x in (q, k, v))
    expect = paro_attention_reference(q, k, v, kept=kept, qk=qk, pv=pv, compute_dtype=torch.float32, **args)
    out = sparse(q, k, v, kept, qk=qk, pv=pv, **args)
    assert rel_l2(out, expect) <= 1e-4
    dense = paro_attention_reference(q, k, v, qk=qk, pv=pv, **args)
    assert rel_l2(out, dense) > 1e-2  # the mask matters: a wrong tile list would show


def test_sparse_tiles_differ_from_other_tiles():
    """Same inputs, another mask of the same density: far apart (the comparisons above are not
    blind to which tiles are kept)."""
    q, k, v, kept, args = case("ragged", 0, True, density=0.4, seed=3)
    other = kept_blocks(2, kept.shape[-1], 0.4, seed=4)
    assert max_error(sparse(q, k, v, other, **args), paro_attention_reference(q, k, v, kept=kept, **args)) > 1e-2


@pytest.mark.parametrize("pv", ["fp32", "fp8", "int8"])
def test_tile_with_no_key_outputs_zero(pv):
    """As in the reference: 0, not V's shift (which the 8-bit formats add back to rows that saw a
    key)."""
    q, k, v, kept, args = case("whole", 0, True, density=0.5, seed=5)
    kept[1, 2] = False
    out = sparse(q, k, v + 5.0, kept, qk="int8", pv=pv, **{**args, "perm": None})
    assert torch.equal(out[:, 32:48, 1], torch.zeros_like(out[:, 32:48, 1]))
    assert out[:, :32].abs().min() > 0


@pytest.mark.parametrize("pv", ["fp32", "fp8"])
@pytest.mark.parametrize("text_len,text_first,density", [(0, True, 0.5), (5, False, 0.5), (5, True, "shared")])
def test_small_chunks_change_nothing(pv, text_len, text_first, density):
    """A budget below one unit (one unit per piece; the explicit softmax then takes one query row
    at a time) against one piece per group."""
    q, k, v, kept, args = case("ragged", text_len, text_first, density=density, batch=3, seed=6)
    small = sparse(q, k, v, kept, pv=pv, compute_dtype=torch.float64, max_chunk_elems=1, **args)
    large = sparse(q, k, v, kept, pv=pv, compute_dtype=torch.float64, max_chunk_elems=1 << 30, **args)
    assert max_error(small, large) <= 1e-12


def test_batches_are_independent():
    """Each batch entry equals the same call on that entry alone (batch folding into the tile
    index is where mixing would show)."""
    q, k, v, kept, args = case("ragged", 7, True, density=0.4, batch=3, seed=7)
    both = sparse(q, k, v, kept, compute_dtype=torch.float64, **args)
    for b in range(3):
        one = sparse(q[b : b + 1], k[b : b + 1], v[b : b + 1], kept, compute_dtype=torch.float64, **args)
        assert max_error(both[b : b + 1], one) <= 1e-12


def test_returns_inputs_dtype():
    q, k, v, kept, args = case("ragged", 7, True, seed=8)
    q, k, v = (x.to(torch.bfloat16) for x in (q, k, v))
    out = sparse(q, k, v, kept, qk="int8", pv="fp8", **args)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape


def test_torch_backend_runs_block_sparse():
    """The backend the CPU path uses: float32 compute, what the reference computes."""
    q, k, v, kept, args = case("ragged", 5, False, density=0.4, seed=9)
    kv_index, kv_count = kept_block_lists(kept)
    backend = BACKENDS["torch"].fn
    out = backend(
        q.float(), k.float(), v.float(), kept=kept, kv_index=kv_index, kv_count=kv_count, qk="fp32", pv="fp32", **args
    )
    assert out.dtype == torch.float32
    assert max_error(out, paro_attention_reference(q, k, v, kept=kept, **args)) <= 1e-5
    out64 = backend(q, k, v, kept=kept, kv_index=kv_index, kv_count=kv_count, qk="int8", pv="fp8", **args)
    assert out64.dtype == torch.float64  # float64 inputs keep float64
    assert max_error(out64, paro_attention_reference(q, k, v, kept=kept, qk="int8", pv="fp8", **args)) <= 1e-9


def test_query_tiles_of_equal_key_tiles_form_one_unit():
    """What the comparisons above cover: units of several query tiles (one gathered key run, one
    longer query) where a head's query tiles keep the same key tiles."""
    from paro_kernels.block_sparse import _work

    def unit_sizes(kept):
        kv_index, kv_count = kept_block_lists(kept)
        return sorted(
            m for _, _, m, queries, *_ in _work(kv_index, kv_count, kept.shape[-1], False, 1) for _ in queries
        )

    assert unit_sizes(kept_blocks(2, 7, 1.0, seed=0)) == [7, 7]
    kept = kept_blocks(2, 8, "shared", seed=0)
    expect = sorted(m for h in range(2) for m in torch.unique(kept[h], dim=0, return_counts=True)[1].tolist())
    assert unit_sizes(kept) == expect and expect[-1] >= 4  # a second half at least


def test_compiled_op_takes_a_transposed_query():
    """Under torch.compile(fullgraph=True) the op's output has the strides its fake kernel says,
    also where q, k, v are (B, H, S, D) tensors seen as (B, S, H, D), as CogVideoX passes them."""
    q, k, v, kept, kwargs = case(text_len=7)
    kv_index, kv_count = kept_block_lists(kept)
    layout = kwargs["layout"]
    args = (kwargs["perm"], kv_index, kv_count, 16, layout.text_len, layout.text_first, "fp32", "fp32", torch.float32)

    def attention(*heads_first):  # computed in the graph, then transposed: as a processor makes them
        q, k, v = ((x * 1.0).transpose(1, 2) for x in heads_first)
        return block_sparse_op(q, k, v, *args) * 2.0

    heads_first = [x.float().transpose(1, 2).contiguous() for x in (q, k, v)]
    torch._dynamo.reset()
    with torch._inductor.config.patch(force_disable_caches=True):  # a cached graph keeps an old fake's strides
        compiled = torch.compile(attention, fullgraph=True)(*heads_first)
    assert rel_l2(compiled, 2.0 * sparse(*(x.float() for x in (q, k, v)), kept, **kwargs)) <= 1e-6
