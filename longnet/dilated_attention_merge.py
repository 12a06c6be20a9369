"""Mixing dilated attention's branches by their log-sum-exps (paper Eq. 10): the one family of merge
helpers every path uses, whole stacks of branches or one branch at a time into running rows."""

from __future__ import annotations

import torch


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
