"""The sequences inside a batch that dilated attention must see apart: padding dropped, packed documents split.

Dilated attention counts positions from the start of each sequence, so a padded or packed row is cut into
its documents, and each document runs on its own (``attend_documents``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .dilated_attention import dilated_attention
from .dilated_attention_eager import eager_dilated_attention


@dataclass
class Document:
    """One sequence inside a batch row: its key positions and query positions (indices into the
    layer's key and query axes). The queries are always the last ``len(query_index)`` keys."""

    row: int
    key_index: torch.Tensor
    query_index: torch.Tensor


@torch.compiler.disable  # reads the mask's values: torch.compile would break the graph on it anyway
def find_documents(
    attention_mask: torch.Tensor | None, position_ids: torch.Tensor, past_length: int
) -> list[Document] | None:
    """Splits the batch into the sequences that dilated attention must see separately.

    ``attention_mask`` is ``(B, past + current)`` or None, ``position_ids`` is ``(B, current)``.
    Returns ``None`` when every row is one sequence without padding (the fast, batched path).
    Padding (mask zeros) is dropped. Without a cache, a ``position_ids`` value of 0 after a row's
    first token starts a new document (packed sequences); with a cache, each row's real tokens are
    one sequence.
    """
    batch, query_length = position_ids.shape
    key_length = past_length + query_length
    starts_document = torch.zeros(batch, key_length, dtype=torch.bool, device=position_ids.device)
    if past_length == 0:
        starts_document[:, 1:] = position_ids[:, 1:] == 0
    if attention_mask is None:
        if not bool(starts_document.any()):
            return None
        attention_mask = torch.ones(batch, key_length, dtype=torch.bool, device=position_ids.device)
    elif bool(attention_mask.all()) and not bool(starts_document.any()):
        return None
    documents = []
    for row in range(batch):
        real = attention_mask[row].nonzero().squeeze(1)
        starts = starts_document[row, real].nonzero().squeeze(1).tolist()
        bounds = [0] + [i for i in starts if i > 0] + [real.numel()]
        for begin, end in zip(bounds[:-1], bounds[1:], strict=True):
            key_index = real[begin:end]
            query_index = key_index[key_index >= past_length] - past_length
            if query_index.numel() > 0:
                documents.append(Document(row, key_index, query_index))
    return documents


def attend_documents(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    documents: list[Document] | None,
    segment_lengths: list[int],
    dilation_rates: list[int],
    scale: float,
    backend: str = "auto",
    group=None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal dilated attention over ``(B, H, L, D)`` inputs, each document on its own.

    Returns the output ``(B, H, Lq, D)`` (0 at padding queries) and, from the eager backend, the weights
    ``(B, H, Lq, Lk)`` (None from the others). With a process ``group`` the inputs are this rank's
    chunk of one sequence split across the group (see ``longnet.sequence_parallel``).
    """
    if group is not None:
        if backend == "eager" or documents is not None:
            raise ValueError("sequence parallelism runs the fused kernel on whole, unpadded sequences")
        return dilated_attention(query, key, value, segment_lengths, dilation_rates, scale=scale, group=group), None
    branches = list(zip(segment_lengths, dilation_rates, strict=True))
    if backend == "eager" and documents is None:
        out, _, weights = eager_dilated_attention(query, key, value, branches, True, scale, return_weights=True)
        return out, weights
    if backend == "eager":
        batch, heads, q_len, _ = query.shape
        weights = query.new_zeros(batch, heads, q_len, key.shape[2])
        for doc in documents:
            q = query[doc.row : doc.row + 1, :, doc.query_index]
            k, v = (t[doc.row : doc.row + 1, :, doc.key_index] for t in (key, value))
            _, _, doc_weights = eager_dilated_attention(q, k, v, branches, True, scale, return_weights=True)
            weights[doc.row, :, doc.query_index[:, None], doc.key_index] = doc_weights[0]
        # The output is computed from the weights returned, so gradients reach them (as in transformers'
        # eager attention); padding queries have no weights and output 0.
        return torch.matmul(weights, value.repeat_interleave(heads // value.shape[1], dim=1)), weights
    if documents is None:
        return dilated_attention(query, key, value, segment_lengths, dilation_rates, scale=scale, backend=backend), None
    output = None
    for doc in documents:
        doc_output = dilated_attention(
            query[doc.row : doc.row + 1, :, doc.query_index],
            key[doc.row : doc.row + 1, :, doc.key_index],
            value[doc.row : doc.row + 1, :, doc.key_index],
            segment_lengths,
            dilation_rates,
            scale=scale,
            backend=backend,
        )
        if output is None:  # the kernel's dtype (autocast may lower it) sets the dtype; padding queries keep 0
            output = query.new_zeros(query.shape, dtype=doc_output.dtype)
        output[doc.row, :, doc.query_index] = doc_output[0]
    return (output if output is not None else torch.zeros_like(query)), None
