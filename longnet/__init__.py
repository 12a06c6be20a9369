"""LongNet for Transformers: dilated attention and a LongNet decoder.

Importing the package registers LongNet with the Auto classes.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from . import attention_interface  # noqa: F401  (registers attn_implementation="longnet_dilated")
from .configuration_longnet import LongNetConfig
from .dilated_attention import dilated_attention
from .modeling_longnet import (
    LongNetCache,
    LongNetForCausalLM,
    LongNetForSequenceClassification,
    LongNetModel,
    LongNetPreTrainedModel,
)

# Saved folders carry the code (auto_map + copied files), so they load where this package is not
# installed, with trust_remote_code=True.
LongNetConfig.register_for_auto_class()
LongNetModel.register_for_auto_class("AutoModel")
LongNetForCausalLM.register_for_auto_class("AutoModelForCausalLM")
LongNetForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

AutoConfig.register("longnet", LongNetConfig, exist_ok=True)
AutoModel.register(LongNetConfig, LongNetModel, exist_ok=True)
AutoModelForCausalLM.register(LongNetConfig, LongNetForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(LongNetConfig, LongNetForSequenceClassification, exist_ok=True)

__all__ = [
    "dilated_attention",
    "LongNetConfig",
    "LongNetCache",
    "LongNetPreTrainedModel",
    "LongNetModel",
    "LongNetForCausalLM",
    "LongNetForSequenceClassification",
]
