"""Short query blocks against a longer key cache (decoding, chunked prefill): per query, gather each
branch's keys instead of running whole segments, so a step costs O(sum of w / r), not O(w^2 / r^2).
Plain autograd."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .dilated_attention_eager import masked_softmax
from .dilated_attention_merge import merge_branches

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
