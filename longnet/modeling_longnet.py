"""LongNet: a Llama-style decoder whose self-attention is dilated attention (arXiv 2307.02486).

Module and parameter names are Llama's (`model.embed_tokens`, `model.layers.N.self_attn.q_proj`, ...,
`model.norm`, `lm_head`), so a Llama state dict loads unchanged.

Dilated attention counts positions from the start of each sequence. A batch row can hold padding
(any `attention_mask` zeros) or several packed documents (`position_ids` restarting at 0, as from
`DataCollatorWithFlattening`); the model then runs each document on its own, with positions counted
from its first real token, so a padded or packed batch gives what each sequence gives alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import PreTrainedModel

from .configuration_longnet import LongNetConfig
from .dilated_attention import dilated_attention
from .dilated_attention_eager import eager_dilated_attention


class LongNetRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class LongNetRotaryEmbedding(nn.Module):
    def __init__(self, config: LongNetConfig):
        super().__init__()
        # What dynamic_rope_update reads and updates.
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        init_fn: Callable = self.compute_default_rope_parameters
        if self.rope_type != "default":
            init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = init_fn(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: LongNetConfig, **kwargs) -> tuple[torch.Tensor, float]:
        base = config.rope_parameters["rope_theta"]
        dim = config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update  # "dynamic" RoPE: rescales the frequencies past original_max_position_embeddings
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    """Rotates ``q``, ``k`` of shape ``(B, heads, L, D)`` by ``cos``, ``sin`` of shape ``(B, L, D)``."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class LongNetMLP(nn.Module):
    def __init__(self, config: LongNetConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LongNetCacheLayer(DynamicLayer):
    """One layer's keys and values, less the oldest positions that no later query can attend.

    ``get_seq_length`` still counts the dropped positions, so generation sees the whole text. Keys and
    values are views into buffers with room to grow, so a decoding step writes one position instead of
    copying the whole cache (as ``torch.cat`` does); a full buffer is replaced by one twice the size.
    """

    def __init__(self):
        super().__init__()
        self.dropped = 0
        self.key_buffer = self.value_buffer = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.requires_grad or value_states.requires_grad:
            # Autograd may hold the earlier views: never write into their buffer.
            self.key_buffer = self.value_buffer = None
            return super().update(key_states, value_states)
        self.keys, self.key_buffer = append_in_buffer(self.keys, self.key_buffer, key_states)
        self.values, self.value_buffer = append_in_buffer(self.values, self.value_buffer, value_states)
        return self.keys, self.values

    def drop_front(self, count: int) -> None:
        if count > 0 and self.is_initialized:
            self.keys = self.keys[..., count:, :]
            self.values = self.values[..., count:, :]
            self.dropped += count

    def get_seq_length(self) -> int:
        return self.dropped + super().get_seq_length()

    def reset(self) -> None:
        super().reset()
        self.dropped = 0
        self.key_buffer = self.value_buffer = None


def append_in_buffer(
    stored: torch.Tensor, buffer: torch.Tensor | None, new: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``stored`` with ``new`` appended along the sequence (dim 2), and the buffer that now holds it.

    Written in place when ``stored`` is a slice of ``buffer`` with room after it; otherwise (first call,
    full buffer, ``stored`` replaced by beam search's reordering, or a buffer more than four times what
    it holds, as after a long prompt's keys were dropped) copied into a new buffer with twice the room
    it needs, so appending one position costs O(1) amortized and memory stays within 4x what is stored.
    """
    length = stored.shape[2] if stored.numel() else 0
    end = length + new.shape[2]
    begin = slice_start(stored, buffer) if length else 0
    if (
        buffer is None
        or begin is None
        or begin + end > buffer.shape[2]
        or buffer.shape[2] > 4 * max(end, 16)
        or buffer.shape[:2] != new.shape[:2]
    ):
        buffer = new.new_empty(new.shape[0], new.shape[1], max(2 * end, 16), new.shape[3])
        if length:
            buffer[:, :, :length] = stored
        begin = 0
    buffer[:, :, begin + length : begin + end] = new
    return buffer[:, :, begin : begin + end], buffer


def slice_start(view: torch.Tensor, buffer: torch.Tensor | None) -> int | None:
    """Where ``view`` starts in ``buffer`` along dim 2 if it is such a slice of it, else None."""
    if (
        buffer is None
        or view.untyped_storage().data_ptr() != buffer.untyped_storage().data_ptr()
        or view.stride() != buffer.stride()
        or view.shape[:2] != buffer.shape[:2]
        or view.dtype != buffer.dtype
    ):
        return None
    start, rest = divmod(view.storage_offset() - buffer.storage_offset(), buffer.stride(2))
    return start if rest == 0 and start >= 0 else None


class LongNetCache(DynamicCache):
    """LongNet's default KV cache: its size stays bounded however long generation runs.

    A query at position t attends, in branch (w, r), only keys of its own segment, which starts at
    or after ``t - t mod L`` for ``L = lcm(segment_lengths)``. So keys before the current period of
    length L are dropped; dilated positions stay exact because each row's kept keys start at a
    multiple of L of that row's own positions. With the paper's segment lengths L is the longest one.
    """

    def __init__(self):
        Cache.__init__(self, layer_class_to_replicate=LongNetCacheLayer)

    @property
    def dropped(self) -> int:
        return self.layers[0].dropped if self.layers else 0

    def drop_front(self, count: int) -> None:
        for layer in self.layers:
            layer.drop_front(count)


def trim_cache(
    cache: LongNetCache, attention_mask: torch.Tensor | None, position_ids: torch.Tensor, period: int
) -> torch.Tensor | None:
    """Drops what no query of this step can attend and returns the key mask for what is left.

    ``attention_mask`` is ``(B, total length)`` or None; ``position_ids`` ``(B, Lq)`` are positions in
    each row's own sequence. Row b needs keys from the start of its current period, ``past -
    position_ids[b, 0] mod period``; the cache keeps the earliest of those over the batch and the
    returned mask hides, per row, the kept keys before its own start. Anything but left padding (holes,
    packed rows) keeps the cache whole.
    """
    past_length = cache.get_seq_length()
    if attention_mask is not None and not bool((attention_mask[:, 1:] >= attention_mask[:, :-1]).all()):
        return attention_mask[:, cache.dropped :]
    row_start = past_length - position_ids[:, 0] % period  # (B,)
    cache.drop_front(int(row_start.min()) - cache.dropped)
    key_index = torch.arange(cache.dropped, past_length + position_ids.shape[1], device=position_ids.device)
    mask = key_index >= row_start[:, None]
    if attention_mask is not None:
        mask = mask & attention_mask[:, cache.dropped :]
    return mask


@dataclass
class Document:
    """One sequence inside a batch row: its key positions and query positions (indices into the
    layer's key and query axes). The queries are always the last ``len(query_index)`` keys."""

    row: int
    key_index: torch.Tensor
    query_index: torch.Tensor


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
    output_attentions: bool = False,
    group=None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal dilated attention over ``(B, H, L, D)`` inputs, each document on its own.

    Returns the output ``(B, H, Lq, D)`` (0 at padding queries) and, with ``output_attentions`` (eager
    backend only), the weights ``(B, H, Lq, Lk)``. With a process ``group`` the inputs are this rank's
    chunk of one sequence split across the group (see ``longnet.sequence_parallel``).
    """
    if group is not None:
        if backend == "eager" or documents is not None:
            raise ValueError("sequence parallelism runs the fused kernel on whole, unpadded sequences")
        return dilated_attention(query, key, value, segment_lengths, dilation_rates, scale=scale, group=group), None

    def attend(q, k, v):
        if backend != "eager":
            return dilated_attention(q, k, v, segment_lengths, dilation_rates, scale=scale, backend=backend), None
        branches = list(zip(segment_lengths, dilation_rates, strict=True))
        out, _, weights = eager_dilated_attention(q, k, v, branches, True, scale, return_weights=True)
        return out, (weights if output_attentions else None)

    if documents is None:
        return attend(query, key, value)
    results = [
        attend(
            query[doc.row : doc.row + 1, :, doc.query_index],
            key[doc.row : doc.row + 1, :, doc.key_index],
            value[doc.row : doc.row + 1, :, doc.key_index],
        )
        for doc in documents
    ]
    # Padding queries keep output 0. The kernel's dtype (autocast may lower it) sets the dtype.
    batch, heads, q_len, _ = query.shape
    output = query.new_zeros(query.shape, dtype=results[0][0].dtype if results else query.dtype)
    weights = query.new_zeros(batch, heads, q_len, key.shape[2]) if output_attentions else None
    for doc, (doc_output, doc_weights) in zip(documents, results, strict=True):
        output[doc.row, :, doc.query_index] = doc_output[0]
        if output_attentions:
            weights[doc.row, :, doc.query_index[:, None], doc.key_index] = doc_weights[0].to(weights.dtype)
    return output, weights


class LongNetAttention(nn.Module):
    """Multi-head self-attention with RoPE and GQA whose core is dilated attention."""

    def __init__(self, config: LongNetConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.q_proj = nn.Linear(
            config.hidden_size, config.num_attention_heads * self.head_dim, bias=config.attention_bias
        )
        self.k_proj = nn.Linear(
            config.hidden_size, config.num_key_value_heads * self.head_dim, bias=config.attention_bias
        )
        self.v_proj = nn.Linear(
            config.hidden_size, config.num_key_value_heads * self.head_dim, bias=config.attention_bias
        )
        self.o_proj = nn.Linear(
            config.num_attention_heads * self.head_dim, config.hidden_size, bias=config.attention_bias
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        documents: list[Document] | None = None,
        cache: Cache | None = None,
        output_attentions: bool = False,
        group=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, length, _ = hidden_states.shape
        hidden_shape = (batch, length, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        eager = self.config._attn_implementation == "eager"
        if output_attentions and not eager:
            raise ValueError("output_attentions=True needs attn_implementation='eager'")
        output, weights = attend_documents(
            query,
            key,
            value,
            documents,
            self.config.segment_lengths,
            self.config.dilation_rates,
            self.scaling,
            backend="eager" if eager else "auto",
            output_attentions=output_attentions,
            group=group,
        )
        output = output.transpose(1, 2).reshape(batch, length, -1)
        return self.o_proj(output), weights


class LongNetDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: LongNetConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LongNetAttention(config, layer_idx)
        self.mlp = LongNetMLP(config)
        self.input_layernorm = LongNetRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LongNetRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        documents: list[Document] | None = None,
        cache: Cache | None = None,
        output_attentions: bool = False,
        group=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        residual = hidden_states
        hidden_states, weights = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, documents, cache, output_attentions, group
        )
        hidden_states = residual + hidden_states
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, weights


# What a saved folder's config.json maps each Auto class to. save_pretrained writes only the entry
# of the class being saved (and the config's); the base model's must be there too.
AUTO_MAP = {
    "AutoConfig": "configuration_longnet.LongNetConfig",
    "AutoModel": "modeling_longnet.LongNetModel",
    "AutoModelForCausalLM": "modeling_longnet.LongNetForCausalLM",
    "AutoModelForSequenceClassification": "modeling_longnet.LongNetForSequenceClassification",
}


class LongNetPreTrainedModel(PreTrainedModel):
    config_class = LongNetConfig
    config: LongNetConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LongNetDecoderLayer"]
    # "sdpa" (the default) runs the fused dilated attention kernel; "eager" the reference kernel.
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False

    def __init__(self, config: LongNetConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        config.auto_map = {**AUTO_MAP, **(getattr(config, "auto_map", None) or {})}


class LongNetModel(LongNetPreTrainedModel):
    def __init__(self, config: LongNetConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [LongNetDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = LongNetRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LongNetRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        past_key_values: Cache | None = None,
        sequence_parallel_group=None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        r"""
        sequence_parallel_group (`torch.distributed.ProcessGroup`, *optional*):
            Run one sequence split across the ranks of this group: rank i passes tokens
            ``[i*L, (i+1)*L)`` of the sequence (the same L on every rank; no padding, packing or cache)
            and gets the hidden states of those tokens, computed with global positions.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = LongNetCache()

        batch, query_length = inputs_embeds.shape[:2]
        if sequence_parallel_group is not None:
            if cache is not None or attention_mask is not None or position_ids is not None:
                raise ValueError(
                    "sequence_parallel_group takes whole unpadded sequences: no cache (use_cache=False), "
                    "attention_mask or position_ids"
                )
            rank = torch.distributed.get_rank(sequence_parallel_group)
            position_ids = torch.arange(rank * query_length, (rank + 1) * query_length, device=inputs_embeds.device)
            position_ids = position_ids.unsqueeze(0)
        past_length = cache.get_seq_length() if cache is not None else 0
        key_length = past_length + query_length
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape != (batch, key_length):
                raise ValueError(
                    f"attention_mask must be 2D (batch, past + current length) = ({batch}, {key_length}), "
                    f"got shape {tuple(attention_mask.shape)}"
                )
            attention_mask = attention_mask.bool()
        if position_ids is None:
            if attention_mask is not None:
                # Count from each row's first real token, as generate() does for left padding.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past_length:]
            else:
                position_ids = torch.arange(past_length, key_length, device=inputs_embeds.device).unsqueeze(0)
        position_ids = position_ids.expand(batch, -1)
        key_mask = attention_mask
        if isinstance(cache, LongNetCache) and past_length > 0:
            period = math.lcm(*self.config.segment_lengths)
            key_mask = trim_cache(cache, attention_mask, position_ids, period)
        stored_past = past_length - (cache.dropped if isinstance(cache, LongNetCache) else 0)
        documents = None if sequence_parallel_group is not None else find_documents(key_mask, position_ids, stored_past)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        all_hidden_states = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states, weights = layer(
                hidden_states, position_embeddings, documents, cache, output_attentions, sequence_parallel_group
            )
            if output_attentions:
                all_attentions += (weights,)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            cache=cache if use_cache else None,
            hidden_states=all_hidden_states,
            attentions=all_attentions,
        )


def sequence_parallel_loss(logits: torch.Tensor, labels: torch.Tensor, group) -> torch.Tensor:
    """Next-token loss of a sequence split across ``group``: mean over all its tokens, on every rank.

    A rank's last position predicts the next rank's first label, so each rank first learns the first
    labels of all ranks. The other ranks' share of the sum is a constant here (their gradients flow on
    their own ranks), so parameter gradients summed over the group are the single-process ones.
    """
    world, rank = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
    first_labels = [torch.empty_like(labels[:, :1]) for _ in range(world)]
    torch.distributed.all_gather(first_labels, labels[:, :1].contiguous(), group=group)
    after_last = first_labels[rank + 1] if rank + 1 < world else torch.full_like(labels[:, :1], -100)
    targets = torch.cat([labels[:, 1:], after_last], dim=1)
    losses = torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum"
    )
    totals = torch.stack([losses.detach(), (targets != -100).sum().to(losses.dtype)])
    torch.distributed.all_reduce(totals, group=group)
    return (losses + (totals[0] - losses.detach())) / totals[1]


class LongNetForCausalLM(LongNetPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() then makes no DynamicCache: the first forward makes a LongNetCache and generate()
        # carries it on. A cache the user passes is used as it is.
        return False

    def __init__(self, config: LongNetConfig):
        super().__init__(config)
        self.model = LongNetModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        return_dict: bool | None = None,
        sequence_parallel_group=None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        r"""
        sequence_parallel_group (`torch.distributed.ProcessGroup`, *optional*):
            See `LongNetModel.forward`. `labels` are then this rank's chunk too; the label shift crosses
            rank boundaries, and the loss is the whole sequence's mean, the same number on every rank
            (parameter gradients summed over the group equal the single-process ones).
        """
        if sequence_parallel_group is not None:
            use_cache = False
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            sequence_parallel_group=sequence_parallel_group,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None and sequence_parallel_group is not None:
            loss = sequence_parallel_loss(logits, labels, sequence_parallel_group)
        elif labels is not None:
            # kwargs carries num_items_in_batch from the Trainer (gradient accumulation).
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output.to_tuple() if return_dict is False else output


class LongNetForSequenceClassification(LongNetPreTrainedModel):
    """Scores the last real token of each sequence (the rightmost token that is not padding)."""

    def __init__(self, config: LongNetConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = LongNetModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast | tuple:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        logits = self.score(outputs.last_hidden_state)
        batch = logits.shape[0]
        if attention_mask is not None:
            real = attention_mask.bool()[:, -logits.shape[1] :]
        elif input_ids is not None and self.config.pad_token_id is not None:
            real = input_ids != self.config.pad_token_id
        elif batch == 1:
            real = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
        else:
            raise ValueError("a batch of several sequences needs an attention_mask or config.pad_token_id")
        positions = torch.arange(logits.shape[1], device=logits.device)
        last = (positions * real.long()).argmax(-1)
        pooled_logits = logits[torch.arange(batch, device=logits.device), last]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=pooled_logits, config=self.config)
        output = SequenceClassifierOutputWithPast(
            loss=loss,
            logits=pooled_logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output.to_tuple() if return_dict is False else output


__all__ = [
    "LongNetPreTrainedModel",
    "LongNetModel",
    "LongNetForCausalLM",
    "LongNetForSequenceClassification",
]
