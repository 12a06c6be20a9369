"""The attention functions of LongNet, looked up by ``config._attn_implementation`` as transformers does.

- ``"longnet_dilated"``: the fused dilated attention kernel; LongNet's default. After ``import longnet`` a
  stock decoder (Llama, Mistral, Qwen2, ...) whose config carries ``segment_lengths`` and
  ``dilation_rates`` runs it too:

      model = LlamaForCausalLM.from_pretrained(path, attn_implementation="longnet_dilated")
      model.config.segment_lengths, model.config.dilation_rates = [2048, 8192], [1, 4]

- ``"eager"``: the reference, quadratic inside a segment, which also returns the attention weights.

The name is registered in both the attention and the attention-mask interfaces. The mask function hands
the attention function the 2D padding mask (never a 4D one: memory stays linear), and the attention
function applies causality and dilation itself, dropping padding and splitting packed documents.
``LongNetModel`` finds the documents once per forward and passes them as ``documents``. Sliding windows
(Mistral, Qwen2) are not applied, and a cache that keeps only a window of keys (or a static one) is
refused; a model that trains with attention dropout is refused (the kernel has none), never run without it.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, prepare_padding_mask

from .dilated_attention import check_branches
from .documents import attend_documents, find_documents

ATTN_IMPLEMENTATION = "longnet_dilated"


def longnet_padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """The ``(B, kv_length)`` padding mask, or None when nothing is padded.

    For a stock model the attention function reads the keys as positions 0 … kv_length - 1 of the
    sequence, so its cache must hold every key and nothing more: a sliding-window cache that dropped keys,
    or a static one whose slots are not all written yet, is refused here (they gave wrong outputs, zeros
    for a static cache). ``LongNetModel`` tells its attention the written length itself."""
    written = q_offset + q_length  # a static cache's q_offset is a tensor
    stock = getattr(kwargs.get("config"), "model_type", None) != "longnet"
    if stock and (kv_offset or kv_length != written):
        kind = "its sliding window dropped the first keys" if kv_offset else "a static cache, not all written yet"
        raise ValueError(
            f"attn_implementation='longnet_dilated' needs a cache that holds every key in order (the default "
            f"DynamicCache without a sliding window); this one holds {kv_length} keys for {int(written)} positions "
            f"({kind}). For a sliding-window model (Mistral, Qwen2) set model.config.sliding_window = None "
            "(dilated attention applies no window); leave out cache_implementation='static'"
        )
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if padding is None or bool(padding.all()):
        return None
    return padding.bool()


def attend(
    backend: str,
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    dropout: float,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Either attention function: ``(B, H, L, D)`` in, ``(B, L, H, D)`` out, and the weights (eager only)."""
    config = module.config
    segment_lengths = getattr(config, "segment_lengths", None)
    dilation_rates = getattr(config, "dilation_rates", None)
    if segment_lengths is None or dilation_rates is None:
        raise ValueError(
            f"attn_implementation='longnet_dilated' needs segment_lengths and dilation_rates in the model's config "
            f"(e.g. config.segment_lengths = [2048, 8192]; config.dilation_rates = [1, 4]); "
            f"{type(config).__name__} has segment_lengths={segment_lengths}, dilation_rates={dilation_rates}"
        )
    check_branches(segment_lengths, dilation_rates)
    if dropout:  # the model passes its attention_dropout only in training mode
        raise ValueError(
            f"attn_implementation='longnet_dilated' has no attention dropout (the dilated kernel never forms the "
            f"attention weights), but this model trains with attention_dropout={dropout}: load it with "
            "attention_dropout=0.0 (e.g. from_pretrained(..., attention_dropout=0.0)) or use another "
            "attn_implementation"
        )
    if "documents" in kwargs:
        documents = kwargs["documents"]
    else:
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                f"attn_implementation='longnet_dilated' takes the 2D padding mask its mask function builds; got a "
                f"{attention_mask.dim()}D mask (a custom 4D attention_mask is not supported)"
            )
        batch, _, q_len, _ = query.shape
        past_length = key.shape[2] - q_len
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(past_length, key.shape[2], device=query.device)[None]
        documents = find_documents(attention_mask, position_ids.expand(batch, -1), past_length)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    output, weights = attend_documents(
        query,
        key,
        value,
        documents,
        segment_lengths,
        dilation_rates,
        scale,
        backend=backend,
        group=kwargs.get("sequence_parallel_group"),
    )
    return output.transpose(1, 2).contiguous(), weights


def longnet_dilated_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``"longnet_dilated"``: the fused kernel. Returns ``(output, None)``."""
    return attend("auto", module, query, key, value, attention_mask, scaling, dropout, **kwargs)


def eager_dilated_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``"eager"`` in LongNet: the reference kernel. Returns ``(output, weights (B, H, Lq, Lk))``."""
    return attend("eager", module, query, key, value, attention_mask, scaling, dropout, **kwargs)


AttentionInterface.register(ATTN_IMPLEMENTATION, longnet_dilated_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, longnet_padding_mask)
