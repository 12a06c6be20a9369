"""``attn_implementation="longnet_dilated"`` for stock transformers decoders (Llama, Mistral, Qwen2, ...).

After ``import longnet``, a model whose config carries ``segment_lengths`` and ``dilation_rates`` can
run dilated attention in place of its own:

    model = LlamaForCausalLM.from_pretrained(path, attn_implementation="longnet_dilated")
    model.config.segment_lengths, model.config.dilation_rates = [2048, 8192], [1, 4]

The name is registered in both the attention and the attention-mask interfaces. The mask function
hands the attention function the 2D padding mask (never a 4D one: memory stays linear), and the
attention function applies causality and dilation itself, dropping padding and splitting packed
documents exactly as ``LongNetModel`` does. Sliding windows (Mistral, Qwen2) are not applied; a
model that trains with attention dropout is refused (the kernel has none), never run without it.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, prepare_padding_mask

from .dilated_attention import check_branches
from .modeling_longnet import attend_documents, find_documents

NAME = "longnet_dilated"


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
    """The ``(B, kv_length)`` padding mask, or None when nothing is padded."""
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if padding is None or bool(padding.all()):
        return None
    return padding.bool()


def longnet_dilated_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """An ``AttentionInterface`` function: ``(B, H, L, D)`` in, ``(B, L, H, D)`` out."""
    config = module.config
    segment_lengths = getattr(config, "segment_lengths", None)
    dilation_rates = getattr(config, "dilation_rates", None)
    if segment_lengths is None or dilation_rates is None:
        raise ValueError(
            f"attn_implementation='{NAME}' needs segment_lengths and dilation_rates in the model's config "
            f"(e.g. config.segment_lengths = [2048, 8192]; config.dilation_rates = [1, 4]); "
            f"{type(config).__name__} has segment_lengths={segment_lengths}, dilation_rates={dilation_rates}"
        )
    check_branches(segment_lengths, dilation_rates)
    if dropout:  # the model passes its attention_dropout only in training mode
        raise ValueError(
            f"attn_implementation='{NAME}' has no attention dropout (the dilated kernel never forms the attention "
            f"weights), but this model trains with attention_dropout={dropout}: load it with attention_dropout=0.0 "
            f"(e.g. from_pretrained(..., attention_dropout=0.0)) or use another attn_implementation"
        )
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"attn_implementation='{NAME}' takes the 2D padding mask its mask function builds; got a "
            f"{attention_mask.dim()}D mask (a custom 4D attention_mask is not supported)"
        )
    batch, _, q_len, _ = query.shape
    past_length = key.shape[2] - q_len
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(past_length, key.shape[2], device=query.device)[None]
    documents = find_documents(attention_mask, position_ids.expand(batch, -1), past_length)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    output, _ = attend_documents(query, key, value, documents, segment_lengths, dilation_rates, scale)
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, longnet_dilated_attention_forward)
AttentionMaskInterface.register(NAME, longnet_padding_mask)
