"""Dilated attention with one sequence split across the ranks of a torch.distributed group (paper §3.1).

Rank i of a group of P holds positions ``[i*L, (i+1)*L)`` of query, key and value (the same L on every
rank) and gets back its positions of the exact single-process result. A branch whose segment length
divides L is computed locally (each rank starts at a multiple of w, so local positions dilate as the
global ones). For a branch whose segments span several ranks, each rank keeps only the positions the
branch keeps ("sparsified" keys and values, about L/r per head) and sends them, packed in one tensor,
to the ranks of its segment that need them: for causal attention only the later ones. Each rank then
attends its queries to the kept keys of its segment: earlier ranks' keys whole, its own causally.
Backward recomputes every branch against the merged output and log-sum-exp, as the single-process
kernel does, and sends the gradients of received keys back to their owners (the exchange's adjoint),
so gradients are exact. Per rank and branch that is about ``(w/L - 1) * L/r`` keys and values each
way, which does not grow with the sequence when L does not. Point-to-point sends (gloo and NCCL) run
inside one autograd node in program order, the same on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from .dilated_attention_merge import merge_into, merge_rows
from .dilated_attention_sdpa import KERNELS, fused_backward, fused_forward

# Bytes this process has sent to other ranks, forward and backward (measured by the benchmark).
BYTES_SENT = {"forward": 0, "backward": 0}


def check_split(branches: Sequence[tuple[int, int]], local_length: int, lengths: list[int]) -> None:
    """Raises the same ValueError on every rank for a split the algorithm does not support."""
    if len(set(lengths)) != 1:
        raise ValueError(f"sequence parallel attention needs the same length on every rank, got {lengths}")
    for w, _ in branches:
        if local_length % w != 0 and w % local_length != 0:
            raise ValueError(
                f"segment length {w} neither divides nor is a multiple of the per-rank length {local_length}; "
                "choose a per-rank length that each segment length divides or is a multiple of"
            )


def sequence_parallel_dilated_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    branches: Sequence[tuple[int, int]],
    is_causal: bool,
    scale: float,
    group,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's output ``(B, H, L, D)`` and log-sum-exp ``(B, H, L)``, on the sdpa path (CPU or CUDA
    tensors); see the module docstring."""
    if query.shape[2] != key.shape[2]:
        raise ValueError("sequence parallel attention takes no KV cache: query and key must have the same length")
    lengths = [torch.zeros(1, dtype=torch.long, device=query.device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(lengths, torch.tensor([query.shape[2]], device=query.device), group=group)
    check_split(branches, query.shape[2], [int(x) for x in lengths])
    return _SequenceParallelFunction.apply(query, key, value, tuple(branches), is_causal, scale, group)


class _Span:
    """How one branch whose segments span ranks maps onto this rank, for one head offset ``o``.

    Every quantity is computed from global positions, so all ranks agree on it without talking."""

    def __init__(self, w: int, r: int, offset: int, length: int, rank: int, world: int, device):
        self.first_rank, self.members = _segment_members(w, length, rank, world)
        segment_start = self.first_rank * length
        # Positions of each member rank that the offset keeps, as indices into that rank's chunk.
        self.kept = []
        for member in range(self.first_rank, self.first_rank + self.members):
            chunk = torch.arange(member * length, (member + 1) * length, device=device)
            self.kept.append(chunk[(chunk - segment_start) % r == offset] - member * length)
        self.member = rank - self.first_rank  # this rank's place in its segment
        self.own = self.kept[self.member]  # this rank's kept positions (local indices)
        self.before = sum(len(k) for k in self.kept[: self.member])  # kept keys of earlier ranks


class _SequenceParallelFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, branches, is_causal, scale, group):
        kernel_forward, _ = KERNELS[query.device.type]
        batch, heads, length, head_dim = query.shape
        kv_heads = key.shape[1]
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        local = [(w, r) for w, r in branches if length % w == 0]
        spanning = [(w, r) for w, r in branches if length % w != 0]
        if local:
            out, lse = fused_forward(query, key, value, local, is_causal, scale)
        else:
            out = query.new_zeros(
                batch, heads * length, head_dim, dtype=torch.promote_types(query.dtype, torch.float32)
            )
            lse = query.new_full((batch, heads * length), float("-inf"), dtype=out.dtype)
        gathered = []
        for w, r in spanning:
            keys_values = _exchange_keys(key, value, w, r, heads, rank, world, group, is_causal)
            gathered.append(keys_values)
            for offset, heads_of_offset in _offsets(r, heads):
                span = _Span(w, r, offset, length, rank, world, query.device)
                part_out, part_lse = _attend_span(
                    kernel_forward, query, key, value, keys_values, span, heads_of_offset, heads, is_causal, scale
                )
                targets = _rows(heads_of_offset, span.own, length)
                merge_rows(out, lse, targets, part_out.to(out.dtype), part_lse.to(out.dtype))
        out_rows, lse_rows = out, lse
        out = out_rows.to(query.dtype).view_as(query)
        lse = lse_rows.view(batch, heads, length)
        ctx.save_for_backward(query, key, value, out, lse, *gathered)
        ctx.config = (branches, local, spanning, is_causal, scale, group, kv_heads)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        query, key, value, out, lse, *gathered = ctx.saved_tensors
        branches, local, spanning, is_causal, scale, group, kv_heads = ctx.config
        _, kernel_backward = KERNELS[query.device.type]
        batch, heads, length, head_dim = query.shape
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        grad_out = grad_out.contiguous()
        if local:
            grad_q, grad_k, grad_v = fused_backward(query, key, value, out, lse, grad_out, local, is_causal, scale)
        else:
            grad_q = torch.zeros(batch, heads * length, head_dim, dtype=lse.dtype, device=query.device)
            grad_k = torch.zeros(batch, kv_heads * length, head_dim, dtype=lse.dtype, device=query.device)
            grad_v = torch.zeros_like(grad_k)
        for (w, r), keys_values in zip(spanning, gathered, strict=True):
            # Gradients for the gathered keys/values of every member rank, laid out as the gather.
            grad_gathered = torch.zeros_like(keys_values, dtype=lse.dtype)
            spans = [
                (_Span(w, r, o, length, rank, world, query.device), heads_of) for o, heads_of in _offsets(r, heads)
            ]
            for span, heads_of_offset in spans:
                _attend_span_backward(
                    kernel_backward,
                    query,
                    out,
                    lse,
                    grad_out,
                    keys_values,
                    span,
                    heads_of_offset,
                    is_causal,
                    scale,
                    grad_q,
                    grad_gathered,
                )
            own = _return_gradients(grad_gathered, w, length, rank, world, group, is_causal)
            for span, heads_of_offset in spans:
                slots = len(span.own)
                for h in heads_of_offset:
                    rows = (h // (heads // kv_heads)) * length + span.own
                    grad_k.index_add_(1, rows, own[:, h, :slots, :head_dim])
                    grad_v.index_add_(1, rows, own[:, h, :slots, head_dim:])
        return (
            grad_q.to(query.dtype).view_as(query),
            grad_k.to(key.dtype).view_as(key),
            grad_v.to(value.dtype).view_as(value),
            None,
            None,
            None,
            None,
            None,
        )


def _offsets(r: int, heads: int) -> list[tuple[int, list[int]]]:
    """Head offsets in use and the heads that have each: head h keeps positions h mod r."""
    return [(o, list(range(o, heads, r))) for o in range(min(r, heads))]


def _rows(heads_of_offset: list[int], positions: torch.Tensor, length: int) -> torch.Tensor:
    """Row indices into ``(B, H*L, ...)`` of the given heads at the given local positions."""
    return torch.cat([h * length + positions for h in heads_of_offset])


def _segment_members(w: int, length: int, rank: int, world: int) -> tuple[int, int]:
    """First rank and number of ranks of this rank's segment of length ``w`` (a multiple of ``length``)."""
    first = (rank * length // w) * w // length
    return first, min(w // length, world - first)


def _peers(first: int, members: int, rank: int, is_causal: bool) -> tuple[list[int], list[int]]:
    """Member ranks this rank sends its kept keys to, and those it receives kept keys from.

    Causal queries need only earlier ranks' keys: send to later members, receive from earlier ones."""
    others = [m for m in range(first, first + members) if m != rank]
    if not is_causal:
        return others, others
    return [m for m in others if m > rank], [m for m in others if m < rank]


def _point_to_point(sends: dict[int, torch.Tensor], receives: dict[int, torch.Tensor], group, direction: str) -> None:
    """Sends and receives between ranks of ``group`` (group ranks as keys), all at once."""
    operations = [dist.P2POp(dist.isend, t, dist.get_global_rank(group, peer), group) for peer, t in sends.items()]
    operations += [dist.P2POp(dist.irecv, t, dist.get_global_rank(group, peer), group) for peer, t in receives.items()]
    for request in dist.batch_isend_irecv(operations) if operations else []:
        request.wait()
    BYTES_SENT[direction] += sum(t.numel() * t.element_size() for t in sends.values())


def _exchange_keys(key, value, w, r, heads, rank, world, group, is_causal) -> torch.Tensor:
    """The kept keys and values of this rank's segment members: ``(members, B, H, slots, 2D)``.

    Each rank packs its kept keys and values (about L/r per head, padded to the same slots) into one
    tensor and sends it only to the members of its segment that need it; members it does not hear
    from stay zero."""
    batch, kv_heads, length, head_dim = key.shape
    packed = key.new_zeros(batch, heads, -(-length // r), 2 * head_dim)
    for offset, heads_of_offset in _offsets(r, heads):
        span = _Span(w, r, offset, length, rank, world, key.device)
        for h in heads_of_offset:
            kv = h // (heads // kv_heads)
            packed[:, h, : len(span.own), :head_dim] = key[:, kv, span.own]
            packed[:, h, : len(span.own), head_dim:] = value[:, kv, span.own]
    first, members = _segment_members(w, length, rank, world)
    send_to, receive_from = _peers(first, members, rank, is_causal)
    gathered = packed.new_zeros(members, *packed.shape)
    gathered[rank - first] = packed
    _point_to_point(
        {peer: packed for peer in send_to}, {peer: gathered[peer - first] for peer in receive_from}, group, "forward"
    )
    return gathered


def _return_gradients(grad_gathered, w, length, rank, world, group, is_causal) -> torch.Tensor:
    """The exchange's adjoint: gradients for other members' keys go back to them; returns the summed
    gradient ``(B, H, slots, 2D)`` for this rank's own kept keys and values."""
    first, members = _segment_members(w, length, rank, world)
    send_to, receive_from = _peers(first, members, rank, is_causal)
    received = {peer: torch.empty_like(grad_gathered[0]) for peer in send_to}
    _point_to_point(
        {peer: grad_gathered[peer - first].contiguous() for peer in receive_from}, received, group, "backward"
    )
    own = grad_gathered[rank - first].clone()
    for peer in sorted(received):
        own += received[peer]
    return own


def _segment_keys(keys_values, span: _Span, heads_of_offset: list[int], members: range):
    """Kept (keys | values) of the given member ranks of the segment, concatenated in order."""
    parts = [keys_values[m][:, heads_of_offset, : len(span.kept[m])] for m in members]
    return torch.cat(parts, dim=2)


def _attend_span(kernel_forward, query, key, value, keys_values, span, heads_of_offset, heads, is_causal, scale):
    """Out ``(B, rows, D)`` and lse ``(B, rows)`` of this rank's kept queries of one offset, rows ordered
    head-major as ``_rows`` orders them. Causal: own keys causally, earlier ranks' keys whole."""
    head_dim = query.shape[3]
    q = query[:, heads_of_offset][:, :, span.own]
    member = span.member
    if is_causal:
        own = _segment_keys(keys_values, span, heads_of_offset, range(member, member + 1))
        out, lse = kernel_forward(q, own[..., :head_dim], own[..., head_dim:], True, None, scale)
        if span.before:
            earlier = _segment_keys(keys_values, span, heads_of_offset, range(member))
            out2, lse2 = kernel_forward(q, earlier[..., :head_dim], earlier[..., head_dim:], False, None, scale)
            compute_dtype = torch.promote_types(out.dtype, torch.float32)
            out, lse = out.to(compute_dtype), lse.to(compute_dtype)
            merge_into(out, lse, out2, lse2.to(compute_dtype))
    else:
        every = _segment_keys(keys_values, span, heads_of_offset, range(span.members))
        out, lse = kernel_forward(q, every[..., :head_dim], every[..., head_dim:], False, None, scale)
    return out.flatten(1, 2), lse.flatten(1, 2)


def _attend_span_backward(
    kernel_backward,
    query,
    out,
    lse,
    grad_out,
    keys_values,
    span,
    heads_of_offset,
    is_causal,
    scale,
    grad_q,
    grad_gathered,
) -> None:
    """Adds one offset's contribution of a spanning branch to this rank's query gradient rows and to the
    gradients of the segment's kept keys and values (``grad_gathered``, laid out as the exchange)."""
    batch, _, length, head_dim = query.shape
    q = query[:, heads_of_offset][:, :, span.own]
    o = out[:, heads_of_offset][:, :, span.own]
    g = grad_out[:, heads_of_offset][:, :, span.own]
    lse_rows = lse[:, heads_of_offset][:, :, span.own].contiguous()
    member = span.member
    parts = [(range(member, member + 1), True)] if is_causal else [(range(span.members), False)]
    if is_causal and span.before:
        parts.append((range(member), False))
    dq_total = torch.zeros_like(q, dtype=lse.dtype)
    for members, causal in parts:
        kv = _segment_keys(keys_values, span, heads_of_offset, members)
        dq, dk, dv = kernel_backward(
            g, q, kv[..., :head_dim].contiguous(), kv[..., head_dim:].contiguous(), o, lse_rows, causal, None, scale
        )
        dq_total += dq.to(lse.dtype)
        start = 0
        for m in members:
            count = len(span.kept[m])
            for index, h in enumerate(heads_of_offset):
                grad_gathered[m][:, h, :count, :head_dim] += dk[:, index, start : start + count]
                grad_gathered[m][:, h, :count, head_dim:] += dv[:, index, start : start + count]
            start += count
    grad_q.index_add_(1, _rows(heads_of_offset, span.own, length), dq_total.flatten(1, 2))
