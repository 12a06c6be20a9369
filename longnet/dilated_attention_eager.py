"""The eager path: dilated attention as a masked softmax in plain PyTorch, quadratic inside a segment.

The reference the fused paths are tested against, and the only path that returns attention weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .dilated_attention_merge import merge_branches


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
    attention probabilities (a key reached by two branches gets both shares) in the input dtype.
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
    # As in transformers' eager attention: weights in the input dtype, and the output computed from them
    # (equal to the merged branch outputs), so gradients reach the weights a caller keeps.
    weights = (mix[..., None] * torch.stack(probs)).sum(0).to(query.dtype)
    return torch.matmul(weights, value), lse, weights
