"""Stands in for transformers' ``tests/utils/test_configuration_utils.py`` (not in the source distribution).

``ConfigTester.check_config_arguments_init`` builds a config from these keyword arguments, every one of
them a field that ``PreTrainedConfig`` holds for all models, set to a value other than its default, and
checks that each one is kept.
"""

config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["LongNetForCausalLM"],
    "problem_type": "regression",
    "id2label": {0: "first", 1: "second"},
    "label2id": {"first": 0, "second": 1},
    "bos_token_id": 5,
    "eos_token_id": 6,
    "pad_token_id": 7,
    "tie_word_embeddings": True,
}
