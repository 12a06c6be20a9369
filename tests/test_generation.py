"""LongNetForCausalLM.generate in every mode a decoder with a cache offers, and the pipelines.

transformers' own generation suite (tests/generation/) is not in its source distribution; these tests
cover what it would, each against an independent reference: the full forward without a cache, greedy
decoding (which assisted and prompt-lookup decoding must reproduce token for token), each prompt alone.
"""

import warnings

import pytest
import torch
from conftest import left_padded, make_model, random_ids
from transformers import DynamicCache, StaticCache, pipeline

from longnet import LongNetCache, LongNetForSequenceClassification, LongNetModel

# ---------------------------------------------------------------------------------------------------
# Generation with a KV cache


@pytest.mark.parametrize("cache_class", [None, DynamicCache], ids=["longnet-cache", "user-dynamic-cache"])
@pytest.mark.parametrize("overrides", [{}, dict(num_key_value_heads=1), dict(num_key_value_heads=4)])
def test_cached_decoding_equals_full_forward(overrides, cache_class):
    """Prompt 7 tokens, then 43 single-token steps: crosses boundaries of every branch many times."""
    model = make_model(**overrides)
    ids = random_ids(2, 50)
    full = model(ids).logits
    out = model(ids[:, :7], use_cache=True, cache=cache_class() if cache_class else None)
    cache, steps = out.cache, [out.logits]
    for t in range(7, 50):
        out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
        cache = out.cache
        steps.append(out.logits)
    assert type(cache) is (cache_class or LongNetCache) and cache.get_seq_length() == 50
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=0)


def test_cached_decoding_with_position_ids_not_from_zero_equals_full_forward():
    # Dilated attention counts positions from the first token, whatever position_ids say (they set RoPE):
    # the bounded cache must keep keys by the same count. Positions 5, 6, ... past the period of 24.
    model = make_model()
    ids = random_ids(1, 40)
    positions = torch.arange(5, 45)[None]
    full = model(ids, position_ids=positions).logits
    out = model(ids[:, :7], position_ids=positions[:, :7], use_cache=True)
    cache, steps = out.cache, [out.logits]
    for t in range(7, 40):
        out = model(ids[:, t : t + 1], position_ids=positions[:, t : t + 1], cache=cache, use_cache=True)
        cache, steps = out.cache, steps + [out.logits]
    assert type(cache) is LongNetCache and cache.dropped > 0
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=0)


def test_longnet_cache_stays_bounded():
    """lcm(4, 8, 12) = 24: no query needs a key from before its own 24-token period, so the cache never
    holds more than 24 positions, whatever the length; logits still equal the full forward."""
    model = make_model()
    ids = random_ids(1, 120)
    full = model(ids).logits
    out = model(ids[:, :1], use_cache=True)
    cache, steps, sizes, copies, previous = out.cache, [out.logits], [], 0, None
    for t in range(1, 120):
        with torch.no_grad():  # as in generate(); with autograd on, the cache concatenates instead
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
        cache = out.cache
        steps.append(out.logits)
        keys = cache.layers[0].keys
        sizes.append(keys.shape[2])
        # `previous` keeps the last step's storage alive, so a new buffer cannot reuse its address.
        copies += previous is not None and keys.untyped_storage().data_ptr() != previous.untyped_storage().data_ptr()
        previous = keys
    assert max(sizes) <= 24 and cache.dropped >= 96 and cache.get_seq_length() == 120
    # Steps write their position into a buffer with room to grow: it is replaced only when full.
    assert copies <= 3
    position_bytes = keys[:, :, :1].numel() * keys.element_size()
    assert keys.untyped_storage().nbytes() <= 2 * 25 * position_bytes
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=0)


@torch.no_grad()
def test_longnet_cache_memory_shrinks_after_a_long_prompt():
    """A 100-token prompt fills a buffer for 100+ positions; once the keys before the current 24-token
    period are dropped, the buffer is replaced by one sized for what is kept."""
    model = make_model()
    ids = random_ids(1, 106)
    cache = model(ids[:, :100], use_cache=True).cache
    for t in range(100, 106):
        cache = model(ids[:, t : t + 1], cache=cache, use_cache=True).cache
    keys = cache.layers[0].keys
    assert keys.shape[2] <= 24
    assert keys.untyped_storage().nbytes() <= 4 * 24 * keys[:, :, :1].numel() * keys.element_size()


def test_longnet_cache_bounded_with_left_padding_and_generate():
    model = make_model()
    prompts = [random_ids(1, n, seed=n)[0] for n in (3, 10)]
    ids, mask = left_padded(prompts)
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=90,
        min_new_tokens=90,
        do_sample=False,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_logits=True,
    )
    cache = out.cache
    assert isinstance(cache, LongNetCache)
    # The rows' periods are 7 positions apart (their padding), so at most 24 + 7 positions stay.
    assert cache.layers[0].keys.shape[2] <= 24 + 7 and cache.get_seq_length() == 99
    for row, p in enumerate(prompts):
        sequence = torch.cat([p, out.sequences[row, 10:]])[None]
        full = model(sequence).logits[0, len(p) - 1 : -1]
        torch.testing.assert_close(torch.stack(out.logits, 1)[row], full, atol=1e-4, rtol=0)


def test_cached_chunks_equal_full_forward():
    """Several queries at once against a cache (chunked prefill), chunks not aligned to segments."""
    model = make_model()
    ids = random_ids(1, 45)
    full = model(ids).logits
    cache, pieces = None, []
    for start, end in ((0, 5), (5, 18), (18, 19), (19, 45)):
        out = model(ids[:, start:end], cache=cache, use_cache=True)
        cache = out.cache
        pieces.append(out.logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-4, rtol=0)


def test_greedy_generate_logits_equal_full_forward():
    model = make_model()
    prompt = random_ids(1, 6)
    out = model.generate(
        prompt,
        max_new_tokens=30,
        min_new_tokens=30,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    sequence = out.sequences
    assert sequence.shape == (1, 36)
    full = model(sequence).logits[:, 5:-1]
    torch.testing.assert_close(torch.stack(out.logits, 1), full, atol=1e-4, rtol=0)
    assert torch.equal(full.argmax(-1), sequence[:, 6:])


def test_sampling_and_beam_search_work():
    model = make_model()
    prompt = random_ids(2, 6)
    torch.manual_seed(0)
    sampled = model.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=True, top_k=20)
    assert sampled.shape == (2, 18) and torch.equal(sampled[:, :6], prompt)
    beams = model.generate(prompt, max_new_tokens=12, min_new_tokens=12, num_beams=3, do_sample=False)
    beams_uncached = model.generate(
        prompt, max_new_tokens=12, min_new_tokens=12, num_beams=3, do_sample=False, use_cache=False
    )
    assert beams.shape == (2, 18)
    assert torch.equal(beams, beams_uncached)  # cache reordering between beams is right


def test_left_padded_batch_equals_each_prompt_alone():
    model = make_model()
    prompts = [random_ids(1, n, seed=n)[0] for n in (5, 13, 9)]
    ids, mask = left_padded(prompts)
    longest = ids.shape[1]
    kwargs = dict(
        max_new_tokens=20,
        min_new_tokens=20,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    batched = model.generate(ids, attention_mask=mask, **kwargs)
    for row, p in enumerate(prompts):
        alone = model.generate(p[None], **kwargs)
        assert torch.equal(batched.sequences[row, longest:], alone.sequences[0, len(p) :])
        torch.testing.assert_close(
            torch.stack(batched.logits, 1)[row], torch.stack(alone.logits, 1)[0], atol=1e-4, rtol=0
        )


def greedy(model, prompt, **kwargs):
    return model.generate(prompt, max_new_tokens=24, min_new_tokens=24, do_sample=False, **kwargs)


def test_assisted_decoding_with_a_longnet_draft_equals_greedy():
    """A smaller LongNet drafts tokens; the model verifies several at once against its cache and crops the
    rejected ones. The output must be greedy decoding's, token for token."""
    model = make_model()
    draft = make_model(seed=1, num_hidden_layers=1)
    prompt = random_ids(1, 9)
    expected = greedy(model, prompt)
    assisted = greedy(model, prompt, assistant_model=draft, return_dict_in_generate=True)
    assert torch.equal(assisted.sequences, expected)
    assert isinstance(assisted.cache, LongNetCache) and assisted.cache.get_seq_length() == expected.shape[1] - 1


@torch.no_grad()
def test_an_assistant_cache_rolls_back_across_a_period_start():
    # What generate() does with an assistant's cache: mark it for rollback, draft one token at a time, crop
    # the rejected drafts. Here the drafts cross the period start at 8 (lcm of w = 4, 8): a cache that dropped
    # the keys before it could not remove the rejected ones.
    model = make_model(segment_lengths=[4, 8], dilation_rates=[1, 2])
    ids = random_ids(1, 12)
    cache = LongNetCache()
    cache.activate_past_recording()
    model(ids[:, :6], cache=cache, use_cache=True)
    for t in range(6, 11):
        model(ids[:, t : t + 1], cache=cache, use_cache=True)
    cache.crop(-4)  # drafts 7 to 10 rejected
    assert cache.get_seq_length() == 7
    logits = model(ids[:, 7:], cache=cache, use_cache=True).logits
    torch.testing.assert_close(logits, model(ids).logits[:, 7:], atol=1e-4, rtol=0)


def test_prompt_lookup_decoding_equals_greedy():
    model = make_model()
    phrase = random_ids(1, 6)
    prompt = torch.cat([phrase, random_ids(1, 3, seed=1), phrase, phrase[:, :2]], 1)  # n-grams to look up
    assert torch.equal(greedy(model, prompt, prompt_lookup_num_tokens=4), greedy(model, prompt))


@torch.no_grad()
def test_static_cache_equals_full_forward():
    model = make_model()
    ids = random_ids(2, 40)
    full = model(ids).logits
    cache = StaticCache(config=model.config, max_cache_len=64)
    out = model(ids[:, :11], cache=cache, use_cache=True)
    steps = [out.logits]
    for t in range(11, 40):
        steps.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=0)
    prompt = ids[:1, :7]
    static = greedy(model, prompt, cache_implementation="static")
    assert torch.equal(static, greedy(model, prompt))


@pytest.mark.parametrize("implementation", [None, "dynamic"])
def test_generate_uses_the_cache_asked_for(implementation):
    # Asked for none, generate() gets the bounded LongNetCache in place of its DynamicCache; a cache
    # implementation the user names is kept ("offloaded", a DynamicCache too, needs a GPU).
    model = make_model()
    prompt = random_ids(1, 7)
    out = greedy(model, prompt, cache_implementation=implementation, return_dict_in_generate=True)
    assert type(out.cache) is (LongNetCache if implementation is None else DynamicCache)
    assert torch.equal(out.sequences, greedy(model, prompt, cache=DynamicCache()))


def test_past_key_values_is_the_deprecated_name_of_cache():
    model = make_model()
    ids = random_ids(1, 20)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = model(ids[:, 10:], past_key_values=model(ids[:, :10], use_cache=True).cache, use_cache=True)
    assert any("`past_key_values` is deprecated" in str(warning.message) for warning in caught)
    new = model(ids[:, 10:], cache=model(ids[:, :10], use_cache=True).cache, use_cache=True)
    torch.testing.assert_close(old.logits, new.logits, atol=0, rtol=0)
    torch.testing.assert_close(new.logits, model(ids).logits[:, 10:], atol=1e-4, rtol=0)


@pytest.mark.parametrize("task", ["text-generation", "feature-extraction", "text-classification"])
def test_pipelines(tokenizer, task):
    """The pipelines of the three tasks a LongNet class serves, on a tiny model and a tokenizer made here:
    a batch of two texts, and the first one's result against the model called directly."""
    model_class = {"feature-extraction": LongNetModel, "text-classification": LongNetForSequenceClassification}
    model = make_model(model_class.get(task), num_labels=2)
    text = "def handler(self, request):\n    return request.path\n"
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    kwargs = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False) if task == "text-generation" else {}
    result = pipeline(task, model=model, tokenizer=tokenizer)([text, text[:20]], batch_size=2, **kwargs)
    assert len(result) == 2
    if task == "text-generation":
        expected = text + tokenizer.decode(greedy(model, ids)[0, ids.shape[1] :], skip_special_tokens=True)
        assert result[0][0]["generated_text"] == expected
    elif task == "feature-extraction":
        torch.testing.assert_close(torch.tensor(result[0][0]), model(ids).last_hidden_state[0], atol=1e-5, rtol=0)
    else:
        assert result[0]["score"] == pytest.approx(model(ids).logits.softmax(-1).max().item(), abs=1e-5)
