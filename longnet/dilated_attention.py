"""Dilated attention (LongNet, arXiv 2307.02486, Eq. 9-12): the public function and the choice of path.

The sequence is cut into segments of length ``w``; inside a segment only every ``r``-th position is
kept, starting at offset ``h mod r`` for query head ``h``. Each ``(w, r)`` branch is an ordinary
softmax attention over its kept positions, and the branches are mixed by their softmax denominators,
which is the same as one softmax over the multiset union of the branches' keys.

Paths, one module each, chosen by ``backend=``:

- ``"eager"`` (``dilated_attention_eager``): masked softmax in plain PyTorch; the reference, and the
  only path that returns attention weights.
- ``"sdpa"`` (``dilated_attention_sdpa``): PyTorch's fused attention kernels, one call per branch and
  head residue on strided views of the inputs, branches merged by log-sum-exp.
- ``"triton"`` (``dilated_attention_triton``): one Triton launch per direction over every branch,
  segment, head and batch row, reading kept positions in place.
- ``"gathered"`` (``dilated_attention_gathered``): a short block of queries against a longer key
  cache (decoding), each query's keys gathered per branch.

``sdpa`` and ``triton`` run inside one custom operator (``longnet::fused_attention``, differentiable)
whose backward recomputes every branch against the merged output and log-sum-exp, so gradients are
exact (mixing weights included) and memory stays O(N).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch

from .dilated_attention_eager import eager_dilated_attention
from .dilated_attention_gathered import GATHER_MAX_QUERIES, decode_dilated_attention, gathered_dilated_attention
from .dilated_attention_sdpa import KERNELS as SDPA_KERNELS
from .dilated_attention_sdpa import backward as sdpa_backward
from .dilated_attention_sdpa import forward as sdpa_forward
from .dilated_attention_triton import backward as triton_backward
from .dilated_attention_triton import forward as triton_forward
from .dilated_attention_triton import unsupported_reason as triton_unsupported_reason

BACKENDS = ("auto", "eager", "sdpa", "triton", "gathered")
# The fused paths' (forward, backward), run by the custom operators fused_attention and its backward.
FUSED_PATHS = {"sdpa": (sdpa_forward, sdpa_backward), "triton": (triton_forward, triton_backward)}
# Positions are indexed with 32-bit integers inside the kernels' tile lists.
MAX_SEGMENT_LENGTH = 2**31 - 1


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
        scale: softmax scale, positive; ``1 / sqrt(D)`` when ``None``.
        backend: ``"auto"``, ``"eager"``, ``"sdpa"``, ``"triton"`` or ``"gathered"`` (see the module
            docstring); ``"auto"`` picks by device, dtype and shape (``choose_backend``).
        return_lse: also return the merged log-sum-exp ``(B, H, Lq)`` in float32 (``-inf`` where no
            branch covers a (query, head) pair; the output there is 0). It carries no gradient.
        group: a ``torch.distributed`` process group to split the sequence over: the inputs are then
            this rank's chunk ``[i*L, (i+1)*L)`` (same L on every rank, no KV cache) and the output is
            this rank's chunk of the single-process result (``longnet.sequence_parallel``).

    Returns:
        The output ``(B, H, Lq, D)``, and the log-sum-exp when ``return_lse`` is set.
    """
    branches = check_branches(segment_lengths, dilation_rates)
    if not isinstance(is_causal, bool):
        raise ValueError(f"is_causal must be a bool, got {is_causal!r}")
    device_type = query.device.type if isinstance(query, torch.Tensor) else "cpu"
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        # Like scaled_dot_product_attention under autocast: run in the autocast dtype.
        dtype = torch.get_autocast_dtype(device_type)
        query, key, value = (x.to(dtype) if isinstance(x, torch.Tensor) else x for x in (query, key, value))
    _check_tensors(query, key, value)
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < math.inf:
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    backend = _resolve_backend(backend, query, key, group)
    if group is not None:
        from .sequence_parallel import sequence_parallel_dilated_attention

        with torch.autocast(device_type, enabled=False):
            out, lse = sequence_parallel_dilated_attention(query, key, value, branches, is_causal, scale, group)
    elif backend == "eager":
        out, lse = eager_dilated_attention(query, key, value, branches, is_causal, scale)
        lse = lse.detach()
    elif backend == "gathered":
        few_queries = decode_dilated_attention if query.shape[2] == 1 else gathered_dilated_attention
        out, lse = few_queries(query, key, value, branches, is_causal, scale)
        lse = lse.detach()
    else:
        with torch.autocast(device_type, enabled=False):
            out, lse = fused_attention(query, key, value, segment_lengths, dilation_rates, is_causal, scale, backend)
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------------------------------
# Input checks and the choice of path


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
            if number > MAX_SEGMENT_LENGTH:
                raise ValueError(f"{name} must hold integers below 2**31, got {item!r}")
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


def choose_backend(query: torch.Tensor, key: torch.Tensor) -> str:
    """The path ``backend="auto"`` takes, by what was measured (docs/benchmarks/attention_cuda.md, cpu.md).

    - A few queries against a longer cache: ``gathered`` (a decoding step costs O(sum of w/r), not
      whole segments).
    - CUDA, half precision, a head size the kernels take, equal lengths: ``triton`` (one launch per
      direction; faster than ``sdpa``'s one flash call per branch and head residue at every measured
      length, 8K to 4M). float32 keeps ``sdpa`` (the memory-efficient kernel computes in exact fp32
      where the Triton kernels would need slow IEEE products).
    - Otherwise ``sdpa`` on CPU and CUDA tensors (on CPU the Triton kernels exist only interpreted),
      ``eager`` elsewhere.
    """
    if query.shape[2] < key.shape[2] and query.shape[2] <= GATHER_MAX_QUERIES:
        return "gathered"
    if (
        query.device.type == "cuda"
        and query.dtype in (torch.float16, torch.bfloat16)
        and triton_unsupported_reason(query, key) is None
    ):
        return "triton"
    return "sdpa" if query.device.type in ("cpu", "cuda") else "eager"


def _resolve_backend(backend: str, query: torch.Tensor, key: torch.Tensor, group) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if group is not None:
        if backend not in ("auto", "sdpa"):
            raise ValueError(f"sequence parallel attention (group=...) runs on the sdpa path, not {backend!r}")
        backend = "sdpa"
    if backend == "auto":
        return choose_backend(query, key)
    if backend == "sdpa" and query.device.type not in SDPA_KERNELS:
        raise ValueError(f"backend 'sdpa' needs CPU or CUDA tensors, got tensors on {query.device}")
    if backend == "triton" and (reason := triton_unsupported_reason(query, key)) is not None:
        raise ValueError(f"backend 'triton' cannot run here: {reason}")
    if backend == "gathered" and query.shape[2] > GATHER_MAX_QUERIES:
        raise ValueError(
            f"backend 'gathered' takes at most {GATHER_MAX_QUERIES} queries (its memory grows with "
            f"queries x keys per branch), got {query.shape[2]}"
        )
    return backend


# The fused paths are custom operators: torch.compile calls them as they are, one node in the graph (their
# launch plans depend on strides and offsets, which tracing would turn into graph breaks and recompiles),
# with a fake implementation that gives the outputs' shapes, dtypes and layouts.


@torch.library.custom_op("longnet::fused_attention", mutates_args=())
def fused_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    segment_lengths: list[int],
    dilation_rates: list[int],
    is_causal: bool,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fused path's output (input dtype) and log-sum-exp (float32, float64 for float64 inputs)."""
    path_forward, _ = FUSED_PATHS[backend]
    branches = tuple(zip(segment_lengths, dilation_rates, strict=True))
    out, lse = path_forward(query, key, value, branches, is_causal, scale)
    return out.to(query.dtype), lse


@fused_attention.register_fake
def _(query, key, value, segment_lengths, dilation_rates, is_causal, scale, backend):
    # The Triton path writes its output laid out like the query; the sdpa path's is contiguous.
    out = torch.empty_like(query) if backend == "triton" else query.new_empty(query.shape)
    return out, query.new_empty(query.shape[:3], dtype=torch.promote_types(query.dtype, torch.float32))


@torch.library.custom_op("longnet::fused_attention_backward", mutates_args=())
def fused_attention_backward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    segment_lengths: list[int],
    dilation_rates: list[int],
    is_causal: bool,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query, key and value gradients: each branch recomputed against the merged statistics."""
    _, path_backward = FUSED_PATHS[backend]
    branches = tuple(zip(segment_lengths, dilation_rates, strict=True))
    grad_q, grad_k, grad_v = path_backward(query, key, value, out, lse, grad_out, branches, is_causal, scale)
    # Cast one accumulator at a time, so at most one extra copy is alive.
    grad_q = grad_q.to(query.dtype)
    grad_k = grad_k.to(key.dtype)
    return grad_q, grad_k, grad_v.to(value.dtype)


@fused_attention_backward.register_fake
def _(query, key, value, out, lse, grad_out, segment_lengths, dilation_rates, is_causal, scale, backend):
    like = torch.empty_like if backend == "triton" else (lambda tensor: tensor.new_empty(tensor.shape))
    return like(query), like(key), like(value)


def _save_for_backward(ctx, inputs, output) -> None:
    query, key, value, *ctx.settings = inputs
    ctx.save_for_backward(query, key, value, *output)
    ctx.mark_non_differentiable(output[1])
    # The log-sum-exp's gradient is never used: no zeros are made for it (on a GPU, profiled at 8K, a
    # zero fill per backward).
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, _grad_lse):
    if grad_out is None:  # nothing flows back (autograd may still call with undefined gradients)
        return (None,) * 8
    gradients = fused_attention_backward(*ctx.saved_tensors, grad_out, *ctx.settings)
    return (*gradients, None, None, None, None, None)


fused_attention.register_autograd(_backward, setup_context=_save_for_backward)
