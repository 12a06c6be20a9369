"""Dilated attention (LongNet, arXiv 2307.02486, Eq. 9-12).

The sequence is cut into segments of length ``w``; inside a segment only every ``r``-th position is
kept, starting at offset ``h mod r`` for query head ``h``. Each ``(w, r)`` branch is an ordinary
softmax attention over its kept positions, and the branches are mixed by their softmax denominators,
which is the same as one softmax over the multiset union of the branches' keys.

``dilated_attention`` is the public entry point. Backends:

- ``"eager"``: masked softmax in plain PyTorch, quadratic inside a segment. The reference, and the
  only backend that can return attention weights.
- ``"cpu"``: PyTorch's fused CPU flash-attention kernel, once per branch and head residue on strided
  views of the inputs (a branch's kept positions are read in place); branches are merged by
  log-sum-exp. Queries against a longer key cache use gathered (dilated) copies instead.
- ``"cuda"``: in half precision, every branch's kept positions (per segment and head) are gathered
  into one list of short sequences for a single variable-length call of PyTorch's CUDA flash kernel,
  and the branches are merged by scatter; otherwise (float32, or a head size flash does not take)
  the CPU scheme over the memory-efficient kernel.

The fused backends use one ``autograd.Function`` whose backward recomputes every branch against the
merged output and merged log-sum-exp (as ring attention does), so gradients are exact, including the
path through the mixing weights, and memory stays O(N).
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

BACKENDS = ("auto", "eager", "cpu", "cuda")


def dilated_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    is_causal: bool = True,
    scale: float | None = None,
    backend: str = "auto",
    return_lse: bool = False,
    group=None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Dilated attention with the shapes of ``scaled_dot_product_attention``.

    Args:
        query: ``(B, H, Lq, D)``.
        key, value: ``(B, Hkv, Lk, D)`` with ``H % Hkv == 0`` and ``Lq <= Lk``. When ``Lq < Lk`` the
            queries are the last ``Lq`` positions (a KV cache).
        segment_lengths, dilation_rates: one ``(w, r)`` pair per branch.
        is_causal: whether a query sees only keys at or before its own position.
        scale: softmax scale; ``1 / sqrt(D)`` when ``None``.
        backend: ``"auto"``, ``"eager"``, ``"cpu"`` or ``"cuda"``.
        return_lse: also return the merged log-sum-exp ``(B, H, Lq)`` in float32 (``-inf`` where no
            branch covers a (query, head) pair; the output there is 0). It carries no gradient.
        group: a ``torch.distributed`` process group to split the sequence over: the inputs are then
            this rank's chunk ``[i*L, (i+1)*L)`` (same L on every rank, no KV cache) and the output is
            this rank's chunk of the single-process result (``longnet.sequence_parallel``).

    Returns:
        The output ``(B, H, Lq, D)``, and the log-sum-exp when ``return_lse`` is set.
    """
    branches = check_branches(segment_lengths, dilation_rates)
    device_type = query.device.type if isinstance(query, torch.Tensor) else "cpu"
    if torch.is_autocast_enabled(device_type):
        # Like scaled_dot_product_attention under autocast: run in the autocast dtype.
        dtype = torch.get_autocast_dtype(device_type)
        query, key, value = (x.to(dtype) if isinstance(x, torch.Tensor) else x for x in (query, key, value))
    _check_tensors(query, key, value)
    backend = _resolve_backend(backend, query)
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    if group is not None:
        from .sequence_parallel import sequence_parallel_dilated_attention

        with torch.autocast(device_type, enabled=False):
            out, lse = sequence_parallel_dilated_attention(
                query, key, value, branches, is_causal, scale, backend, group
            )
    elif backend == "eager":
        out, lse = eager_dilated_attention(query, key, value, branches, is_causal, scale)
        lse = lse.detach()
    elif query.shape[2] <= GATHER_MAX_QUERIES and query.shape[2] < key.shape[2]:
        few_queries = decode_dilated_attention if query.shape[2] == 1 else gathered_dilated_attention
        out, lse = few_queries(query, key, value, branches, is_causal, scale)
        lse = lse.detach()
    else:
        with torch.autocast(device_type, enabled=False):
            out, lse = _DilatedAttentionFunction.apply(query, key, value, branches, is_causal, scale, backend)
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------------------------------
# Input checks


def check_branches(segment_lengths: Sequence[int], dilation_rates: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """Validates the branch lists and returns them as ``((w, r), ...)``."""
    for name, values in (("segment_lengths", segment_lengths), ("dilation_rates", dilation_rates)):
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise ValueError(f"{name} must be a list of positive integers, got {values!r}")
        if len(values) == 0:
            raise ValueError(f"{name} must not be empty")
        for item in values:
            if isinstance(item, bool):
                raise ValueError(f"{name} must hold positive integers, got {item!r}")
            try:
                number = operator.index(item)
            except TypeError:
                raise ValueError(f"{name} must hold positive integers, got {item!r}") from None
            if number <= 0:
                raise ValueError(f"{name} must hold positive integers, got {item!r}")
    if len(segment_lengths) != len(dilation_rates):
        raise ValueError(
            f"segment_lengths and dilation_rates must have the same length, got "
            f"{len(segment_lengths)} and {len(dilation_rates)}"
        )
    return tuple((operator.index(w), operator.index(r)) for w, r in zip(segment_lengths, dilation_rates, strict=True))


def _check_tensors(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 4:
            raise ValueError(
                f"{name} must have 4 dimensions (B, heads, length, head_dim), got shape {tuple(tensor.shape)}"
            )
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    if key.shape != value.shape:
        raise ValueError(f"key and value must have the same shape, got {tuple(key.shape)} and {tuple(value.shape)}")
    batch, heads, q_len, head_dim = query.shape
    if key.shape[0] != batch:
        raise ValueError(f"query and key must have the same batch size, got {batch} and {key.shape[0]}")
    if key.shape[3] != head_dim:
        raise ValueError(f"query and key must have the same head_dim, got {head_dim} and {key.shape[3]}")
    kv_heads, k_len = key.shape[1], key.shape[2]
    if kv_heads == 0 or heads % kv_heads != 0:
        raise ValueError(
            f"the number of query heads ({heads}) must be a multiple of the number of key/value heads ({kv_heads})"
        )
    if q_len > k_len:
        raise ValueError(f"query length ({q_len}) must not exceed key length ({k_len})")
    if q_len == 0 or head_dim == 0 or batch == 0:
        raise ValueError(f"query must not be empty, got shape {tuple(query.shape)}")
    if not (query.device == key.device == value.device):
        raise ValueError(
            f"query, key and value must be on one device, got {query.device}, {key.device}, {value.device}"
        )
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(f"query, key and value must have one dtype, got {query.dtype}, {key.dtype}, {value.dtype}")


def _resolve_backend(backend: str, query: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    device = query.device.type
    if backend == "auto":
        return device if device in ("cpu", "cuda") else "eager"
    if backend in ("cpu", "cuda") and backend != device:
        raise ValueError(f"backend {backend!r} needs {backend} tensors, got tensors on {query.device}")
    return backend


# --------------------------------------------------------------------------------------------------
# Eager backend: the reference


def masked_softmax(scores: torch.Tensor, allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax of ``scores`` over the ``allowed`` entries of the last dimension, and its log-sum-exp.

    A row with nothing allowed gets probabilities 0 and log-sum-exp -inf; it is computed with a finite
    stand-in first, so no NaN reaches autograd.
    """
    scores = scores.masked_fill(~allowed, float("-inf"))
    covered = allowed.any(-1)
    lse = torch.logsumexp(scores.masked_fill(~covered[..., None], 0.0), dim=-1)
    probabilities = torch.exp(scores - lse[..., None])
    return probabilities, torch.where(covered, lse, float("-inf"))


def eager_dilated_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    branches: Sequence[tuple[int, int]],
    is_causal: bool,
    scale: float,
    return_weights: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Masked-softmax dilated attention; differentiable by plain autograd.

    Returns ``(out, lse)``, or ``(out, lse, weights)`` with ``weights (B, H, Lq, Lk)``, the merged
    attention probabilities (a key reached by two branches gets both shares).
    """
    batch, heads, q_len, head_dim = query.shape
    k_len = key.shape[2]
    group = heads // key.shape[1]
    key = key.repeat_interleave(group, dim=1)
    value = value.repeat_interleave(group, dim=1)
    q_start = k_len - q_len
    compute_dtype = torch.promote_types(query.dtype, torch.float32)
    outs, lses, probs = [], [], []
    for w, r in branches:
        first_segment = q_start // w
        n_segments = -(-k_len // w) - first_segment
        start, length = first_segment * w, n_segments * w
        pad_end = length - (k_len - start)
        # Padded copies that cover whole segments, positions start .. start + length - 1.
        k = torch.nn.functional.pad(key[:, :, start:], (0, 0, 0, pad_end)).unflatten(2, (n_segments, w))
        v = torch.nn.functional.pad(value[:, :, start:], (0, 0, 0, pad_end)).unflatten(2, (n_segments, w))
        q = torch.nn.functional.pad(query, (0, 0, q_start - start, pad_end)).unflatten(2, (n_segments, w))
        position = torch.arange(start, start + length, device=query.device).view(n_segments, w)
        offset = (torch.arange(heads, device=query.device) % r).view(heads, 1, 1)
        kept = (position % w) % r == offset  # (H, n_segments, w)
        key_ok = kept & (position < k_len)
        query_ok = key_ok & (position >= q_start)
        allowed = query_ok[..., :, None] & key_ok[..., None, :]  # (H, n_segments, w, w)
        if is_causal:
            allowed = allowed & (position[:, :, None] >= position[:, None, :])
        scores = torch.matmul(q.to(compute_dtype), k.to(compute_dtype).transpose(-1, -2)) * scale
        p, lse = masked_softmax(scores, allowed)
        out = torch.matmul(p, v.to(compute_dtype))
        keep_rows = slice(q_start - start, q_start - start + q_len)
        outs.append(out.flatten(2, 3)[:, :, keep_rows])
        lses.append(lse.flatten(2, 3)[:, :, keep_rows])
        if return_weights:
            weights = p.new_zeros(batch, heads, length, k_len)
            for s in range(n_segments):
                rows = slice(s * w, (s + 1) * w)
                cols = slice(start + s * w, min(start + (s + 1) * w, k_len))
                weights[:, :, rows, cols] = p[:, :, s, :, : cols.stop - cols.start]
            probs.append(weights[:, :, keep_rows])
    out, lse, mix = merge_branches(torch.stack(outs), torch.stack(lses))
    if not return_weights:
        return out.to(query.dtype), lse
    weights = (mix[..., None] * torch.stack(probs)).sum(0)
    return out.to(query.dtype), lse, weights


# A few queries against a long cache (decoding): gather each query's keys instead of running whole
# segments, so a step costs O(sum of w / r), not O(w^2 / r^2).
GATHER_MAX_QUERIES = 32


def gathered_dilated_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    branches: Sequence[tuple[int, int]],
    is_causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dilated attention by gathering, per query, the keys of each branch; plain autograd.

    For query position t and branch (w, r), the heads that take part are those with
    ``h mod r == (t mod w) mod r``, and they all see the same keys: ``start + c + j*r`` for the
    segment start ``start`` and ``c = (t mod w) mod r``. Memory is O(Lq * w / r) per branch.
    """
    batch, heads, q_len, head_dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    compute_dtype = torch.promote_types(query.dtype, torch.float32)
    device = query.device
    t = torch.arange(k_len - q_len, k_len, device=device).view(q_len, 1)
    q = query.to(compute_dtype).view(batch, kv_heads, heads // kv_heads, q_len, head_dim)
    head = torch.arange(heads, device=device).view(heads, 1)
    outs, lses = [], []
    for w, r in branches:
        start = t // w * w
        residue = (t - start) % r  # (Lq, 1)
        # Only as many slots as the furthest query can see: early in a long segment, few.
        last = t if is_causal else torch.clamp(start + w - 1, max=k_len - 1)
        slot = torch.arange(int(((last - start - residue) // r).max()) + 1, device=device).view(1, -1)
        position = start + residue + slot * r  # (Lq, m)
        valid = (residue + slot * r < w) & (position < k_len)
        if is_causal:
            valid = valid & (position <= t)
        index = position.clamp(max=k_len - 1)
        k = key[:, :, index].to(compute_dtype)  # (B, Hkv, Lq, m, D)
        v = value[:, :, index].to(compute_dtype)
        scores = torch.einsum("bkgqd,bkqmd->bkgqm", q, k).flatten(1, 2) * scale  # (B, H, Lq, m)
        takes_part = (head % r) == residue.view(1, q_len)  # (H, Lq)
        allowed = valid.unsqueeze(0) & takes_part.unsqueeze(-1)  # (H, Lq, m)
        p, lse = masked_softmax(scores, allowed)
        p = p.view(batch, kv_heads, heads // kv_heads, q_len, -1)
        outs.append(torch.einsum("bkgqm,bkqmd->bkgqd", p, v).reshape(batch, heads, q_len, head_dim))
        lses.append(lse)
    out, lse, _ = merge_branches(torch.stack(outs), torch.stack(lses))
    return out.to(query.dtype), lse


def decode_dilated_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    branches: Sequence[tuple[int, int]],
    is_causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dilated attention of one query (the last position) per row: plain decoding; plain autograd.

    In branch (w, r) the query's keys are the strided slice ``start + c, start + c + r, ...`` of its
    segment (``c`` its residue), seen only by the heads ``c, c + r, c + 2r, ...``: each branch reads
    ``H/r`` heads of ``w/r`` keys as views, with no gather, and the other heads skip it.
    """
    batch, heads, _, head_dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    compute_dtype = torch.promote_types(query.dtype, torch.float32)
    t = k_len - 1
    outs, lses = [], []
    for w, r in branches:
        start = t // w * w
        residue = (t - start) % r
        stop = t + 1 if is_causal else min(start + w, k_len)
        keep = slice(start + residue, stop, r)
        taking_part = torch.arange(heads, device=query.device)[residue::r]  # none when residue >= heads
        if kv_heads == heads:
            k, v = key[:, residue::r, keep], value[:, residue::r, keep]
        else:
            kv_index = taking_part // (heads // kv_heads)
            k, v = key[:, :, keep].index_select(1, kv_index), value[:, :, keep].index_select(1, kv_index)
        q = query[:, residue::r].to(compute_dtype)  # (B, n, 1, D)
        scores = torch.matmul(q, k.to(compute_dtype).transpose(-1, -2)) * scale  # (B, n, 1, m)
        lse = torch.logsumexp(scores, dim=-1)
        part_out = torch.matmul(torch.exp(scores - lse[..., None]), v.to(compute_dtype))
        out = query.new_zeros(batch, heads, 1, head_dim, dtype=compute_dtype)
        full_lse = query.new_full((batch, heads, 1), float("-inf"), dtype=compute_dtype)
        outs.append(out.index_copy(1, taking_part, part_out))
        lses.append(full_lse.index_copy(1, taking_part, lse))
    out, lse, _ = merge_branches(torch.stack(outs), torch.stack(lses))
    return out.to(query.dtype), lse


def merge_branches(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mixes branch outputs ``(n, B, H, L, D)`` by their log-sum-exps ``(n, B, H, L)`` (Eq. 10).

    Returns the merged output, the merged log-sum-exp (``-inf`` where no branch covers a row) and the
    mixing weights ``(n, B, H, L)``. Differentiable, and NaN-free for uncovered rows.
    """
    covered = torch.isfinite(lses).any(0)
    lse = torch.logsumexp(lses.masked_fill(~covered, 0.0), dim=0)
    mix = torch.exp(lses - lse)
    out = (mix[..., None] * outs).sum(0)
    return out, torch.where(covered, lse, float("-inf")), mix


# --------------------------------------------------------------------------------------------------
# Fused backends


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


_KERNELS = {"cpu": (_cpu_forward, _cpu_backward), "cuda": (_cuda_forward, _cuda_backward)}


def _rows_of(tensor: torch.Tensor) -> torch.Tensor:
    """``(B, heads, L, D)`` -> ``(B, heads*L, D)``: the row layout the gathers index into."""
    batch, heads, length, head_dim = tensor.shape
    return tensor.reshape(batch, heads * length, head_dim)


def merge_into(out: torch.Tensor, lse: torch.Tensor, branch_out: torch.Tensor, branch_lse: torch.Tensor) -> None:
    """Merges one branch's output and log-sum-exp into the running ``out (..., D)``, ``lse (...)`` in place
    (they may be views). ``lse`` must not be ``-inf`` where ``branch_lse`` is."""
    new_lse = torch.logaddexp(lse, branch_lse)
    out.mul_(torch.exp(lse - new_lse).unsqueeze(-1)).add_(branch_out * torch.exp(branch_lse - new_lse).unsqueeze(-1))
    lse.copy_(new_lse)


def merge_rows(
    out: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, rows_out: torch.Tensor, rows_lse: torch.Tensor
) -> None:
    """Merges one branch's rows (each target row once) into the running ``out (B, X, D)``, ``lse (B, X)``."""
    old_out, old_lse = out.index_select(1, targets), lse.index_select(1, targets)
    merge_into(old_out, old_lse, rows_out, rows_lse)
    out.index_copy_(1, targets, old_out)
    lse.index_copy_(1, targets, old_lse)


@dataclass
class _SlotSet:
    """One kernel call of the strided path: the heads ``c, c + r, ...`` (``c`` the residue) of
    ``n_segments`` segments from ``first_segment`` on, each holding ``slots`` kept positions
    ``start + c + j*r``. Any (B, H, L, ...) tensor yields this set as a strided view, with no copy."""

    w: int
    r: int
    residue: int
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
            + self.residue * head_stride
            + (self.first_segment * self.w + self.residue) * position_stride
        )
        shape = (self.n_segments, self.n_heads, self.slots, *tensor.shape[3:])
        strides = (self.w * position_stride, self.r * head_stride, self.r * position_stride, *tensor.stride()[3:])
        return [tensor.as_strided(shape, strides, offset + b * batch_stride) for b in range(tensor.shape[0])]


def _slot_sets(w: int, r: int, length: int, heads: int) -> Iterator[_SlotSet]:
    """The strided path's kernel calls for branch (w, r): per residue in use, the whole segments (at
    most ``MAX_SLOTS_PER_CALL`` slots a call, bounding the kernel's outputs) and then the segment cut
    short by the end of the sequence."""
    whole = length // w
    rest = length - whole * w
    for residue in range(min(r, heads)):
        n_heads = len(range(residue, heads, r))
        slots = len(range(residue, w, r))
        per_call = max(1, MAX_SLOTS_PER_CALL // (slots * n_heads))
        for first in range(0, whole, per_call):
            yield _SlotSet(w, r, residue, n_heads, first, min(per_call, whole - first), slots)
        if rest > residue:
            yield _SlotSet(w, r, residue, n_heads, whole, 1, len(range(residue, rest, r)))


def _strided_calls(branches, length: int, heads: int, tensors: Sequence[torch.Tensor]) -> Iterator[list[tuple]]:
    """For each kernel call of the strided path, the matching views of ``tensors``, one tuple per batch row."""
    for w, r in branches:
        for slot_set in _slot_sets(w, r, length, heads):
            yield list(zip(*(slot_set.views(t) for t in tensors), strict=True))


def _expand_heads(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """Key/value heads repeated to one per query head (grouped-query attention), for the strided path."""
    return tensor if tensor.shape[1] == heads else tensor.repeat_interleave(heads // tensor.shape[1], dim=1)


# Packed path (CUDA flash kernel, Lq == Lk): the kept positions of every branch, segment and head are
# gathered into one list of short sequences and run as a single variable-length flash call, so a
# step makes a few large launches instead of one small launch per branch and head residue.

# Packed rows x head_dim handled per flash call: bounds the gathered copies on long inputs.
MAX_PACKED_ELEMENTS = 1 << 27


@dataclass
class _PackedWindow:
    """The packed sequences of a window of ``length`` positions: one per (branch, batch row, segment,
    head) holding that head's kept positions in order. Coordinates are per packed row, on the CPU;
    ``rows`` turns them into row numbers of a tensor's ``(rows, D)`` view, cached per device."""

    batch_of: torch.Tensor
    head_of: torch.Tensor
    position_of: torch.Tensor
    cu_seqlens: torch.Tensor  # int32, sequence boundaries in the packed rows
    max_len: int
    on_device: dict = field(default_factory=dict)

    def rows(self, strides: tuple[int, int, int], group: int, device: torch.device) -> torch.Tensor:
        """Row numbers for (batch, head, position) ``strides`` counted in rows; a key/value tensor
        (``group`` query heads per head) reads head ``h // group``."""
        cache_key = (strides, group, device)
        if cache_key not in self.on_device:
            batch_stride, head_stride, position_stride = strides
            rows = self.batch_of * batch_stride + (self.head_of // group) * head_stride
            self.on_device[cache_key] = (rows + self.position_of * position_stride).to(device)
        return self.on_device[cache_key]

    def cu_seqlens_on(self, device: torch.device) -> torch.Tensor:
        if device not in self.on_device:
            self.on_device[device] = self.cu_seqlens.to(device)
        return self.on_device[device]


@functools.lru_cache(maxsize=16)
def _packed_window(batch: int, heads: int, length: int, branches: tuple[tuple[int, int], ...]) -> _PackedWindow:
    batch_of, head_of, position_of, seq_lens = [], [], [], []
    head = torch.arange(heads).view(1, heads, 1)
    for w, r in branches:
        n_segments, slots = -(-length // w), -(-w // r)
        in_segment = head % r + r * torch.arange(slots).view(1, 1, slots)  # (1, H, slots)
        position = w * torch.arange(n_segments).view(n_segments, 1, 1) + in_segment  # (S, H, slots)
        kept = (in_segment < w) & (position < length)
        for b in range(batch):
            position_of.append(position[kept])
            head_of.append(head.expand_as(position)[kept])
            batch_of.append(torch.full_like(position_of[-1], b))
            seq_lens.append(kept.sum(-1).flatten())
    seq_lens = torch.cat(seq_lens)
    seq_lens = seq_lens[seq_lens > 0]
    cu_seqlens = torch.cat([seq_lens.new_zeros(1), seq_lens.cumsum(0)]).to(torch.int32)
    return _PackedWindow(
        torch.cat(batch_of), torch.cat(head_of), torch.cat(position_of), cu_seqlens, int(seq_lens.max())
    )


def _packed_windows(
    batch: int, heads: int, length: int, head_dim: int, branches: Sequence[tuple[int, int]]
) -> Iterator[tuple[int, _PackedWindow]]:
    """``(start, window)`` covering the sequence: windows are whole periods of the segment lengths
    (so every segment lies inside one window), as many as fit ``MAX_PACKED_ELEMENTS``."""
    period = math.lcm(*(w for w, _ in branches))
    rows_per_period = batch * heads * sum(-(-period // r) for _, r in branches)
    window = period * max(1, MAX_PACKED_ELEMENTS // (rows_per_period * head_dim))
    for start in range(0, length, window):
        yield start, _packed_window(batch, heads, min(window, length - start), tuple(branches))


class _Rows:
    """A ``(B, H, L, D)`` tensor as a ``(rows, D)`` view of its storage (copied only when its rows are
    not whole in memory), for gathering and scattering packed rows in place."""

    def __init__(self, tensor: torch.Tensor, group: int = 1) -> None:
        head_dim = tensor.shape[-1]
        strides = [0 if n == 1 else s for n, s in zip(tensor.shape, tensor.stride(), strict=True)]
        if (head_dim > 1 and strides[3] != 1) or any(s % head_dim for s in strides[:3]):
            tensor = tensor.contiguous()
            strides = list(tensor.stride())
        self.strides = tuple(s // head_dim for s in strides[:3])
        n_rows = 1 + sum((n - 1) * s for n, s in zip(tensor.shape[:3], self.strides, strict=True))
        self.view = tensor.as_strided((n_rows, head_dim), (head_dim, 1))
        self.group = group

    def window(self, start: int, window: _PackedWindow) -> tuple[torch.Tensor, torch.Tensor]:
        """The view from position ``start`` on and the window's row numbers into it."""
        shift = start * self.strides[2]
        view = self.view.narrow(0, shift, self.view.shape[0] - shift)
        return view, window.rows(self.strides, self.group, self.view.device)

    def gather(self, start: int, window: _PackedWindow) -> torch.Tensor:
        """The window's packed rows ``(N, 1, D)``, the flash kernel's variable-length layout."""
        view, rows = self.window(start, window)
        return view.index_select(0, rows).unsqueeze(1)


def _use_packed(query: torch.Tensor, backend: str) -> bool:
    """Whether equal-length queries and keys take the packed path: the CUDA flash kernel's inputs."""
    return backend == "cuda" and _use_flash(query, None)


def _flash_varlen_forward(q, k, v, cu_seqlens, max_len, is_causal, scale):
    """One flash call over packed sequences ``(N, 1, D)``: their outputs and log-sum-exps ``(N,)``."""
    out, lse, *_ = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, 0.0, is_causal, False, scale=scale
    )
    return out, lse.view(-1)


def _flash_varlen_backward(grad_out, q, k, v, out, lse, cu_seqlens, max_len, is_causal, scale):
    """The matching backward against the given (merged) ``out`` and ``lse``: dq, dk, dv ``(N, 1, D)``."""
    # No dropout, so the random-number state the kernel takes is never read.
    rng_state = torch.zeros(2, dtype=torch.uint64, device=q.device)
    unused = torch.zeros((), dtype=torch.uint64, device=q.device)
    return torch.ops.aten._flash_attention_backward(
        grad_out,
        q,
        k,
        v,
        out,
        lse.view(1, -1),
        cu_seqlens,
        cu_seqlens,
        max_len,
        max_len,
        0.0,
        is_causal,
        rng_state,
        unused,
        scale=scale,
    )


def packed_forward(query, key, value, branches, is_causal: bool, scale: float, out, lse) -> None:
    """Fills ``out (B, H, L, D)`` (zeros) and ``lse (B, H, L)`` (``-inf``), compute dtype, with all branches
    merged: each row's log-sum-exp is the log of the sum of its branches' exponentials, its output the
    branch outputs weighted by their share of that sum."""
    batch, heads, length, head_dim = query.shape
    group = heads // key.shape[1]
    weight_sum = torch.zeros_like(lse)
    sources = _Rows(query), _Rows(key, group), _Rows(value, group)
    out_rows, lse_rows, sum_rows = _Rows(out), _Rows(lse.unsqueeze(-1)), _Rows(weight_sum.unsqueeze(-1))
    for start, window in _packed_windows(batch, heads, length, head_dim, branches):
        q, k, v = (source.gather(start, window) for source in sources)
        cu_seqlens = window.cu_seqlens_on(query.device)
        packed_out, packed_lse = _flash_varlen_forward(q, k, v, cu_seqlens, window.max_len, is_causal, scale)
        packed_lse = packed_lse.to(lse.dtype)
        (lse_view, rows), (sum_view, _), (out_view, _) = (
            x.window(start, window) for x in (lse_rows, sum_rows, out_rows)
        )
        lse_view = lse_view.squeeze(1)  # running maximum until the loop ends
        lse_view.scatter_reduce_(0, rows, packed_lse, "amax")
        weight = torch.exp(packed_lse - lse_view[rows])
        sum_view = sum_view.squeeze(1)
        sum_view.index_add_(0, rows, weight)
        weight = weight / sum_view[rows]
        out_view.index_add_(0, rows, packed_out.squeeze(1).to(out.dtype) * weight.unsqueeze(1))
    lse.add_(weight_sum.log())


def packed_backward(
    query, key, value, out, lse, grad_out, branches, is_causal: bool, scale: float, grad_q, grad_k, grad_v
) -> None:
    """Adds every branch's query, key and value gradients, recomputed against the merged ``out`` and
    ``lse``, into ``grad_q (B, H, L, D)`` and ``grad_k``, ``grad_v (B, Hkv, L, D)``."""
    batch, heads, length, head_dim = query.shape
    group = heads // key.shape[1]
    sources = _Rows(query), _Rows(key, group), _Rows(value, group), _Rows(out), _Rows(grad_out)
    lse_rows = _Rows(lse.unsqueeze(-1))
    targets = _Rows(grad_q), _Rows(grad_k, group), _Rows(grad_v, group)
    for start, window in _packed_windows(batch, heads, length, head_dim, branches):
        q, k, v, packed_out, packed_grad = (source.gather(start, window) for source in sources)
        packed_lse = lse_rows.gather(start, window).view(-1)
        cu_seqlens = window.cu_seqlens_on(query.device)
        grads = _flash_varlen_backward(
            packed_grad, q, k, v, packed_out, packed_lse, cu_seqlens, window.max_len, is_causal, scale
        )
        for target, grad in zip(targets, grads, strict=True):
            view, rows = target.window(start, window)
            view.index_add_(0, rows, grad.squeeze(1).to(view.dtype))


def fused_forward(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, branches, is_causal: bool, scale: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every branch through the backend's attention kernel, merged: ``(B, H*Lq, D)`` and ``(B, H*Lq)`` rows in
    the compute dtype (float32, or float64 for float64 inputs); log-sum-exp ``-inf`` where nothing covers."""
    kernel_forward, _ = _KERNELS[backend]
    batch, heads, q_len, head_dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    compute_dtype = torch.promote_types(query.dtype, torch.float32)
    out = query.new_zeros(batch, heads * q_len, head_dim, dtype=compute_dtype)
    lse = query.new_full((batch, heads * q_len), float("-inf"), dtype=compute_dtype)
    if q_len == k_len and _use_packed(query, backend):
        packed_forward(query, key, value, branches, is_causal, scale, out.view_as(query), lse.view(batch, heads, q_len))
        return out, lse
    if q_len == k_len:
        # Strided path: the kernel reads each branch's kept positions in place, no gathered copies.
        out_4d, lse_3d = out.view(batch, heads, q_len, head_dim), lse.view(batch, heads, q_len)
        key, value = _expand_heads(key, heads), _expand_heads(value, heads)
        for call in _strided_calls(branches, q_len, heads, (query, key, value, out_4d, lse_3d)):
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
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of query, key and value rows (compute dtype) for the given branches, each recomputed
    against the merged ``out`` and ``lse`` of all branches: exact, mixing weights included."""
    _, kernel_backward = _KERNELS[backend]
    batch, heads, q_len, head_dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    grad_q = torch.zeros(batch, heads * q_len, head_dim, dtype=lse.dtype, device=query.device)
    grad_k = torch.zeros(batch, kv_heads * k_len, head_dim, dtype=lse.dtype, device=query.device)
    grad_v = torch.zeros_like(grad_k)
    if q_len == k_len and _use_packed(query, backend):
        grad_k_4d, grad_v_4d = (x.view(batch, kv_heads, k_len, head_dim) for x in (grad_k, grad_v))
        packed_backward(
            query,
            key,
            value,
            out,
            lse.view(batch, heads, q_len),
            grad_out,
            branches,
            is_causal,
            scale,
            grad_q.view_as(query),
            grad_k_4d,
            grad_v_4d,
        )
        return grad_q, grad_k, grad_v
    if q_len == k_len:
        grad_q_4d = grad_q.view(batch, heads, q_len, head_dim)
        grad_k_4d, grad_v_4d = (
            (torch.zeros_like(grad_q_4d) for _ in range(2))
            if kv_heads != heads
            else (
                grad_k.view_as(grad_q_4d),
                grad_v.view_as(grad_q_4d),
            )
        )
        tensors = (query, _expand_heads(key, heads), _expand_heads(value, heads), out, grad_out)
        tensors += (lse.view(batch, heads, q_len), grad_q_4d, grad_k_4d, grad_v_4d)
        for call in _strided_calls(branches, q_len, heads, tensors):
            for q, k, v, call_out, call_grad, call_lse, call_grad_q, call_grad_k, call_grad_v in call:
                dq, dk, dv = kernel_backward(
                    call_grad, q, k, v, call_out, call_lse.contiguous(), is_causal, None, scale
                )
                call_grad_q.add_(dq)
                call_grad_k.add_(dk)
                call_grad_v.add_(dv)
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


class _DilatedAttentionFunction(torch.autograd.Function):
    """Fused dilated attention; backward recomputes each branch against the merged statistics."""

    @staticmethod
    def forward(ctx, query, key, value, branches, is_causal, scale, backend):
        out, lse = fused_forward(query, key, value, branches, is_causal, scale, backend)
        out = out.to(query.dtype).view_as(query)
        lse = lse.view(query.shape[:3])
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.branches, ctx.is_causal, ctx.scale, ctx.backend = branches, is_causal, scale, backend
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        query, key, value, out, lse = ctx.saved_tensors
        grad_q, grad_k, grad_v = fused_backward(
            query, key, value, out, lse, grad_out, ctx.branches, ctx.is_causal, ctx.scale, ctx.backend
        )
        # Cast one accumulator at a time, so at most one extra copy is alive.
        grad_q = grad_q.to(query.dtype).view_as(query)
        grad_k = grad_k.to(key.dtype).view_as(key)
        grad_v = grad_v.to(value.dtype).view_as(value)
        return grad_q, grad_k, grad_v, None, None, None, None
