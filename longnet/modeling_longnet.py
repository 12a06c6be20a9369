"""LongNet: a Llama-style decoder whose self-attention is dilated attention (arXiv 2307.02486).

Built like transformers' ``models/llama/modeling_llama.py``, from the library's own layers and decorators.
Module and parameter names are Llama's (`model.embed_tokens`, `model.layers.N.self_attn.q_proj`, ...,
`model.norm`, `lm_head`), so a Llama state dict loads unchanged. The differences from Llama:

- attention is looked up by ``config._attn_implementation`` among LongNet's own functions
  (``attention_interface.py``): ``"longnet_dilated"`` (the fused kernel, the default) or ``"eager"``;
- no attention mask is built: dilated attention counts positions from the start of each sequence, so
  the model finds, once per forward, the documents of a padded (``attention_mask`` zeros) or packed
  (``position_ids`` restarting at 0, as from ``DataCollatorWithFlattening``) batch, and each document
  runs on its own (``documents.py``): a padded or packed batch gives what each sequence gives alone;
- the default cache is the bounded ``LongNetCache`` (``cache_longnet.py``);
- one sequence can be split across processes (``sequence_parallel_group``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.utils import auto_docstring, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .attention_interface import ATTN_IMPLEMENTATION, eager_dilated_attention_forward
from .cache_longnet import LongNetCache, trim_cache
from .configuration_longnet import LongNetConfig
from .documents import find_documents


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


class LongNetAttention(nn.Module):
    """Multi-head self-attention with RoPE and GQA whose core is dilated attention."""

    def __init__(self, config: LongNetConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
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

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
            # A static cache hands back its whole preallocated length; the positions written come first.
            key, value = key[:, :, : kwargs["key_length"]], value[:, :, : kwargs["key_length"]]

        # Only the eager function forms the attention weights: it runs whenever they are asked for.
        implementation = "eager" if kwargs.get("output_attentions") else self.config._attn_implementation
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            implementation, eager_dilated_attention_forward
        )
        output, weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        output = output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(output), weights


class LongNetDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: LongNetConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LongNetAttention(config, layer_idx)
        self.mlp = LongNetMLP(config)
        self.input_layernorm = LongNetRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LongNetRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


# What a saved folder's config.json maps each Auto class to. save_pretrained writes only the entry
# of the class being saved (and the config's); the base model's must be there too.
AUTO_MAP = {
    "AutoConfig": "configuration_longnet.LongNetConfig",
    "AutoModel": "modeling_longnet.LongNetModel",
    "AutoModelForCausalLM": "modeling_longnet.LongNetForCausalLM",
    "AutoModelForSequenceClassification": "modeling_longnet.LongNetForSequenceClassification",
}


@auto_docstring
class LongNetPreTrainedModel(PreTrainedModel):
    config_class = LongNetConfig
    config: LongNetConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LongNetDecoderLayer"]
    # SDPA, flash and flex attention compute dense attention: a different model. LongNet's attention
    # functions are "longnet_dilated" and "eager" (get_correct_attn_implementation).
    _supports_sdpa = False
    _supports_flash_attn = False
    _supports_flex_attn = False
    # Splitting a batch into documents reads tensor values (a graph break).
    _can_compile_fullgraph = False
    _can_record_outputs = {
        "hidden_states": LongNetDecoderLayer,
        "attentions": LongNetAttention,
    }

    def __init__(self, config: LongNetConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        config.auto_map = {**AUTO_MAP, **(getattr(config, "auto_map", None) or {})}

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        """``"longnet_dilated"`` (the fused kernel) by default, or ``"eager"``; anything else is an error."""
        if requested_attention is None:
            return ATTN_IMPLEMENTATION
        if requested_attention not in (ATTN_IMPLEMENTATION, "eager"):
            raise ValueError(
                f"attn_implementation={requested_attention!r} is not available for LongNet, whose attention is "
                f"dilated attention: use 'longnet_dilated' (the fused kernel, the default) or 'eager' (the reference, "
                f"which also returns attention weights)"
            )
        return requested_attention


@auto_docstring
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

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @merge_with_config_defaults
    @capture_outputs
    @auto_docstring
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        sequence_parallel_group: torch.distributed.ProcessGroup | None = None,
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
        # The layers read it: attention weights come from the eager function, whatever the implementation.
        kwargs["output_attentions"] = kwargs.get("output_attentions", self.config.output_attentions)
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
            key_mask = trim_cache(cache, attention_mask, position_ids, math.lcm(*self.config.segment_lengths))
        stored_past = past_length - (cache.dropped if isinstance(cache, LongNetCache) else 0)
        documents = None if sequence_parallel_group is not None else find_documents(key_mask, position_ids, stored_past)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(
                hidden_states,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                documents=documents,
                key_length=stored_past + query_length,
                sequence_parallel_group=sequence_parallel_group,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache if use_cache else None)


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


@auto_docstring
class LongNetForCausalLM(LongNetPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}
    _fsdp_plan = {"lm_head": "keep_full_weight"}

    def __init__(self, config: LongNetConfig):
        super().__init__(config)
        self.model = LongNetModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args, **kwargs) -> None:
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        # Where generate() made its default DynamicCache, the bounded LongNetCache does the same job in less
        # memory. A cache the user passes, or names with cache_implementation, is used as it is.
        cache = model_kwargs.get("cache")
        asked_for = generation_config.cache_implementation is not None or getattr(cache, "_is_user_defined", False)
        if type(cache) is DynamicCache and not asked_for:
            model_kwargs["cache"] = LongNetCache()
            if generation_config.is_assistant:  # as generate() does for the cache it made
                model_kwargs["cache"].activate_past_recording()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    @auto_docstring
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        sequence_parallel_group: torch.distributed.ProcessGroup | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        sequence_parallel_group (`torch.distributed.ProcessGroup`, *optional*):
            See `LongNetModel.forward`. `labels` are then this rank's chunk too; the label shift crosses
            rank boundaries, and the loss is the whole sequence's mean, the same number on every rank
            (parameter gradients summed over the group equal the single-process ones).
        """
        if sequence_parallel_group is not None:
            use_cache = False
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            sequence_parallel_group=sequence_parallel_group,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None and sequence_parallel_group is not None:
            loss = sequence_parallel_loss(logits, labels, sequence_parallel_group)
        elif labels is not None:
            # kwargs carries num_items_in_batch from the Trainer (gradient accumulation).
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


@auto_docstring
class LongNetForSequenceClassification(LongNetPreTrainedModel):
    """Scores the last real token of each sequence.

    Unlike transformers' ``GenericForSequenceClassification``, which takes the last token that is not
    ``pad_token_id``, the ``attention_mask`` decides when given: right with ``inputs_embeds`` and with
    tokenizers whose padding token is also their end-of-sequence token.
    """

    def __init__(self, config: LongNetConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = LongNetModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    @auto_docstring
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast:
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
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
            raise ValueError(
                "a batch of several sequences needs an attention_mask to find each one's last token (or input_ids "
                "with config.pad_token_id set; inputs_embeds show no padding)"
            )
        positions = torch.arange(logits.shape[1], device=logits.device)
        last = (positions * real.long()).argmax(-1)
        pooled_logits = logits[torch.arange(batch, device=logits.device), last]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=pooled_logits, config=self.config)
        return SequenceClassifierOutputWithPast(
            loss=loss,
            logits=pooled_logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


__all__ = [
    "LongNetPreTrainedModel",
    "LongNetModel",
    "LongNetForCausalLM",
    "LongNetForSequenceClassification",
]
