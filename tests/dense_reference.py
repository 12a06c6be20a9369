"""A dense N x N dilated attention written from DESIGN.md section 1, independent of the package."""

import math

import torch


def reference_attention(query, key, value, branches, is_causal, scale=None):
    """Dense masked softmax over the multiset union of the branches' keys, in float64.

    Straight from the definition: query position t takes part in branch (w, r) for head h iff
    (t mod w) mod r == h mod r; it then sees keys s in the same segment with the same residue,
    s <= t when causal. A key reached by k branches enters the softmax k times (log k added to its
    score). Rows that no branch covers give output 0 and log-sum-exp -inf.
    """
    query, key, value = query.double(), key.double(), value.double()
    batch, heads, q_len, head_dim = query.shape
    k_len = key.shape[2]
    group = heads // key.shape[1]
    key = key.repeat_interleave(group, dim=1)
    value = value.repeat_interleave(group, dim=1)
    t = torch.arange(k_len - q_len, k_len, device=query.device).view(1, q_len, 1)
    s = torch.arange(k_len, device=query.device).view(1, 1, k_len)
    h = torch.arange(heads, device=query.device).view(heads, 1, 1)
    count = torch.zeros(heads, q_len, k_len, dtype=torch.float64, device=query.device)
    for w, r in branches:
        takes_part = (t % w) % r == h % r
        sees = (s // w == t // w) & ((s % w) % r == h % r)
        if is_causal:
            sees = sees & (s <= t)
        count += (takes_part & sees).double()
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    logits = query @ key.transpose(-1, -2) * scale + count.log()
    covered = count.sum(-1) > 0
    logits = torch.where(covered[..., None], logits, 0.0)
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.softmax(logits, dim=-1) * covered[..., None]
    return probs @ value, torch.where(covered, lse, float("-inf"))
