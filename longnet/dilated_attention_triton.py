"""Dilated attention in Triton: every branch, segment, head and batch row in one launch per direction.

The kept positions of branch ``(w, r)`` for head ``h`` in segment ``s`` are the rows
``s*w + (h mod r) + r*j`` of the inputs: a strided row set, read in place by the kernels (no gathered
copies, any strides, the model's ``(B, L, H, D)`` storage included). Each such row set is one short
causal (or bidirectional) attention; a work list of 128-row tiles over all of them, built once per
shape and cached, drives one forward launch, and each tile writes its branch's output and
log-sum-exp to a compact buffer. One small pass then merges the branches of every (position, head)
by log-sum-exp (paper Eq. 10).

Backward recomputes every branch against the merged output and log-sum-exp, which is the gradient of
one softmax over the multiset union of the branches' keys: exact, mixing weights included. One launch
computes, per tile, the key/value gradients of a key block (64 or 128 rows: a launch setting) and
either the query gradient of the query block with the same index or (a launch setting, faster at
D = 64) each query block's share of it inside the key/value loop, and adds them (atomically: a position belongs to
several branches, and a key/value head serves ``group`` query heads) into float32 accumulators, taken
a slice of heads at a time for long inputs (``ACCUMULATOR_BYTES``). Branches of low rate may instead
take the device's own attention backward (flash on CUDA) on strided views of the inputs
(``BACKWARD_FLASH_RATES``, a launch setting), adding into the same accumulators.

Triton is optional: without it this module imports, ``AVAILABLE`` is False and the dispatcher never
picks it. With ``TRITON_INTERPRET=1`` set before the import, the kernels run on CPU tensors through
Triton's interpreter (the tests use that; its ``tl.dot`` is exact in fp32 and fp16, not in bf16).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

from .dilated_attention_sdpa import add_strided_gradients, split_covering

try:
    import triton
    import triton.language as tl
except ImportError:  # the package works without triton; this path is then unavailable
    triton = tl = None

AVAILABLE = triton is not None
# Interpreted kernels take CPU tensors; compiled ones take CUDA tensors.
INTERPRETED = AVAILABLE and bool(triton.knobs.runtime.interpret if hasattr(triton, "knobs") else False)
# Rows of a forward tile (its query block); the backward's key block is a launch setting.
TILE_ROWS = 128
# Head sizes the kernels take: tl.arange needs a power of two; larger ones run out of registers.
HEAD_DIMS = (16, 32, 64, 128)


def _jit(function):
    return triton.jit(function) if AVAILABLE else function


def unsupported_reason(query: torch.Tensor, key: torch.Tensor) -> str | None:
    """Why the Triton path cannot take these inputs, or None when it can."""
    if not AVAILABLE:
        return "triton is not installed (pip install 'longnet-transformers[cuda]')"
    if query.device.type != ("cpu" if INTERPRETED else "cuda"):
        where = "CPU tensors (TRITON_INTERPRET=1 is set)" if INTERPRETED else "CUDA tensors"
        return f"the Triton kernels take {where}, got tensors on {query.device}"
    if query.shape[-1] not in HEAD_DIMS:
        return f"the Triton kernels take head sizes {HEAD_DIMS}, got {query.shape[-1]}"
    if query.shape[2] != key.shape[2]:
        return "the Triton kernels take queries and keys of one length (no KV cache)"
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the Triton kernels take float16, bfloat16 and float32, got {query.dtype}"
    return None


# --------------------------------------------------------------------------------------------------
# Work lists


class _Plan:
    """Per shape: the branch table and the tile list, on the device.

    ``table`` (int64, one row per branch): w, r, segments, slots (``ceil(w/r)``), and the first
    row of the branch in the compact buffers, laid out ``(B*H, segments, slots)``. ``tiles`` (int32,
    one row per tile): branch, ``b*H + h``, segment, block of ``rows`` kept positions; heaviest causal
    blocks first. The heads are ``first_head + h``: a slice of the heads keeps their dilation offsets
    (``head mod r``)."""

    def __init__(
        self, batch: int, heads: int, length: int, branches: Sequence[tuple[int, int]], first_head: int, rows: int
    ) -> None:
        table, tiles, base = [], [], 0
        head = torch.arange(heads)
        for number, (w, r) in enumerate(branches):
            segments, slots = -(-length // w), -(-w // r)
            table.append((w, r, segments, slots, base))
            base += batch * heads * segments * slots
            segment = torch.arange(segments).view(segments, 1)
            span = torch.clamp(length - segment * w, max=w)  # positions in the segment
            kept = torch.clamp(span - (first_head + head) % r + r - 1, min=0) // r  # (segments, H)
            blocks = -(-kept // rows)
            seg_of, head_of = (x.flatten() for x in torch.meshgrid(torch.arange(segments), head, indexing="ij"))
            count = blocks.flatten()
            seg_of, head_of = seg_of.repeat_interleave(count), head_of.repeat_interleave(count)
            block_of = torch.arange(int(count.sum())) - torch.repeat_interleave(torch.cumsum(count, 0) - count, count)
            for b in range(batch):
                tiles.append(torch.stack([torch.full_like(seg_of, number), b * heads + head_of, seg_of, block_of], 1))
        tiles = torch.cat(tiles)
        tiles = tiles[torch.argsort(tiles[:, 3], descending=True, stable=True)]
        self.compact_rows = base
        self.table = torch.tensor(table, dtype=torch.int64)
        self.tiles = tiles.to(torch.int32).contiguous()
        self.on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self.on_device:
            self.on_device[device] = (self.table.to(device), self.tiles.to(device))
        return self.on_device[device]


@functools.lru_cache(maxsize=16)
def _plan(
    batch: int, heads: int, length: int, branches: tuple[tuple[int, int], ...], first_head: int, rows: int
) -> _Plan:
    return _Plan(batch, heads, length, branches, first_head, rows)


# --------------------------------------------------------------------------------------------------
# Kernels


@_jit
def _tile_of(TILES, TABLE, tile, heads, first_head, group, length):
    """The tile's branch parameters and row set: batch row, head, key/value head, first position,
    stride between kept positions, kept count, block, and the compact buffer's first row. Heads count
    from ``first_head`` (a slice of the heads) for the dilation offset only."""
    branch = tl.load(TILES + tile * 4)
    bh = tl.load(TILES + tile * 4 + 1)
    segment = tl.load(TILES + tile * 4 + 2)
    block = tl.load(TILES + tile * 4 + 3)
    w = tl.load(TABLE + branch * 5).to(tl.int32)
    r = tl.load(TABLE + branch * 5 + 1).to(tl.int32)
    segments = tl.load(TABLE + branch * 5 + 2).to(tl.int32)
    slots = tl.load(TABLE + branch * 5 + 3).to(tl.int32)
    base = tl.load(TABLE + branch * 5 + 4)
    head = bh % heads
    offset = (first_head + head) % r
    first = segment * w + offset
    kept = (tl.minimum(w, length - segment * w) - offset + r - 1) // r
    compact = base + (bh.to(tl.int64) * segments + segment) * slots
    return bh // heads, head, head // group, first, r, kept, block, compact


@_jit
def _forward_block(
    acc, l_i, m_i, q, k_rows, v_rows, stride_kl, stride_vl, first, r, kept, rows_m, lo, hi, scale_log2,
    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    dims = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        rows_n = start_n + tl.arange(0, BLOCK_N)
        position = (first + rows_n * r).to(tl.int64)
        if MASKED:
            in_range = rows_n < kept
            k = tl.load(k_rows + position[None, :] * stride_kl + dims[:, None], mask=in_range[None, :], other=0.0)
            v = tl.load(v_rows + position[:, None] * stride_vl + dims[None, :], mask=in_range[:, None], other=0.0)
        else:
            k = tl.load(k_rows + position[None, :] * stride_kl + dims[:, None])
            v = tl.load(v_rows + position[:, None] * stride_vl + dims[None, :])
        s = tl.dot(q, k, input_precision=PRECISION) * scale_log2
        if MASKED:
            allowed = in_range[None, :]
            if IS_CAUSAL:
                allowed = allowed & (rows_n[None, :] <= rows_m[:, None])
            s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@_jit
def _forward_kernel(
    Q, K, V, BRANCH_OUT, BRANCH_LSE, TABLE, TILES,
    stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
    heads, group, length, scale_log2,
    IS_CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """One tile: ``BLOCK_M`` kept queries of one (branch, batch row, segment, head) against that row
    set's keys; writes the branch output and log-sum-exp (natural log) to the compact buffers."""
    b, head, kv_head, first, r, kept, block, compact = _tile_of(TILES, TABLE, tl.program_id(0), heads, 0, group, length)
    dims = tl.arange(0, HEAD_DIM)
    rows_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    in_range = rows_m < kept
    position = (first + rows_m * r).to(tl.int64)
    q_rows = Q + b.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
    q = tl.load(q_rows + position[:, None] * stride_ql + dims[None, :], mask=in_range[:, None], other=0.0)
    k_rows = K + b.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_rows = V + b.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    # Key blocks every query of the tile sees whole, unmasked; then the rest, masked.
    whole = block * BLOCK_M if IS_CAUSAL else kept // BLOCK_N * BLOCK_N
    end = tl.minimum((block + 1) * BLOCK_M, kept) if IS_CAUSAL else kept
    acc, l_i, m_i = _forward_block(
        acc, l_i, m_i, q, k_rows, v_rows, stride_kl, stride_vl, first, r, kept, rows_m, 0, whole, scale_log2,
        False, IS_CAUSAL, HEAD_DIM, BLOCK_N, PRECISION,
    )  # fmt: skip
    acc, l_i, m_i = _forward_block(
        acc, l_i, m_i, q, k_rows, v_rows, stride_kl, stride_vl, first, r, kept, rows_m, whole, end, scale_log2,
        True, IS_CAUSAL, HEAD_DIM, BLOCK_N, PRECISION,
    )  # fmt: skip
    l_i = tl.where(in_range, l_i, 1.0)
    out = acc / l_i[:, None]
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
    row = compact + rows_m
    tl.store(BRANCH_OUT + row[:, None] * HEAD_DIM + dims[None, :], out.to(BRANCH_OUT.dtype.element_ty),
             mask=in_range[:, None])  # fmt: skip
    tl.store(BRANCH_LSE + row, lse, mask=in_range)


@_jit
def _branch_rows(TABLE, branch, bh, head, t, length):
    """Which positions ``t`` of (batch row, head) ``bh`` take part in ``branch``, and their compact rows.
    Positions, segment lengths and rates divide as 32-bit integers (64-bit division is emulated on GPUs);
    only the compact row is 64-bit."""
    w = tl.load(TABLE + branch * 5).to(tl.int32)
    r = tl.load(TABLE + branch * 5 + 1).to(tl.int32)
    segments = tl.load(TABLE + branch * 5 + 2)
    slots = tl.load(TABLE + branch * 5 + 3)
    base = tl.load(TABLE + branch * 5 + 4)
    within = t % w
    takes_part = (within % r == head % r) & (t < length)
    row = base + (bh.to(tl.int64) * segments + t // w) * slots + within // r
    return takes_part, row


@_jit
def _merge_kernel(
    BRANCH_OUT, BRANCH_LSE, TABLE, OUT, LSE, n_branches, heads, length,
    stride_ob, stride_oh, stride_ol, stride_lb, stride_lh,
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """Mixes the branches of ``BLOCK_T`` positions of one (batch row, head) by log-sum-exp; positions no
    branch covers get output 0 and log-sum-exp -inf."""
    bh = tl.program_id(1)
    b, head = bh // heads, bh % heads
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    dims = tl.arange(0, HEAD_DIM)
    # One pass with a running maximum (flash attention's rescaling), so each branch's rows are found once.
    top = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
    total = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc = tl.zeros([BLOCK_T, HEAD_DIM], dtype=tl.float32)
    for branch in range(n_branches):
        takes_part, row = _branch_rows(TABLE, branch, bh, head, t, length)
        branch_lse = tl.load(BRANCH_LSE + row, mask=takes_part, other=float("-inf"))
        new_top = tl.maximum(top, branch_lse)
        reference = tl.where(new_top == float("-inf"), 0.0, new_top)
        rescale = tl.math.exp(top - reference)
        weight = tl.math.exp(branch_lse - reference)
        part = tl.load(BRANCH_OUT + row[:, None] * HEAD_DIM + dims[None, :], mask=takes_part[:, None], other=0.0)
        total = total * rescale + weight
        acc = acc * rescale[:, None] + weight[:, None] * part.to(tl.float32)
        top = new_top
    covered = total > 0
    out = acc / tl.where(covered, total, 1.0)[:, None]
    lse = tl.where(covered, top + tl.math.log(tl.where(covered, total, 1.0)), float("-inf"))
    position = t.to(tl.int64)
    out_rows = OUT + b.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
    tl.store(out_rows + position[:, None] * stride_ol + dims[None, :], out.to(OUT.dtype.element_ty),
             mask=(t < length)[:, None])  # fmt: skip
    tl.store(LSE + b.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh + position, lse, mask=t < length)


@_jit
def _delta_kernel(
    OUT, GRAD_OUT, DELTA, heads, length,
    stride_ob, stride_oh, stride_ol, stride_gb, stride_gh, stride_gl,
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """``delta = rowsum(grad_out * out)`` (float32, ``(B, H, L)`` contiguous): the softmax backward's
    correction term, taken from the merged output so that every branch's backward is exact."""
    bh = tl.program_id(1)
    b, head = (bh // heads).to(tl.int64), (bh % heads).to(tl.int64)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    dims = tl.arange(0, HEAD_DIM)
    position = t.to(tl.int64)
    mask = (t < length)[:, None]
    out = tl.load(OUT + b * stride_ob + head * stride_oh + position[:, None] * stride_ol + dims[None, :], mask=mask)
    grad = tl.load(
        GRAD_OUT + b * stride_gb + head * stride_gh + position[:, None] * stride_gl + dims[None, :], mask=mask
    )
    delta = tl.sum(out.to(tl.float32) * grad.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * length + position, delta, mask=t < length)


@_jit
def _backward_kv_block(
    grad_k, grad_v, k, v, q_rows, g_rows, lse_rows, delta_rows, dq_rows, stride_ql, stride_gl, stride_dql, first, r,
    kept, rows_n, lo, hi, scale, scale_log2,
    CAUSAL_MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M1: tl.constexpr, PRECISION: tl.constexpr,
    DQ_IN_KV_LOOP: tl.constexpr,
):  # fmt: skip
    dims = tl.arange(0, HEAD_DIM)
    for start_m in range(lo, hi, BLOCK_M1):
        rows_m = start_m + tl.arange(0, BLOCK_M1)
        in_range = rows_m < kept
        position = (first + rows_m * r).to(tl.int64)
        q_t = tl.load(q_rows + position[None, :] * stride_ql + dims[:, None], mask=in_range[None, :], other=0.0)
        grad_out = tl.load(g_rows + position[:, None] * stride_gl + dims[None, :], mask=in_range[:, None], other=0.0)
        # Rows past the end get an infinite log-sum-exp: probability 0.
        lse = tl.load(lse_rows + position, mask=in_range, other=float("inf"))
        delta = tl.load(delta_rows + position, mask=in_range, other=0.0)
        p_t = tl.math.exp2(tl.dot(k, q_t, input_precision=PRECISION) * scale_log2 - lse[None, :] * 1.4426950408889634)
        if CAUSAL_MASK:
            p_t = tl.where(rows_n[:, None] <= rows_m[None, :], p_t, 0.0)
        grad_v = tl.dot(p_t.to(grad_out.dtype), grad_out, grad_v, input_precision=PRECISION)
        grad_p_t = tl.dot(v, tl.trans(grad_out), input_precision=PRECISION)
        grad_s_t = p_t * (grad_p_t - delta[None, :])
        grad_k = tl.dot(grad_s_t.to(q_t.dtype), tl.trans(q_t), grad_k, input_precision=PRECISION)
        if DQ_IN_KV_LOOP:
            grad_q = tl.dot(tl.trans(grad_s_t.to(k.dtype)), k, input_precision=PRECISION)
            dq_target = dq_rows + position[:, None] * stride_dql + dims[None, :]
            tl.atomic_add(dq_target, grad_q * scale, mask=in_range[:, None], sem="relaxed")
    return grad_k, grad_v


@_jit
def _backward_kernel(
    Q, K, V, GRAD_OUT, LSE, DELTA, GRAD_Q, GRAD_K, GRAD_V, TABLE, TILES,
    stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
    stride_gb, stride_gh, stride_gl, stride_lb, stride_lh,
    stride_dqb, stride_dqh, stride_dql, stride_dkb, stride_dkh, stride_dkl,
    heads, first_head, group, length, scale, scale_log2,
    IS_CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_M1: tl.constexpr, BLOCK_N2: tl.constexpr, PRECISION: tl.constexpr, DQ_IN_KV_LOOP: tl.constexpr,
):  # fmt: skip
    """One tile: the key/value gradients of key block ``block`` of a row set (looping over its query
    blocks of ``BLOCK_M1``) and the query gradient of query block ``block`` (looping over key blocks
    of ``BLOCK_N2``), both against the merged log-sum-exp and ``delta``, added into the accumulators.
    With ``DQ_IN_KV_LOOP`` the key/value loop also adds each query block's share of the query gradient
    (flash attention 2's order: five products per pair instead of seven, more atomic adds)."""
    tile = tl.program_id(0)
    if DQ_IN_KV_LOOP:  # the work is then the key/value loop alone: heaviest first is lowest block first
        tile = tl.num_programs(0) - 1 - tile
    b, head, kv_head, first, r, kept, block, _ = _tile_of(TILES, TABLE, tile, heads, first_head, group, length)
    b = b.to(tl.int64)
    dims = tl.arange(0, HEAD_DIM)
    q_rows = Q + b * stride_qb + head.to(tl.int64) * stride_qh
    g_rows = GRAD_OUT + b * stride_gb + head.to(tl.int64) * stride_gh
    lse_rows = LSE + b * stride_lb + head.to(tl.int64) * stride_lh
    delta_rows = DELTA + b * stride_lb + head.to(tl.int64) * stride_lh  # laid out like the log-sum-exp
    dq_rows = GRAD_Q + b * stride_dqb + head.to(tl.int64) * stride_dqh
    k_rows = K + b * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_rows = V + b * stride_vb + kv_head.to(tl.int64) * stride_vh

    # Key/value gradients of this key block: the queries of the diagonal block (causal mask), then the rest.
    rows_n = block * BLOCK + tl.arange(0, BLOCK)
    n_in_range = rows_n < kept
    position_n = (first + rows_n * r).to(tl.int64)
    k = tl.load(k_rows + position_n[:, None] * stride_kl + dims[None, :], mask=n_in_range[:, None], other=0.0)
    v = tl.load(v_rows + position_n[:, None] * stride_vl + dims[None, :], mask=n_in_range[:, None], other=0.0)
    grad_k = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)
    grad_v = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)
    lo = block * BLOCK if IS_CAUSAL else 0
    if IS_CAUSAL:
        grad_k, grad_v = _backward_kv_block(
            grad_k, grad_v, k, v, q_rows, g_rows, lse_rows, delta_rows, dq_rows, stride_ql, stride_gl, stride_dql,
            first, r, kept, rows_n, lo, tl.minimum(lo + BLOCK, kept), scale, scale_log2,
            True, HEAD_DIM, BLOCK_M1, PRECISION, DQ_IN_KV_LOOP,
        )  # fmt: skip
        lo += BLOCK
    grad_k, grad_v = _backward_kv_block(
        grad_k, grad_v, k, v, q_rows, g_rows, lse_rows, delta_rows, dq_rows, stride_ql, stride_gl, stride_dql,
        first, r, kept, rows_n, lo, kept, scale, scale_log2, False, HEAD_DIM, BLOCK_M1, PRECISION, DQ_IN_KV_LOOP,
    )  # fmt: skip
    kv_target = b * stride_dkb + kv_head.to(tl.int64) * stride_dkh + position_n[:, None] * stride_dkl + dims[None, :]
    tl.atomic_add(GRAD_K + kv_target, grad_k * scale, mask=n_in_range[:, None], sem="relaxed")
    tl.atomic_add(GRAD_V + kv_target, grad_v, mask=n_in_range[:, None], sem="relaxed")
    if DQ_IN_KV_LOOP:
        return

    # Query gradient of the query block with the same index.
    rows_m = block * BLOCK + tl.arange(0, BLOCK)
    m_in_range = rows_m < kept
    position_m = (first + rows_m * r).to(tl.int64)
    q = tl.load(q_rows + position_m[:, None] * stride_ql + dims[None, :], mask=m_in_range[:, None], other=0.0)
    grad_out = tl.load(g_rows + position_m[:, None] * stride_gl + dims[None, :], mask=m_in_range[:, None], other=0.0)
    lse = tl.load(lse_rows + position_m, mask=m_in_range, other=float("inf"))
    delta = tl.load(delta_rows + position_m, mask=m_in_range, other=0.0)
    grad_q = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)
    hi = tl.minimum((block + 1) * BLOCK, kept) if IS_CAUSAL else kept
    for start_n in range(0, hi, BLOCK_N2):
        key_rows = start_n + tl.arange(0, BLOCK_N2)
        key_in_range = key_rows < kept
        key_position = (first + key_rows * r).to(tl.int64)
        k_t = tl.load(k_rows + key_position[None, :] * stride_kl + dims[:, None], mask=key_in_range[None, :], other=0.0)
        v_t = tl.load(v_rows + key_position[None, :] * stride_vl + dims[:, None], mask=key_in_range[None, :], other=0.0)
        p = tl.math.exp2(tl.dot(q, k_t, input_precision=PRECISION) * scale_log2 - lse[:, None] * 1.4426950408889634)
        allowed = key_in_range[None, :]
        if IS_CAUSAL:
            allowed = allowed & (key_rows[None, :] <= rows_m[:, None])
        p = tl.where(allowed, p, 0.0)
        grad_s = p * (tl.dot(grad_out, v_t, input_precision=PRECISION) - delta[:, None])
        grad_q = tl.dot(grad_s.to(k_t.dtype), tl.trans(k_t), grad_q, input_precision=PRECISION)
    q_target = b * stride_dqb + head.to(tl.int64) * stride_dqh + position_m[:, None] * stride_dql + dims[None, :]
    tl.atomic_add(GRAD_Q + q_target, grad_q * scale, mask=m_in_range[:, None], sem="relaxed")


# --------------------------------------------------------------------------------------------------
# Launchers: the path's interface (the same as the other fused paths')

# Launch settings by head size: forward (key block, warps, stages) and backward (query block of the
# key/value loop, key block of the query loop, warps, stages, query gradient in the key/value loop,
# rows of a tile's key block); other head sizes use the first entry. Chosen by the sweep in
# scripts/run_cuda_checks.sh on an H100 (docs/benchmarks/cuda_checks.log) among the candidates below:
# the query gradient inside the key/value loop is 4% faster at D = 64 and 2.5% slower at D = 128,
# both beyond the spread between rounds.
FORWARD_CONFIGS = {64: (64, 4, 3), 128: (64, 8, 3)}
BACKWARD_CONFIGS = {64: (64, 64, 8, 3, True, 128), 128: (32, 32, 8, 3, False, 128)}
# The merge pass (and the backward's delta pass): positions per program, warps.
MERGE_CONFIG = (32, 4)
# What the sweep tries, by head size (the tests check every candidate against the reference). The
# backward's untimed ones: smaller key blocks (more tiles, fewer registers per tile) and Triton's
# tutorial flash attention backward's shape on Hopper (key block 128, query block 32, 4 warps, 5 stages).
# The forward's untimed ones: two warp groups per 128-row tile (Hopper's wgmma takes 64 rows per warp group).
FORWARD_CANDIDATES = {64: [(64, 4, 3), (128, 4, 3), (64, 8, 3), (128, 8, 3)], 128: [(64, 8, 3), (32, 8, 3)]}
BACKWARD_CANDIDATES = {
    64: [
        (64, 64, 8, 3, True, 128),
        (32, 64, 4, 3, False, 128),
        (32, 64, 8, 3, True, 128),
        (32, 64, 4, 5, True, 128),
        (64, 64, 4, 3, True, 64),
        (32, 32, 4, 3, False, 64),
    ],
    128: [(32, 32, 8, 3, False, 128), (32, 32, 8, 3, True, 128), (32, 32, 4, 3, False, 64)],
}
MERGE_CANDIDATES = [(32, 4), (64, 4), (128, 4), (128, 8), (256, 8)]
# By head size: branches whose rate is at most this take the backward of the device's own attention
# kernel (on CUDA in half precision the flash kernel, whose backward ran at 1.5x the Triton backward's
# FLOP rate on an H100 while the two forwards matched, at 32K) on strided views, one call per head
# residue, instead of the Triton kernel; 0: none. Of the paper's branches' pairs, r = 1 has 48% and
# r <= 2 72%, r <= 4 84% (12: all, as the sdpa path's backward, one call per branch and residue). Only
# where each query head has its own key/value head (the calls' views need one per head).
BACKWARD_FLASH_RATES = {64: 0, 128: 0}
BACKWARD_FLASH_RATE_CANDIDATES = [0, 1, 2, 4, 12]
# The most memory the backward's float32 gradient accumulators take at once: longer inputs are done a
# slice of key/value heads (with their query heads) at a time, each slice cast to the input dtype
# before the next starts (at 4M tokens, 12 heads, D = 64 all three would take 39 GB at once).
ACCUMULATOR_BYTES = 4 << 30


def _config(configs: dict, head_dim: int) -> tuple[int, ...]:
    return configs.get(head_dim, next(iter(configs.values())))


def _launch_options(warps: int, stages: int) -> dict:
    # The interpreter takes no compiler options.
    return {} if INTERPRETED else {"num_warps": warps, "num_stages": stages}


def _precision(query: torch.Tensor) -> str:
    # float32 inputs get exact products, not TF32's 10-bit mantissas.
    return "ieee" if query.dtype == torch.float32 else "tf32"


def _strides(tensor: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, position) strides; the head dimension must be contiguous."""
    return tensor.stride(0), tensor.stride(1), tensor.stride(2)


def _unit_last_stride(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    branches: Sequence[tuple[int, int]],
    is_causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output ``(B, H, L, D)`` in the input dtype (laid out like ``query``) and float32 log-sum-exp
    ``(B, H, L)`` of all branches merged."""
    query, key, value = (_unit_last_stride(x) for x in (query, key, value))
    batch, heads, length, head_dim = query.shape
    plan = _plan(batch, heads, length, tuple(branches), 0, TILE_ROWS)
    table, tiles = plan.tensors(query.device)
    branch_out = torch.empty(plan.compact_rows, head_dim, dtype=query.dtype, device=query.device)
    branch_lse = torch.empty(plan.compact_rows, dtype=torch.float32, device=query.device)
    block_n, warps, stages = _config(FORWARD_CONFIGS, head_dim)
    _forward_kernel[(tiles.shape[0],)](
        query, key, value, branch_out, branch_lse, table, tiles,
        *_strides(query), *_strides(key), *_strides(value),
        heads, heads // key.shape[1], length, scale * math.log2(math.e),
        IS_CAUSAL=is_causal, HEAD_DIM=head_dim, BLOCK_M=TILE_ROWS, BLOCK_N=block_n,
        PRECISION=_precision(query), **_launch_options(warps, stages),
    )  # fmt: skip
    out = torch.empty_like(query)
    lse = torch.empty(batch, heads, length, dtype=torch.float32, device=query.device)
    block_t, warps = MERGE_CONFIG
    _merge_kernel[(triton.cdiv(length, block_t), batch * heads)](
        branch_out, branch_lse, table, out, lse, len(branches), heads, length,
        *_strides(out), lse.stride(0), lse.stride(1), HEAD_DIM=head_dim, BLOCK_T=block_t,
        **_launch_options(warps, 1),
    )  # fmt: skip
    return out, lse


def backward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    branches: Sequence[tuple[int, int]],
    is_causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of query, key and value in their dtype (laid out like them), every branch recomputed
    against the merged ``out`` and ``lse``, accumulated in float32 a slice of heads at a time."""
    query, key, value, out, grad_out = (_unit_last_stride(x) for x in (query, key, value, out, grad_out))
    batch, heads, length, head_dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    lse = lse.contiguous()
    flash = [rate <= _config(BACKWARD_FLASH_RATES, head_dim) and group == 1 for _, rate in branches]
    delta = None
    if not all(flash):  # the Triton kernel's softmax correction term (the flash calls make their own)
        delta = torch.empty_like(lse)
        block_t, warps = MERGE_CONFIG
        _delta_kernel[(triton.cdiv(length, block_t), batch * heads)](
            out, grad_out, delta, heads, length, *_strides(out), *_strides(grad_out), HEAD_DIM=head_dim,
            BLOCK_T=block_t, **_launch_options(warps, 1),
        )  # fmt: skip
    grad_q, grad_k, grad_v = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
    accumulator_bytes = 4 * batch * length * head_dim * (group + 2)  # of one key/value head and its queries
    kv_slice = max(1, min(kv_heads, ACCUMULATOR_BYTES // accumulator_bytes))
    for kv_start in range(0, kv_heads, kv_slice):
        kv_heads_here = slice(kv_start, min(kv_start + kv_slice, kv_heads))
        heads_here = slice(kv_heads_here.start * group, kv_heads_here.stop * group)
        _backward_slice(
            *(None if x is None else x[:, heads_here] for x in (query, out, grad_out, lse, delta, grad_q)),
            *(x[:, kv_heads_here] for x in (key, value, grad_k, grad_v)),
            heads_here.start, branches, flash, is_causal, scale,
        )  # fmt: skip
    return grad_q, grad_k, grad_v


def _backward_slice(
    query, out, grad_out, lse, delta, grad_q, key, value, grad_k, grad_v, first_head, branches, flash, is_causal, scale
) -> None:
    """The backward for a slice of the heads: the ``flash`` branches through the device kernel's backward,
    the others in one Triton launch, into float32 accumulators cast into the gradients."""
    covering, flash_branches = split_covering(
        [branch for branch, by_flash in zip(branches, flash, strict=True) if by_flash]
    )
    kernel_branches = [branch for branch, by_flash in zip(branches, flash, strict=True) if not by_flash]
    new = torch.zeros_like if covering is None else torch.empty_like
    accumulators = [new(x, dtype=torch.float32) for x in (query, key, value)]
    if accumulators[1].stride() != accumulators[2].stride():  # the kernel adds both through one set of strides
        accumulators[2] = new(accumulators[1])
    tensors = (query, key, value, out, lse, grad_out, accumulators)
    if covering is not None:
        add_strided_gradients(*tensors, [covering], is_causal, scale, first_head, assign=True)
    if flash_branches:
        add_strided_gradients(*tensors, flash_branches, is_causal, scale, first_head)
    if kernel_branches:
        _launch_backward(
            query, grad_out, lse, delta, key, value, accumulators, first_head, kernel_branches, is_causal, scale
        )
    for gradient, accumulator in zip((grad_q, grad_k, grad_v), accumulators, strict=True):
        gradient.copy_(accumulator)


def _launch_backward(query, grad_out, lse, delta, key, value, accumulators, first_head, branches, is_causal, scale):
    """The Triton backward over ``branches``, adding into the float32 ``accumulators``."""
    batch, heads, length, head_dim = query.shape
    block_m1, block_n2, warps, stages, dq_in_kv_loop, block = _config(BACKWARD_CONFIGS, head_dim)
    if block % block_m1:  # the key/value loop's masked diagonal step must end on the key block's end
        raise ValueError(
            f"BACKWARD_CONFIGS: the key block ({block}) must be a multiple of the query block ({block_m1})"
        )
    table, tiles = _plan(batch, heads, length, tuple(branches), first_head, block).tensors(query.device)
    accumulate_q, accumulate_k, accumulate_v = accumulators
    _backward_kernel[(tiles.shape[0],)](
        query, key, value, grad_out, lse, delta, accumulate_q, accumulate_k, accumulate_v, table, tiles,
        *_strides(query), *_strides(key), *_strides(value), *_strides(grad_out), lse.stride(0), lse.stride(1),
        *_strides(accumulate_q), *_strides(accumulate_k),
        heads, first_head, heads // key.shape[1], length, scale, scale * math.log2(math.e),
        IS_CAUSAL=is_causal, HEAD_DIM=head_dim, BLOCK=block, BLOCK_M1=block_m1, BLOCK_N2=block_n2,
        PRECISION=_precision(query), DQ_IN_KV_LOOP=dq_in_kv_loop, **_launch_options(warps, stages),
    )  # fmt: skip
