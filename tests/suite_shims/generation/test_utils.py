"""Stands in for transformers' ``tests/generation/test_utils.py``, which its source distribution does not ship.

``ModelTesterMixin.test_generation_tester_mixin_inheritance`` requires a model that can generate to inherit
this class. LongNet's generation tests (greedy, sampling, beam search, assisted and prompt-lookup decoding,
LongNetCache / DynamicCache / StaticCache, left padding) are the project's own: ``tests/test_generation.py``.
"""


class GenerationTesterMixin:
    pass
