"""LongNet for Transformers: dilated attention and a LongNet decoder."""

from .dilated_attention import dilated_attention

__all__ = ["dilated_attention"]
