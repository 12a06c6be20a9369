"""LongNet configuration: Llama's fields plus the dilated attention branches."""

import math
from pathlib import Path

from huggingface_hub.dataclasses import as_validated_field, strict
from transformers import LlamaConfig
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters
from transformers.utils.type_validators import activation_fn_key, interval, positive_int_field

from .dilated_attention import check_branches

# The paper's configuration (LongNet, section 4.1): segments 2K..32K with rates 1..12.
PAPER_SEGMENT_LENGTHS = [2048, 4096, 8192, 16384, 32768]
PAPER_DILATION_RATES = [1, 2, 4, 6, 12]


@as_validated_field
def no_dropout(value: int | float | None) -> None:
    if value:
        raise ValueError(f"must be 0.0: dilated attention has no attention dropout, got {value!r}")


@strict
class LongNetConfig(PreTrainedConfig):
    r"""Configuration of a LongNet decoder: a Llama-style decoder whose attention is dilated attention.

    Every field but the last two has the name and meaning it has in `LlamaConfig`, so a Llama config
    and state dict map onto LongNet unchanged.

    Args:
        segment_lengths (`list[int]`, defaults to the paper's `[2048, 4096, 8192, 16384, 32768]`):
            Segment length `w` of each dilated attention branch.
        dilation_rates (`list[int]`, defaults to the paper's `[1, 2, 4, 6, 12]`):
            Dilation rate `r` of each branch; query head `h` keeps positions `h mod r` (mod `r`) of
            each segment.

    ```python
    >>> from longnet import LongNetConfig, LongNetForCausalLM
    >>> config = LongNetConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
    ...                        num_attention_heads=4, segment_lengths=[512, 2048], dilation_rates=[1, 4])
    >>> model = LongNetForCausalLM(config)
    ```
    """

    model_type = "longnet"
    keys_to_ignore_at_inference = ["past_key_values"]
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }

    vocab_size: int = positive_int_field(default=32000)
    hidden_size: int = positive_int_field(default=4096)
    intermediate_size: int = positive_int_field(default=11008)
    num_hidden_layers: int = positive_int_field(default=32)
    num_attention_heads: int = positive_int_field(default=32)
    num_key_value_heads: int | None = positive_int_field(default=None)
    head_dim: int | None = positive_int_field(default=None)
    hidden_act: str = activation_fn_key(default="silu")
    max_position_embeddings: int = positive_int_field(default=32768)
    initializer_range: float = interval(min=0.0, max=1.0)(default=0.02)
    rms_norm_eps: float = interval(min=0.0, exclude_min=True)(default=1e-6)
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    attention_bias: bool = False
    attention_dropout: int | float | None = no_dropout(default=0.0)
    mlp_bias: bool = False
    # Tuples are accepted as the kernel accepts them, and stored as lists so config.json round-trips.
    segment_lengths: list[int] | tuple[int, ...] | None = None
    dilation_rates: list[int] | tuple[int, ...] | None = None

    def __post_init__(self, **kwargs):
        if self.head_dim is None and self.num_attention_heads:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.segment_lengths is None:
            self.segment_lengths = list(PAPER_SEGMENT_LENGTHS)
        if self.dilation_rates is None:
            self.dilation_rates = list(PAPER_DILATION_RATES)
        self.segment_lengths = list(self.segment_lengths)
        self.dilation_rates = list(self.dilation_rates)
        super().__post_init__(**kwargs)

    def validate_architecture(self) -> None:
        """Part of ``@strict``'s validation (as in LlamaConfig): the shapes must fit together."""
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        check_branches(self.segment_lengths, self.dilation_rates)
        period = math.lcm(*self.segment_lengths)
        if period >= 2**62:
            raise ValueError(
                f"segment_lengths {self.segment_lengths}: their least common multiple ({period}) is the period of "
                "LongNet's cache and must be below 2**62; choose lengths that divide one another (as the paper's)"
            )

    def validate_token_ids(self) -> None:
        """Special token ids must be in the vocabulary (transformers only warns; LongNet refuses, and the
        conversion script maps the Hub's ``-1`` for "none" to None)."""
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            values = value if isinstance(value, list) else [value]
            if any(v is not None and not 0 <= v < self.vocab_size for v in values):
                raise ValueError(f"{name} must be in [0, vocab_size={self.vocab_size}), got {value!r}")


def load_longnet_config(source: str | Path) -> LongNetConfig:
    """The LongNetConfig in a folder or JSON file. A config of another model type is a ValueError naming it:
    ``LongNetConfig.from_pretrained`` would warn and quietly give a Llama config LongNet's default branches."""
    fields, _ = LongNetConfig.get_config_dict(str(source))
    if fields.get("model_type") != LongNetConfig.model_type:
        raise ValueError(f"{str(source)!r} holds a {fields.get('model_type')} config, not a LongNet one")
    return LongNetConfig.from_dict(fields)


def llama_config(config: LongNetConfig) -> LlamaConfig:
    """The same-size Llama's config: every field but the branches (LongNet keeps Llama's names and weights),
    for a dense control of the same size, built afresh or from a LongNet's weights."""
    fields = config.to_dict()
    for name in ("segment_lengths", "dilation_rates", "model_type", "auto_map", "architectures"):
        fields.pop(name, None)
    return LlamaConfig(**fields)


__all__ = ["LongNetConfig", "llama_config", "load_longnet_config"]
