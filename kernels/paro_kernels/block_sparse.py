"""Block-sparse PAROAttention in plain torch: the CPU path (the torch backend), which computes
the kept tiles only.

Same semantics as reference.py, whose docstring states them and which stays the test oracle, and
the same preparation (`reference.paro_inputs`: paro order, channel shifts and balance, rounding of
Q, K and V). The reference scores every key and masks the dropped ones, 1 / density times the work
needed; here the visual part is cut into tiles of `block` rows and each query tile meets only its
kept key tiles:

  1. units: the query tiles of one head that keep the same key tiles (kv_index lists them
     first, ascending; kv_count says how many) share one gathered key run and go as one query
     of m * block rows. Most units of a random mask are one tile; a fully kept head is one unit;
  2. units of one shape (kept count c, m, whether the ragged last tile is kept) go as one
     batched attention, each against its head's text keys followed by its c key tiles, which
     one index_select per piece gathers from the tiles of all heads and batch entries;
  3. when N % block != 0 the last tile is zero-padded; kept, it ends its key run (ascending
     order), so trimming the run drops the padding without a mask; padded query rows are
     computed and never read;
  4. text query rows attend to every key, densely; one gather then writes every row in
     diffusers' layout (the inverse order included); a query tile that keeps no key tile,
     with no text either, outputs 0 as in the reference.

Where P is not rounded (PV fp32: `quantize_probabilities` is the identity) the attention is
`scaled_dot_product_attention`, on CPU a fused flash kernel (4-d inputs); otherwise the
reference's explicit softmax (`reference.attend`), whose row max and row sum then range over the
kept keys alone, as the reference's do. Units go in pieces of about `max_chunk_elems` gathered
keys (and, for the explicit softmax, scores): the bound on extra memory (one unit at least; the
explicit softmax then splits its query rows), small enough that a piece's keys and scores stay in
cache between the gather and the products.
"""

from __future__ import annotations

import torch

from .layout import SequenceLayout, num_blocks, visual_rows
from .reference import attend, paro_inputs


def _tiles(x: torch.Tensor, block: int, nb: int) -> torch.Tensor:
    """(B, H, N, D) -> (B * H * nb, block, D), tile b * H * nb + h * nb + i; the last tile of
    each head zero-padded to `block` rows."""
    b, h, n, d = x.shape
    if n != nb * block:
        x = torch.nn.functional.pad(x, (0, 0, 0, nb * block - n))
    return x.reshape(b * h * nb, block, d)


def _work(kv_index: torch.Tensor, kv_count: torch.Tensor, nb: int, ragged: bool, bsz: int) -> list[tuple]:
    """The visual query tiles as units of work, grouped by shape. A unit is the query tiles of one
    head that keep the same key tiles: one gathered key run serves them all, as one query of
    m * block rows (m = 1 for most units of a random mask; every row of a fully kept head is one
    unit). Per group (count, ends_ragged, m, queries (U, m), keys (U, count), heads (U,)), one row
    per unit and batch entry: its query tiles and key tiles as b * H * nb + h * nb + i, and its
    b * H + h; ends_ragged: the ragged last tile is among the keys."""
    device = kv_count.device
    heads = kv_count.shape[0]
    count = kv_count.reshape(-1).long()
    index = kv_index.reshape(-1, nb)
    head = torch.arange(heads, device=device).repeat_interleave(nb)
    # Units: the query tiles of one head with equal key sets (padded with nb past their count).
    key_sets = torch.where(torch.arange(nb, device=device) < count[:, None], index, nb)
    unit = torch.unique(torch.cat([head[:, None], key_sets], dim=1), dim=0, return_inverse=True)[1]
    members = torch.argsort(unit, stable=True)  # a unit's tiles together, ascending
    new = torch.ones(members.numel(), dtype=torch.bool, device=device)
    new[1:] = unit[members[1:]] != unit[members[:-1]]
    start = new.nonzero()[:, 0]
    size = torch.diff(start, append=start.new_tensor([members.numel()]))

    # Units sorted by shape, then every unit's indices at once (padded to the largest m and
    # count), one row per unit and batch entry; a group's are a slice of them.
    first = members[start]  # each unit's first query tile
    unit_count = count[first]
    ends_ragged = (unit_count > 0) & (index[first, (unit_count - 1).clamp_min(0)] == nb - 1) & ragged
    shape, order = torch.sort((unit_count * 2 + ends_ragged.long()) * (nb + 1) + size, stable=True)
    shapes, units = torch.unique_consecutive(shape, return_counts=True)
    start, first = start[order], first[order]
    batch = torch.arange(bsz, device=device)[None, :, None]
    slots = torch.arange(int(size.max()), device=device)
    queries = members[(start[:, None] + slots).clamp_max(members.numel() - 1)]
    queries = (queries[:, None] + batch * (heads * nb)).flatten(0, 1)
    keys = index[first, : int(unit_count.max())] + (head[first] * nb)[:, None]
    keys = (keys[:, None] + batch * (heads * nb)).flatten(0, 1)
    unit_heads = (head[first][:, None] + batch.view(1, bsz) * heads).flatten()
    groups, begin = [], 0
    for key, g in zip(shapes.tolist(), units.tolist()):
        c, m, end = key // (nb + 1) // 2, key % (nb + 1), begin + g * bsz
        groups.append(
            (c, key // (nb + 1) % 2 == 1, m, queries[begin:end, :m], keys[begin:end, :c], unit_heads[begin:end])
        )
        begin = end
    return groups


def _attention(q, k, v, v_shift, scale: float, pv: str, max_scores: int) -> torch.Tensor:
    """softmax(q k^T * scale) (v + v_shift) over all keys, P rounded to `pv`: q (B, H, L, D),
    k and v (B, H, L', D), v_shift (B, H, 1, D)."""
    if pv == "fp32":
        # P unrounded (quantize_probabilities is the identity) and V unshifted: the fused kernel,
        # which holds no score matrix. 4-d inputs: CPU SDPA takes its flash kernel only for those.
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
    # The explicit softmax holds its scores: query rows in pieces of at most max_scores of them.
    rows = max(1, max_scores // (q.shape[0] * q.shape[1] * k.shape[2]))
    return torch.cat(
        [attend(q[:, :, r : r + rows], k, v, v_shift, None, scale, pv) for r in range(0, q.shape[2], rows)], 2
    )


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    perm: torch.Tensor | None,
    kv_index: torch.Tensor,
    kv_count: torch.Tensor,
    block: int,
    layout: SequenceLayout = SequenceLayout(),
    qk: str = "fp32",
    pv: str = "fp32",
    scale: float | None = None,
    compute_dtype: torch.dtype = torch.float32,
    max_chunk_elems: int = 1 << 19,
) -> torch.Tensor:
    """The reference's attention (`paro_attention_reference` with kept = the tiles listed),
    computing kept tiles only.

    q, k, v: (B, S, H, D) as diffusers passes them. perm: (H, N) visual order per head, None for
    arrival order. kv_index: (H, nb, nb) int, per query tile its kept key tiles first, ascending;
    kv_count: (H, nb) int, how many (layout.kept_block_lists). Returns (B, S, H, D) in q's dtype.
    """
    bsz, seq, heads, dim = q.shape
    device, text_len = q.device, layout.text_len
    n = layout.visual_len(seq)
    nb = num_blocks(n, block)
    pad = nb * block - n
    scale = dim**-0.5 if scale is None else scale
    qt, qv, kt, kv, vt, vv, v_shift = paro_inputs(
        q, k, v, perm=perm, block=block, layout=layout, qk=qk, pv=pv, compute_dtype=compute_dtype
    )
    q_tiles, k_tiles, v_tiles = (_tiles(x, block, nb) for x in (qv, kv, vv))
    k_text, v_text = (x.reshape(bsz * heads, text_len, dim) for x in (kt, vt))
    shifts = v_shift.reshape(bsz * heads, 1, dim)

    pieces, done = [], []  # tile outputs in the order computed, and which tiles they are
    for count, ends_ragged, m, q_index, k_index, head_index in _work(
        kv_index.to(device), kv_count.to(device), nb, pad > 0, bsz
    ):
        if count == 0 and text_len == 0:
            continue  # no key at all: these rows output 0
        length = text_len + count * block - (pad if ends_ragged else 0)  # keys per unit
        step = max(1, max_chunk_elems // (length * max(dim, m * block)))  # units per piece: keys and scores
        for start in range(0, q_index.shape[0], step):
            part = slice(start, start + step)
            g = q_index[part].shape[0]
            k_, v_ = (
                x.index_select(0, k_index[part].reshape(-1)).view(1, g, count * block, dim) for x in (k_tiles, v_tiles)
            )
            k_, v_ = k_[:, :, : length - text_len], v_[:, :, : length - text_len]  # a ragged tile's padding
            if text_len:
                k_ = torch.cat([k_text.index_select(0, head_index[part])[None], k_], dim=2)
                v_ = torch.cat([v_text.index_select(0, head_index[part])[None], v_], dim=2)
            q_ = q_tiles.index_select(0, q_index[part].reshape(-1)).view(1, g, m * block, dim)
            o = _attention(q_, k_, v_, shifts.index_select(0, head_index[part])[None], scale, pv, max_chunk_elems)
            pieces.append(o.view(-1, dim))
            done.append(q_index[part].reshape(-1))

    # Text rows attend to every key.
    text_out = qt
    if text_len:
        text_out = _attention(qt, torch.cat([kt, kv], 2), torch.cat([vt, vv], 2), v_shift, scale, pv, max_chunk_elems)
    # One gather writes the output in diffusers' layout from the rows of: the tile outputs in the
    # order computed, the text rows' outputs (b, h, t), a zero row (for tiles that see no key).
    out_rows = torch.cat(pieces + [text_out.reshape(-1, dim), qv.new_zeros(1, dim)])
    text_row = out_rows.shape[0] - 1 - bsz * heads * text_len
    position = torch.full((bsz * heads * nb,), -1, dtype=torch.long, device=device)
    if done:
        done = torch.cat(done)
        position[done] = torch.arange(done.numel(), device=device)

    j = torch.arange(n, device=device)
    tile_position = position.view(bsz, heads, nb)[:, :, j // block]  # (B, H, N), paro order
    source = torch.where(tile_position >= 0, tile_position * block + j % block, out_rows.shape[0] - 1)
    index = torch.empty(bsz, seq * heads, dtype=torch.long, device=device)
    if perm is None:
        perm = j.expand(heads, n)
    index[:, visual_rows(layout, perm.to(device)).reshape(-1)] = source.reshape(bsz, heads * n)
    if text_len:
        text_source = text_row + torch.arange(bsz * heads * text_len, device=device).view(bsz, heads, text_len)
        layout.split(index.view(bsz, seq, heads), dim=1)[0].copy_(text_source.transpose(1, 2))
    return out_rows.index_select(0, index.view(-1)).view(bsz, seq, heads, dim).to(q.dtype)


@torch.library.custom_op("paro::block_sparse_attention", mutates_args=())
def block_sparse_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    perm: torch.Tensor | None,
    kv_index: torch.Tensor,
    kv_count: torch.Tensor,
    block: int,
    text_len: int,
    text_first: bool,
    qk: str,
    pv: str,
    compute_dtype: torch.dtype,
) -> torch.Tensor:
    """block_sparse_attention as a torch custom op: its grouping of tiles depends on the masks'
    values, so torch.compile(fullgraph=True) takes it as one opaque call with a known output,
    contiguous whatever q's strides (a transposed view, as CogVideoX passes it)."""
    return block_sparse_attention(
        q,
        k,
        v,
        perm=perm,
        kv_index=kv_index,
        kv_count=kv_count,
        block=block,
        layout=SequenceLayout(text_len, text_first),
        qk=qk,
        pv=pv,
        compute_dtype=compute_dtype,
    ).contiguous()


@block_sparse_op.register_fake
def _(q, k, v, perm, kv_index, kv_count, block, text_len, text_first, qk, pv, compute_dtype):
    return q.new_empty(q.shape)
