"""The SDPA path: dilated attention over PyTorch's fused attention kernels (the CPU flash kernel; on
CUDA the flash kernel for half precision, the memory-efficient kernel otherwise).

Equal query and key lengths take the strided scheme: one kernel call per branch and head residue on
strided views of the inputs (a branch's kept positions read in place, no copies), branches merged by
log-sum-exp into running rows. Queries against a longer key cache take gathered (dilated) copies per
branch instead. ``backward`` recomputes every branch against the merged output and log-sum-exp (as
ring attention does), so gradients are exact, mixing weights included, and memory stays O(N).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .dilated_attention_merge import merge_into, merge_rows


@dataclass
class _BranchLayout:
    """Where one branch's dilated slots come from, for a given (Lq, Lk, H, Hkv).

    Slots are laid out ``(n_segments, m, H)`` with ``m = ceil(w / r)``, or fewer for a lone short
    segment (heads last: the layout the attention kernels read and write fastest). Slot ``j`` of
    head ``h`` in segment ``s`` is position
    ``start + s*w + (h mod r) + j*r``. Invalid key slots (past the segment or past ``Lk``) always
    come last in a head's segment, so causal attention never sees them; invalid query slots are
    computed and dropped.
    """

    n_segments: int
    slots: int  # m
    query_index: torch.Tensor  # per slot, row of query as (B, H*Lq, D); 0 where invalid
    key_index: torch.Tensor  # per slot, row of key as (B, Hkv*Lk, D); 0 where invalid
    query_slots: torch.Tensor | None  # slots holding real queries; None when all do
    key_slots: torch.Tensor | None  # slots holding real keys; None when all do
    query_targets: torch.Tensor  # query rows of query_slots
    key_targets: torch.Tensor  # key rows of key_slots
    key_bias: torch.Tensor | None  # (n_segments, H, 1, m), -inf on invalid keys; non-causal only


# Slots handled per kernel call: bounds the gathered copies (and so peak memory) on long inputs.
MAX_SLOTS_PER_CALL = 1 << 21


def _layouts(
    branches: Sequence[tuple[int, int]],
    q_len: int,
    k_len: int,
    heads: int,
    kv_heads: int,
    is_causal: bool,
    device: torch.device,
    dtype: torch.dtype,
) -> Iterator[tuple[int, _BranchLayout]]:
    """``(branch number, layout)`` for each kernel call: whole segments, at most
    ``MAX_SLOTS_PER_CALL`` slots a call. Made lazily, so only one call's index tensors live at once."""
    for branch, (w, r) in enumerate(branches):
        first_segment = (k_len - q_len) // w
        last_segment = -(-k_len // w)
        per_call = max(1, MAX_SLOTS_PER_CALL // (-(-w // r) * heads))
        for start in range(first_segment, last_segment, per_call):
            n_segments = min(per_call, last_segment - start)
            yield (
                branch,
                _branch_layout(w, r, q_len, k_len, heads, kv_heads, is_causal, device, dtype, start, n_segments),
            )


def _branch_layout(
    w: int,
    r: int,
    q_len: int,
    k_len: int,
    heads: int,
    kv_heads: int,
    is_causal: bool,
    device: torch.device,
    dtype: torch.dtype,
    first_segment: int,
    n_segments: int,
) -> _BranchLayout:
    q_start = k_len - q_len
    # A lone segment cut short by the end of the sequence needs only the slots it has.
    span = min(w, k_len - first_segment * w) if n_segments == 1 else w
    m = -(-span // r)
    head = torch.arange(heads, device=device).view(1, 1, heads)
    in_segment = (head % r) + r * torch.arange(m, device=device).view(1, m, 1)  # (1, m, H)
    segment_start = (first_segment + torch.arange(n_segments, device=device)).view(n_segments, 1, 1) * w
    position = segment_start + in_segment  # (n_segments, m, H)
    key_ok = (in_segment < w) & (position < k_len)
    query_ok = key_ok & (position >= q_start)
    kv_head = head // (heads // kv_heads)
    key_index = torch.where(key_ok, kv_head * k_len + position, 0).flatten()
    query_index = torch.where(query_ok, head * q_len + position - q_start, 0).flatten()
    query_slots = None if bool(query_ok.all()) else query_ok.flatten().nonzero().squeeze(1)
    key_slots = None if bool(key_ok.all()) else key_ok.flatten().nonzero().squeeze(1)
    key_bias = None
    if not is_causal and key_slots is not None:
        key_bias = torch.zeros(n_segments, heads, 1, m, device=device, dtype=dtype)
        key_bias.masked_fill_(~key_ok.transpose(1, 2).unsqueeze(2), float("-inf"))
    return _BranchLayout(
        n_segments=n_segments,
        slots=m,
        query_index=query_index,
        key_index=key_index,
        query_slots=query_slots,
        key_slots=key_slots,
        query_targets=_valid(query_index.unsqueeze(0), query_slots).squeeze(0),
        key_targets=_valid(key_index.unsqueeze(0), key_slots).squeeze(0),
        key_bias=key_bias,
    )


def _valid(rows: torch.Tensor, slots: torch.Tensor | None) -> torch.Tensor:
    """The rows ``(B, n_slots, ...)`` of valid slots."""
    return rows if slots is None else rows.index_select(1, slots)


def _to_kernel(rows: torch.Tensor, layout: _BranchLayout, heads: int) -> torch.Tensor:
    """Slot rows ``(B, n_slots, ...)`` -> the kernels' ``(B * n_segments, H, m, ...)`` view."""
    batch, tail = rows.shape[0], rows.shape[2:]
    return rows.view(batch * layout.n_segments, layout.slots, heads, *tail).transpose(1, 2)


def _from_kernel(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """The kernels' ``(B * n_segments, H, m, ...)`` -> slot rows ``(B, n_slots, ...)``."""
    return tensor.transpose(1, 2).reshape(batch, -1, *tensor.shape[3:])


def _expand_bias(layout: _BranchLayout, batch: int) -> torch.Tensor | None:
    if layout.key_bias is None:
        return None
    bias = layout.key_bias.unsqueeze(0).expand(batch, *layout.key_bias.shape)
    return bias.reshape(batch * layout.n_segments, *layout.key_bias.shape[1:])


def _cpu_forward(q, k, v, is_causal, bias, scale):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, is_causal, attn_mask=bias, scale=scale
    )
    return out, lse


def _cpu_backward(grad_out, q, k, v, out, lse, is_causal, bias, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out, q, k, v, out, lse, 0.0, is_causal, attn_mask=bias, scale=scale
    )


def _use_flash(q: torch.Tensor, bias: torch.Tensor | None) -> bool:
    # The flash kernel is the fastest on recent GPUs but takes no bias and only half precision.
    return bias is None and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256


def _cuda_bias(bias, q):
    # The memory-efficient kernel wants a bias it can read row by row: materialise it over the
    # query dimension, its last dimension padded to a multiple of 16 elements.
    if bias is None:
        return None
    batch, heads, _, m = bias.shape
    padded = bias.new_zeros(batch, heads, q.shape[2], -(-m // 16) * 16)
    padded[..., :m] = bias
    return padded[..., :m]


def _cuda_forward(q, k, v, is_causal, bias, scale):
    if _use_flash(q, bias):
        out, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, is_causal, scale=scale)
        return out, lse
    out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, _cuda_bias(bias, q), True, 0.0, is_causal, scale=scale
    )
    return out, lse[..., : q.shape[2]]


def _cuda_backward(grad_out, q, k, v, out, lse, is_causal, bias, scale):
    if _use_flash(q, bias):
        # No dropout, so the random-number state the kernel takes is never read.
        rng_state = torch.zeros(2, dtype=torch.uint64, device=q.device)
        unused = torch.zeros((), dtype=torch.uint64, device=q.device)
        grad_q, grad_k, grad_v = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            grad_out,
            q,
            k,
            v,
            out,
            lse.contiguous(),
            None,
            None,
            q.shape[2],
            k.shape[2],
            0.0,
            is_causal,
            rng_state,
            unused,
            scale=scale,
        )
        return grad_q, grad_k, grad_v
    # The memory-efficient kernel reads a log-sum-exp padded to a multiple of 32 rows.
    padded_lse = lse.new_full((*lse.shape[:2], -(-lse.shape[2] // 32) * 32), float("inf"))
    padded_lse[..., : lse.shape[2]] = lse
    no_rng = torch.zeros((), dtype=torch.int64, device=q.device)
    grad_q, grad_k, grad_v, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        grad_out,
        q,
        k,
        v,
        _cuda_bias(bias, q),
        out,
        padded_lse,
        no_rng,
        no_rng,
        0.0,
        [True, True, True, False],
        is_causal,
        scale=scale,
    )
    return grad_q, grad_k, grad_v


# (forward, backward) of one attention call, by device type.
KERNELS = {"cpu": (_cpu_forward, _cpu_backward), "cuda": (_cuda_forward, _cuda_backward)}


def _rows_of(tensor: torch.Tensor) -> torch.Tensor:
    """``(B, heads, L, D)`` -> ``(B, heads*L, D)``: the row layout the gathers index into."""
    batch, heads, length, head_dim = tensor.shape
    return tensor.reshape(batch, heads * length, head_dim)


@dataclass
class _SlotSet:
    """One kernel call of the strided path: the heads ``first_head, first_head + r, ...`` of the
    tensors (all those whose dilation offset is ``residue``) in ``n_segments`` segments from
    ``first_segment`` on, each holding ``slots`` kept positions ``start + residue + j*r``. Any
    (B, H, L, ...) tensor yields this set as a strided view, with no copy."""

    w: int
    r: int
    residue: int
    first_head: int
    n_heads: int
    first_segment: int
    n_segments: int
    slots: int

    def views(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """One ``(n_segments, n_heads, slots, ...)`` view per batch row (the kernel's batch axis is the
        segments, which a second batch row does not continue in stride)."""
        batch_stride, head_stride, position_stride = tensor.stride()[:3]
        offset = (
            tensor.storage_offset()
            + self.first_head * head_stride
            + (self.first_segment * self.w + self.residue) * position_stride
        )
        shape = (self.n_segments, self.n_heads, self.slots, *tensor.shape[3:])
        strides = (self.w * position_stride, self.r * head_stride, self.r * position_stride, *tensor.stride()[3:])
        return [tensor.as_strided(shape, strides, offset + b * batch_stride) for b in range(tensor.shape[0])]


def _slot_sets(w: int, r: int, length: int, heads: int, head_offset: int) -> Iterator[_SlotSet]:
    """The strided path's kernel calls for branch (w, r): per residue in use, the whole segments (at
    most ``MAX_SLOTS_PER_CALL`` slots a call, bounding the kernel's outputs) and then the segment cut
    short by the end of the sequence. The tensors' heads are ``head_offset, head_offset + 1, ...`` of
    the model (a slice of its heads), which sets their dilation offsets."""
    whole = length // w
    rest = length - whole * w
    for residue in range(min(r, w)):  # a rate above the segment length keeps no position at offsets >= w
        first_head = (residue - head_offset) % r
        if first_head >= heads:
            continue
        n_heads = len(range(first_head, heads, r))
        slots = len(range(residue, w, r))
        per_call = max(1, MAX_SLOTS_PER_CALL // (slots * n_heads))
        for first in range(0, whole, per_call):
            yield _SlotSet(w, r, residue, first_head, n_heads, first, min(per_call, whole - first), slots)
        if rest > residue:
            yield _SlotSet(w, r, residue, first_head, n_heads, whole, 1, len(range(residue, rest, r)))


def _strided_calls(
    branches, length: int, heads: int, tensors: Sequence[torch.Tensor], head_offset: int = 0
) -> Iterator[list[tuple]]:
    """For each kernel call of the strided path, the matching views of ``tensors``, one tuple per batch row."""
    for w, r in branches:
        for slot_set in _slot_sets(w, r, length, heads, head_offset):
            yield list(zip(*(slot_set.views(t) for t in tensors), strict=True))


def add_strided_gradients(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    gradients: Sequence[torch.Tensor],
    branches: Sequence[tuple[int, int]],
    is_causal: bool,
    scale: float,
    head_offset: int = 0,
    assign: bool = False,
) -> None:
    """Adds the query, key and value gradients of ``branches`` into ``gradients`` (three ``(B, H, L, D)``
    tensors): one backward kernel call per branch and head residue on strided views, each recomputed
    against the merged ``out`` and ``lse`` ``(B, H, L)``. Equal lengths, one key/value head per query
    head; the heads are ``head_offset, head_offset + 1, ...`` of the model. With ``assign`` the
    gradients are written instead (so they need no zeroing): one branch of rate 1, which covers every
    position once."""
    if assign and (len(branches) != 1 or branches[0][1] != 1):
        raise ValueError(f"assign takes one branch of rate 1 (it must cover every position once), got {branches}")
    _, kernel_backward = KERNELS[query.device.type]
    batch, heads, length, _ = query.shape
    tensors = (query, key, value, out, grad_out, lse, *gradients)
    for call in _strided_calls(branches, length, heads, tensors, head_offset):
        for q, k, v, call_out, call_grad, *call_rest in call:
            call_lse, *call_gradients = call_rest
            parts = kernel_backward(call_grad, q, k, v, call_out, call_lse.contiguous(), is_causal, None, scale)
            for gradient, part in zip(call_gradients, parts, strict=True):
                if assign:
                    gradient.copy_(part)
                else:
                    gradient.add_(part)


def _expand_heads(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """Key/value heads repeated to one per query head (grouped-query attention), for the strided path."""
    return tensor if tensor.shape[1] == heads else tensor.repeat_interleave(heads // tensor.shape[1], dim=1)


def split_covering(
    branches: Sequence[tuple[int, int]],
) -> tuple[tuple[int, int] | None, list[tuple[int, int]]]:
    """The first branch of rate 1 and the others (``None`` and all of them when there is none). A branch
    of rate 1 covers every position once: its outputs and gradients can be written where the others'
    are merged or added, so nothing has to be zeroed first (on CPU, 2% of a 32K forward+backward)."""
    for index, (w, r) in enumerate(branches):
        if r == 1:
            return (w, r), [*branches[:index], *branches[index + 1 :]]
    return None, list(branches)


def fused_forward(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, branches, is_causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every branch through the device's attention kernel, merged: ``(B, H*Lq, D)`` and ``(B, H*Lq)`` rows in
    the compute dtype (float32, or float64 for float64 inputs); log-sum-exp ``-inf`` where nothing covers."""
    kernel_forward, _ = KERNELS[query.device.type]
    batch, heads, q_len, head_dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    compute_dtype = torch.promote_types(query.dtype, torch.float32)
    covering, others = split_covering(branches) if q_len == k_len else (None, list(branches))
    if covering is None:
        out = query.new_zeros(batch, heads * q_len, head_dim, dtype=compute_dtype)
        lse = query.new_full((batch, heads * q_len), float("-inf"), dtype=compute_dtype)
    else:
        out = query.new_empty(batch, heads * q_len, head_dim, dtype=compute_dtype)
        lse = query.new_empty(batch, heads * q_len, dtype=compute_dtype)
    if q_len == k_len:
        # Strided path: the kernel reads each branch's kept positions in place, no gathered copies.
        tensors = (query, _expand_heads(key, heads), _expand_heads(value, heads))
        tensors += (out.view(batch, heads, q_len, head_dim), lse.view(batch, heads, q_len))
        for call in _strided_calls([covering] if covering else [], q_len, heads, tensors):
            for q, k, v, call_out, call_lse in call:
                branch_out, branch_lse = kernel_forward(q, k, v, is_causal, None, scale)
                call_out.copy_(branch_out)
                call_lse.copy_(branch_lse)
        for call in _strided_calls(others, q_len, heads, tensors):
            for q, k, v, call_out, call_lse in call:
                branch_out, branch_lse = kernel_forward(q, k, v, is_causal, None, scale)
                merge_into(call_out, call_lse, branch_out, branch_lse)
        return out, lse
    flat_q, flat_k, flat_v = (_rows_of(x) for x in (query, key, value))
    for branch, layout in _layouts(branches, q_len, k_len, heads, kv_heads, is_causal, query.device, query.dtype):
        branch_out, branch_lse = kernel_forward(
            _to_kernel(flat_q.index_select(1, layout.query_index), layout, heads),
            _to_kernel(flat_k.index_select(1, layout.key_index), layout, heads),
            _to_kernel(flat_v.index_select(1, layout.key_index), layout, heads),
            is_causal,
            _expand_bias(layout, batch),
            scale,
        )
        branch_out = _valid(_from_kernel(branch_out, batch), layout.query_slots).to(compute_dtype)
        branch_lse = _valid(_from_kernel(branch_lse, batch), layout.query_slots).to(compute_dtype)
        if branch == 0:  # nothing to merge with yet
            out.index_copy_(1, layout.query_targets, branch_out)
            lse.index_copy_(1, layout.query_targets, branch_lse)
        else:
            merge_rows(out, lse, layout.query_targets, branch_out, branch_lse)
    return out, lse


def fused_backward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    branches,
    is_causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of query, key and value rows (compute dtype) for the given branches, each recomputed
    against the merged ``out`` and ``lse`` of all branches: exact, mixing weights included."""
    _, kernel_backward = KERNELS[query.device.type]
    batch, heads, q_len, head_dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    covering, others = split_covering(branches) if q_len == k_len else (None, list(branches))
    new = torch.zeros if covering is None else torch.empty
    grad_q = new(batch, heads * q_len, head_dim, dtype=lse.dtype, device=query.device)
    grad_k = new(batch, kv_heads * k_len, head_dim, dtype=lse.dtype, device=query.device)
    grad_v = new(batch, kv_heads * k_len, head_dim, dtype=lse.dtype, device=query.device)
    if q_len == k_len:
        grad_q_4d = grad_q.view(batch, heads, q_len, head_dim)
        grad_k_4d, grad_v_4d = (
            (new(grad_q_4d.shape, dtype=lse.dtype, device=query.device) for _ in range(2))
            if kv_heads != heads
            else (
                grad_k.view_as(grad_q_4d),
                grad_v.view_as(grad_q_4d),
            )
        )
        tensors = (query, _expand_heads(key, heads), _expand_heads(value, heads), out, lse.view(batch, heads, q_len))
        gradients = (grad_q_4d, grad_k_4d, grad_v_4d)
        if covering is not None:
            add_strided_gradients(*tensors, grad_out, gradients, [covering], is_causal, scale, assign=True)
        add_strided_gradients(*tensors, grad_out, gradients, others, is_causal, scale)
        if kv_heads != heads:  # sum each group's gradients back onto its key/value head
            group = heads // kv_heads
            grad_k.copy_(grad_k_4d.view(batch, kv_heads, group, k_len, head_dim).sum(2).view_as(grad_k))
            grad_v.copy_(grad_v_4d.view(batch, kv_heads, group, k_len, head_dim).sum(2).view_as(grad_v))
        return grad_q, grad_k, grad_v
    flat_q, flat_k, flat_v, flat_out, flat_grad = (_rows_of(x) for x in (query, key, value, out, grad_out))
    flat_lse = lse.reshape(batch, heads * q_len)
    for _, layout in _layouts(branches, q_len, k_len, heads, kv_heads, is_causal, query.device, query.dtype):
        slot_grad = flat_grad.index_select(1, layout.query_index)
        slot_out = flat_out.index_select(1, layout.query_index)
        slot_lse = flat_lse.index_select(1, layout.query_index)
        if layout.query_slots is not None:
            # Invalid query slots get zero output gradient and an infinite log-sum-exp, so they
            # contribute nothing to any gradient.
            invalid = torch.ones(slot_lse.shape[1], dtype=torch.bool, device=query.device)
            invalid[layout.query_slots] = False
            slot_grad[:, invalid] = 0
            slot_out[:, invalid] = 0
            slot_lse[:, invalid] = float("inf")
        dq, dk, dv = kernel_backward(
            _to_kernel(slot_grad, layout, heads),
            _to_kernel(flat_q.index_select(1, layout.query_index), layout, heads),
            _to_kernel(flat_k.index_select(1, layout.key_index), layout, heads),
            _to_kernel(flat_v.index_select(1, layout.key_index), layout, heads),
            _to_kernel(slot_out, layout, heads),
            _to_kernel(slot_lse, layout, heads),
            is_causal,
            _expand_bias(layout, batch),
            scale,
        )
        grad_q.index_add_(1, layout.query_targets, _valid(_from_kernel(dq, batch), layout.query_slots).to(lse.dtype))
        grad_k.index_add_(1, layout.key_targets, _valid(_from_kernel(dk, batch), layout.key_slots).to(lse.dtype))
        grad_v.index_add_(1, layout.key_targets, _valid(_from_kernel(dv, batch), layout.key_slots).to(lse.dtype))
    return grad_q, grad_k, grad_v


def forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    branches: Sequence[tuple[int, int]],
    is_causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused paths' interface: output ``(B, H, Lq, D)`` and log-sum-exp ``(B, H, Lq)``, compute dtype."""
    out, lse = fused_forward(query, key, value, branches, is_causal, scale)
    return out.view(query.shape), lse.view(query.shape[:3])


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
    """The fused paths' interface: query, key and value gradients in the compute dtype."""
    grad_q, grad_k, grad_v = fused_backward(query, key, value, out, lse, grad_out, branches, is_causal, scale)
    return grad_q.view(query.shape), grad_k.view(key.shape), grad_v.view(value.shape)
