"""LongNetConfig: defaults, save/load round trip, and an error naming each invalid field.

The errors are those of transformers' own config validation (``@strict`` field validators and
``validate_architecture``, as LlamaConfig raises them): a StrictDataclassError whose message names the field.
"""

import pytest
from conftest import tiny_config
from huggingface_hub.errors import StrictDataclassError

from longnet import LongNetConfig


def test_defaults_are_the_papers():
    config = LongNetConfig()
    assert config.model_type == "longnet"
    assert config.segment_lengths == [2048, 4096, 8192, 16384, 32768]
    assert config.dilation_rates == [1, 2, 4, 6, 12]
    assert config.head_dim == config.hidden_size // config.num_attention_heads
    assert config.num_key_value_heads == config.num_attention_heads
    assert config.rope_parameters["rope_type"] == "default"


def test_round_trip(tmp_path):
    config = tiny_config(segment_lengths=[16, 64], dilation_rates=[1, 4], tie_word_embeddings=True)
    config.save_pretrained(tmp_path)
    loaded = LongNetConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.segment_lengths == [16, 64] and loaded.dilation_rates == [1, 4]


def test_tuples_are_accepted_and_saved_as_lists(tmp_path):
    config = tiny_config(segment_lengths=(16, 64), dilation_rates=(1, 4))
    assert config.segment_lengths == [16, 64] and config.dilation_rates == [1, 4]
    config.save_pretrained(tmp_path)
    assert LongNetConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(vocab_size=0), "vocab_size"),
        (dict(hidden_size=-8), "hidden_size"),
        (dict(intermediate_size=0), "intermediate_size"),
        (dict(num_hidden_layers=0), "num_hidden_layers"),
        (dict(num_attention_heads=0, head_dim=16), "num_attention_heads"),
        (dict(hidden_size=66), "hidden_size .* num_attention_heads"),
        (dict(hidden_size=66, head_dim=16), "hidden_size .* num_attention_heads"),  # LlamaConfig refuses it too
        (dict(num_key_value_heads=0), "num_key_value_heads"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(head_dim=7), "head_dim"),
        (dict(max_position_embeddings=0), "max_position_embeddings"),
        (dict(hidden_act="swoosh"), "hidden_act"),
        (dict(rms_norm_eps=0.0), "rms_norm_eps"),
        (dict(initializer_range=-0.1), "initializer_range"),
        (dict(attention_dropout=0.1), "attention_dropout"),
        (dict(segment_lengths=[]), "segment_lengths"),
        (dict(segment_lengths=[8, 0, 4]), "segment_lengths"),
        (dict(dilation_rates=[1, 2]), "dilation_rates"),
        (dict(dilation_rates=[1, -2, 3]), "dilation_rates"),
        (
            dict(segment_lengths=[999983, 999979, 999961, 999959], dilation_rates=[1] * 4),
            "segment_lengths .* least common",
        ),
        (dict(pad_token_id=300), "pad_token_id"),
        (dict(bos_token_id=-1), "bos_token_id"),
        (dict(eos_token_id=[2, 999]), "eos_token_id"),
    ],
)
def test_invalid_field_raises_an_error_naming_it(overrides, field):
    with pytest.raises(StrictDataclassError, match=field):
        tiny_config(**overrides)


def test_invalid_value_in_saved_config_is_caught_on_load(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(path.read_text().replace('"dilation_rates": [\n    1,', '"dilation_rates": [\n    0,'))
    with pytest.raises(StrictDataclassError, match="dilation_rates"):
        LongNetConfig.from_pretrained(tmp_path)
