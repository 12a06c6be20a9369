"""LongNet configuration: Llama's fields plus the dilated attention branches."""

from huggingface_hub.dataclasses import strict
from transformers.activations import ACT2FN
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

from .dilated_attention import check_branches

# The paper's configuration (LongNet, section 4.1): segments 2K..32K with rates 1..12.
PAPER_SEGMENT_LENGTHS = [2048, 4096, 8192, 16384, 32768]
PAPER_DILATION_RATES = [1, 2, 4, 6, 12]


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

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    attention_bias: bool = False
    attention_dropout: int | float | None = 0.0
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
        self._check_fields()
        super().__post_init__(**kwargs)

    def _check_fields(self) -> None:
        """Raises a ValueError that names the first invalid field."""
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.hidden_size % self.num_attention_heads != 0:  # LlamaConfig.validate_architecture refuses it too
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"hidden_act must be one of {sorted(ACT2FN)}, got {self.hidden_act!r}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be positive, got {self.rms_norm_eps!r}")
        if not self.initializer_range >= 0:
            raise ValueError(f"initializer_range must be non-negative, got {self.initializer_range!r}")
        if self.attention_dropout != 0:
            raise ValueError(
                f"attention_dropout must be 0.0: dilated attention has no attention dropout, "
                f"got {self.attention_dropout!r}"
            )
        check_branches(self.segment_lengths, self.dilation_rates)
        for name in ("pad_token_id", "bos_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(f"{name} must be in [0, vocab_size={self.vocab_size}), got {value!r}")
        eos = self.eos_token_id if isinstance(self.eos_token_id, list) else [self.eos_token_id]
        if any(value is not None and not 0 <= value < self.vocab_size for value in eos):
            raise ValueError(f"eos_token_id must be in [0, vocab_size={self.vocab_size}), got {self.eos_token_id!r}")


__all__ = ["LongNetConfig"]
