"""LongNetModel / LongNetForCausalLM: a standard transformers decoder with dilated attention inside.

Shaped after transformers' tests/models/llama: a tester builds a tiny config and inputs, and each
test checks one behaviour against an independent reference (the stock Llama model, a full forward,
each sequence run alone).
"""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import TINY, tiny_config
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    DataCollatorWithFlattening,
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
)

from longnet import LongNetConfig, LongNetForCausalLM, LongNetForSequenceClassification, LongNetModel
from longnet.modeling_longnet import LongNetCache


def make_model(cls=LongNetForCausalLM, seed=0, **overrides):
    torch.manual_seed(seed)
    return cls(tiny_config(**overrides)).eval()


def random_ids(batch, length, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, TINY["vocab_size"], (batch, length), generator=generator)


# ---------------------------------------------------------------------------------------------------
# The decoder around the kernel is standard


def test_one_dense_branch_equals_llama():
    """segment_lengths=[L >= length], dilation_rates=[1]: exactly Llama, weights shared."""
    torch.manual_seed(0)
    llama_config = LlamaConfig(**{k: v for k, v in TINY.items()}, attention_dropout=0.0)
    llama = LlamaForCausalLM(llama_config).eval()
    longnet = LongNetForCausalLM(tiny_config(segment_lengths=[64], dilation_rates=[1])).eval()
    assert set(longnet.state_dict()) == set(llama.state_dict())
    longnet.load_state_dict(llama.state_dict())
    ids = random_ids(2, 40)
    expected = llama(ids, labels=ids, output_hidden_states=True)
    got = longnet(ids, labels=ids, output_hidden_states=True)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-6, rtol=0)
    assert len(got.hidden_states) == len(expected.hidden_states) == TINY["num_hidden_layers"] + 1
    for a, b in zip(got.hidden_states, expected.hidden_states, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_dilation_changes_the_result():
    """The dilation pattern applies: real branches give other logits than one dense branch."""
    dense = make_model(segment_lengths=[64], dilation_rates=[1])
    dilated = make_model()
    ids = random_ids(1, 40)
    assert not torch.allclose(dense(ids).logits[:, 12:], dilated(ids).logits[:, 12:], atol=1e-3)
    # Before the first segment boundary of every branch with r = 1 ... nothing differs yet at t=0.
    torch.testing.assert_close(dense(ids).logits[:, 0], dilated(ids).logits[:, 0])


def test_eager_and_fused_kernels_agree_and_eager_returns_weights():
    fused = make_model()
    eager = make_model(attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"
    ids = random_ids(2, 30)
    out = eager(ids, output_attentions=True)
    torch.testing.assert_close(out.logits, fused(ids).logits, atol=1e-5, rtol=0)
    assert len(out.attentions) == TINY["num_hidden_layers"]
    weights = out.attentions[0]
    assert weights.shape == (2, TINY["num_attention_heads"], 30, 30)
    sums = weights.sum(-1)
    torch.testing.assert_close(sums[sums > 0], torch.ones_like(sums[sums > 0]))
    assert torch.all(weights.triu(1) == 0)  # causal
    # Head 1, query 5: branch (4,1) keys 4..5, branch (8,2) needs 5 % 2 == 1: keys 1,3,5;
    # branch (12,3) needs 5 % 3 == 1: keys 1,4. Nothing else.
    assert set(weights[0, 1, 5].nonzero().squeeze(1).tolist()) == {1, 3, 4, 5}
    with pytest.raises(ValueError, match="output_attentions=True needs attn_implementation='eager'"):
        fused(ids, output_attentions=True)


def test_bf16_forward_is_close_to_fp32():
    model = make_model()
    ids = random_ids(2, 30)
    expected = model(ids).logits
    got = model.to(torch.bfloat16)(ids).logits
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=0.05, rtol=0.05)


def test_auto_classes_are_registered():
    config = AutoConfig.for_model("longnet", **TINY)
    assert isinstance(config, LongNetConfig)
    assert type(AutoModel.from_config(config)) is LongNetModel
    assert type(AutoModelForCausalLM.from_config(config)) is LongNetForCausalLM
    assert type(AutoModelForSequenceClassification.from_config(config)) is LongNetForSequenceClassification
    import importlib

    importlib.reload(importlib.import_module("longnet"))  # registering twice is fine


# ---------------------------------------------------------------------------------------------------
# Save, load, remote code


def test_save_pretrained_round_trip(tmp_path):
    model = make_model(tie_word_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "configuration_longnet.py",
        "modeling_longnet.py",
        "dilated_attention.py",
    } <= files
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoConfig"] == "configuration_longnet.LongNetConfig"
    assert auto_map["AutoModel"] == "modeling_longnet.LongNetModel"
    assert auto_map["AutoModelForCausalLM"] == "modeling_longnet.LongNetForCausalLM"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ids = random_ids(1, 20)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)


REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys
    class NoLongNet:  # the package must not be importable here
        def find_spec(self, name, path=None, target=None):
            if name == "longnet" or name.startswith("longnet."):
                raise ModuleNotFoundError(name)
    sys.meta_path.insert(0, NoLongNet())
    try:
        import longnet
        raise SystemExit("longnet is importable")
    except ModuleNotFoundError:
        pass
    import json, torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, pipeline
    folder, ids = sys.argv[1], torch.tensor(json.loads(sys.argv[2]))
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    text = generator("def main(", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    print(json.dumps({"logits": model(ids).logits.tolist(), "hidden": base(ids).last_hidden_state.tolist(),
                      "text": text}))
    """
)


def test_remote_code_loads_without_the_package(tmp_path, tokenizer):
    model = make_model()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    ids = random_ids(1, 25)
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(tmp_path), json.dumps(ids.tolist())],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    torch.testing.assert_close(torch.tensor(remote["logits"]), model(ids).logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.tensor(remote["hidden"]), model.model(ids).last_hidden_state, atol=1e-6, rtol=0)
    assert remote["text"].startswith("def main(") and len(remote["text"]) > len("def main(")


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
    ids = torch.zeros(2, 10, dtype=torch.long)
    mask = torch.zeros(2, 10, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, 10 - len(p) :], mask[row, 10 - len(p) :] = p, 1
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
    longest = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, longest - len(p) :] = p
        mask[row, longest - len(p) :] = 1
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


def test_masked_tokens_are_dropped_from_the_sequence():
    """Tokens masked out in the middle and at the end: the rest behaves as the sequence without them
    (dilated positions and RoPE positions both count real tokens only)."""
    model = make_model()
    ids = random_ids(1, 20)
    alone = model(ids).logits
    junk = random_ids(1, 5, seed=1)
    holes = torch.cat([ids[:, :9], junk, ids[:, 9:], junk[:, :2]], 1)
    mask = torch.ones_like(holes)
    mask[:, 9:14] = 0
    mask[:, -2:] = 0
    got = model(holes, attention_mask=mask).logits
    torch.testing.assert_close(got[:, mask[0].bool()], alone, atol=1e-5, rtol=0)


def test_bad_attention_mask_shape_is_a_clear_error():
    model = make_model()
    with pytest.raises(ValueError, match="attention_mask must be 2D"):
        model(random_ids(1, 10), attention_mask=torch.ones(1, 1, 10, 10))


# ---------------------------------------------------------------------------------------------------
# Packed sequences


def test_packed_batch_equals_documents_run_separately():
    model = make_model()
    docs = [random_ids(1, n, seed=n)[0].tolist() for n in (11, 26, 7)]
    batch = DataCollatorWithFlattening()([{"input_ids": d} for d in docs])
    assert batch["input_ids"].shape == (1, sum(len(d) for d in docs))
    packed = model(**batch)
    total_loss, total_tokens = 0.0, 0
    start = 0
    for doc in docs:
        ids = torch.tensor([doc])
        alone = model(ids, labels=ids)
        torch.testing.assert_close(packed.logits[:, start : start + len(doc)], alone.logits, atol=1e-5, rtol=0)
        total_loss += alone.loss.item() * (len(doc) - 1)
        total_tokens += len(doc) - 1
        start += len(doc)
    torch.testing.assert_close(packed.loss.item(), total_loss / total_tokens, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------
# Training


def test_gradient_checkpointing_gives_equal_gradients():
    ids = random_ids(2, 30)
    grads = []
    for checkpointing in (False, True):
        model = make_model().train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=0)


def test_a_few_training_steps_lower_the_loss():
    model = make_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = random_ids(4, 32)
    losses = []
    for _ in range(15):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_resize_token_embeddings():
    model = make_model(tie_word_embeddings=True)
    model.resize_token_embeddings(TINY["vocab_size"] + 20)
    assert model.config.vocab_size == TINY["vocab_size"] + 20
    assert model.lm_head.weight.shape[0] == TINY["vocab_size"] + 20
    ids = torch.tensor([[TINY["vocab_size"] + 19, 5, 6]])
    assert model(ids).logits.shape == (1, 3, TINY["vocab_size"] + 20)


def test_sequence_classification_uses_the_last_real_token():
    model = make_model(LongNetForSequenceClassification, num_labels=3)
    ids = random_ids(1, 15)
    alone = model(ids).logits
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 4), torch.ones(1, 15)], 1).long()
    out = model(padded, attention_mask=mask, labels=torch.tensor([2]))
    assert out.logits.shape == (1, 3)
    torch.testing.assert_close(out.logits, alone, atol=1e-5, rtol=0)
    assert out.loss.item() > 0
