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
from conftest import TINY, make_model, random_ids, tiny_config
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    DataCollatorWithFlattening,
    LlamaConfig,
    LlamaForCausalLM,
)

from longnet import LongNetConfig, LongNetForCausalLM, LongNetForSequenceClassification, LongNetModel
from longnet.configuration_longnet import llama_config

# ---------------------------------------------------------------------------------------------------
# The decoder around the kernel is standard


def test_one_dense_branch_equals_llama():
    """segment_lengths=[L >= length], dilation_rates=[1]: exactly Llama, weights shared."""
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(**TINY, attention_dropout=0.0)).eval()
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


def test_llama_config_is_the_same_size_llama():
    """llama_config keeps every field but the branches: with one dense branch, a LongNet's weights in that Llama
    give the LongNet's logits (a non-default norm epsilon and RoPE base must carry over)."""
    config = tiny_config(
        segment_lengths=[64],
        dilation_rates=[1],
        rms_norm_eps=1e-2,
        rope_parameters={"rope_type": "default", "rope_theta": 50.0},
    )
    longnet = LongNetForCausalLM(config).eval()
    llama = LlamaForCausalLM(llama_config(config)).eval()
    llama.load_state_dict(longnet.state_dict(), strict=True)
    ids = random_ids(2, 40)
    torch.testing.assert_close(llama(ids).logits, longnet(ids).logits, atol=1e-5, rtol=0)


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
    # Asked for weights, the default implementation returns them too (from the eager function), as
    # transformers models do.
    asked = fused(ids, output_attentions=True)
    torch.testing.assert_close(asked.logits, out.logits, atol=1e-5, rtol=0)
    for got, expected in zip(asked.attentions, out.attentions, strict=True):
        torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="attn_implementation='sdpa' is not available for LongNet"):
        make_model(attn_implementation="sdpa")


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
# Padding


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
    # Embeddings show no padding: a batch of them without a mask cannot say where each sequence ends.
    embeds = model.get_input_embeddings()(torch.cat([ids, ids]))
    with pytest.raises(ValueError, match="needs an attention_mask to find each one's last token"):
        model(inputs_embeds=embeds)
