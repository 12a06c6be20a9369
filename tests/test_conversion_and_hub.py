"""Llama-family -> LongNet conversion, attn_implementation="longnet_dilated" on stock models, Hub upload."""

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY, left_padded
from huggingface_hub import HfApi, ModelCard
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import longnet  # noqa: F401
from longnet import LongNetForCausalLM

ROOT = Path(__file__).resolve().parents[1]
CONVERT = str(ROOT / "scripts" / "convert_llama_to_longnet.py")
sys.path.insert(0, str(ROOT / "scripts"))  # the scripts' main(argv), called in this process
SOURCES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": 4096}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
}
BRANCHES = {"segment_lengths": [4, 8, 12], "dilation_rates": [1, 2, 3]}


def source_model(kind, folder=None, tokenizer=None, **save_kwargs):
    config_class, model_class, extra = SOURCES[kind]
    torch.manual_seed(0)
    model = model_class(config_class(**TINY, **extra)).eval()
    if folder is not None:
        model.save_pretrained(folder, **save_kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
    return model


def convert(source, destination, *branches, check=True, in_process=True):
    """The conversion script run on ``source``: its exit code and output. In this process (its main(argv);
    any exception but SystemExit fails the test, as a traceback would) unless ``in_process`` is False: each
    new process pays the script's imports (5-10 s here)."""
    import convert_llama_to_longnet

    argv = [str(source), str(destination), *branches]
    if in_process:
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                convert_llama_to_longnet.main(argv)
                code = 0
            except SystemExit as stop:
                code = stop.code
        result = subprocess.CompletedProcess(argv, code, stdout.getvalue(), stderr.getvalue())
    else:
        result = subprocess.run([sys.executable, CONVERT, *argv], capture_output=True, text=True)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def ids(batch=2, length=30, seed=0):
    return torch.randint(3, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", list(SOURCES))
def test_one_full_branch_conversion_equals_the_source(kind, tmp_path, tokenizer):
    source = source_model(kind, tmp_path / "src", tokenizer)
    result = convert(tmp_path / "src", tmp_path / "dst", "--segment_lengths", "64", "--dilation_rates", "1")
    if kind == "mistral":
        assert "dropped: sliding_window=4096" in result.stdout
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "dst").eval()
    assert type(converted) is LongNetForCausalLM
    x = ids()
    torch.testing.assert_close(converted(x).logits, source(x).logits, atol=1e-5, rtol=0)
    for name in (
        "tokenizer.json",
        "generation_config.json",
        "README.md",
        "modeling_longnet.py",
        "configuration_longnet.py",
        "dilated_attention.py",
    ):
        assert (tmp_path / "dst" / name).exists(), name
    assert json.loads((tmp_path / "dst" / "config.json").read_text())["auto_map"]["AutoModel"] == (
        "modeling_longnet.LongNetModel"
    )


@pytest.mark.parametrize("kind", list(SOURCES))
def test_dilated_conversion_matches_the_source_with_longnet_attention(kind, tmp_path, tokenizer):
    source_model(kind, tmp_path / "src", tokenizer)
    convert(tmp_path / "src", tmp_path / "dst", "--segment_lengths", "4", "8", "12", "--dilation_rates", "1", "2", "3")
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "dst").eval()
    _, model_class, _ = SOURCES[kind]
    stock = model_class.from_pretrained(tmp_path / "src", attn_implementation="longnet_dilated").eval()
    stock.config.segment_lengths, stock.config.dilation_rates = BRANCHES["segment_lengths"], BRANCHES["dilation_rates"]
    x = ids()
    torch.testing.assert_close(converted(x).logits, stock(x).logits, atol=1e-5, rtol=0)
    dense = model_class.from_pretrained(tmp_path / "src").eval()
    assert not torch.allclose(converted(x).logits, dense(x).logits, atol=1e-3)
    generated = converted.generate(x[:1, :5], max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert generated.shape == (1, 15)


# RoPE scaling as most Hub checkpoints still write it: the transformers 4.x format, rope_theta beside
# rope_scaling, with "rope_type" or (older) "type". Short original lengths make every kind matter at
# the test's lengths (llama3, yarn) or everywhere (linear); dynamic acts only beyond max_position_embeddings.
ROPE_SCALINGS = {
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
    "yarn": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64},
    "linear": {"type": "linear", "factor": 4.0},
    "dynamic": {"type": "dynamic", "factor": 4.0},
}


def rope_scaled_source(folder, kind, tokenizer):
    """A Llama checkpoint whose config.json has ``rope_theta`` and ``rope_scaling`` (transformers 4.x), and
    the stock LlamaForCausalLM that transformers itself loads from it."""
    source_model("llama", folder, tokenizer)
    config = json.loads((folder / "config.json").read_text())
    del config["rope_parameters"]
    config.update(rope_theta=500000.0, rope_scaling=ROPE_SCALINGS[kind])
    (folder / "config.json").write_text(json.dumps(config))
    stock = LlamaForCausalLM.from_pretrained(folder).eval()
    assert stock.config.rope_parameters["rope_type"] == kind
    return stock


@pytest.mark.parametrize("kind", list(ROPE_SCALINGS))
def test_conversion_keeps_rope_scaling_of_a_4x_config(kind, tmp_path, tokenizer):
    source = rope_scaled_source(tmp_path / "src", kind, tokenizer)
    result = convert(tmp_path / "src", tmp_path / "dst", "--segment_lengths", "512", "--dilation_rates", "1")
    assert "dropped: nothing" in result.stdout
    written = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert written["rope_parameters"] == source.config.rope_parameters
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "dst").eval()
    x = ids(2, 60)  # within max_position_embeddings (512): dynamic scaling equals plain RoPE here
    with torch.no_grad():
        expected = source(x).logits
        torch.testing.assert_close(converted(x).logits, expected, atol=1e-5, rtol=0)
        if kind != "dynamic":  # the comparison can fail: unscaled RoPE gives other logits
            plain = LlamaConfig(**TINY, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
            unscaled = LlamaForCausalLM(plain).eval()
            unscaled.load_state_dict(source.state_dict())
            assert not torch.allclose(unscaled(x).logits, expected, atol=1e-3)


def test_conversion_keeps_dynamic_rope_beyond_max_position_embeddings(tmp_path, tokenizer):
    source = rope_scaled_source(tmp_path / "src", "dynamic", tokenizer)
    convert(tmp_path / "src", tmp_path / "dst", "--segment_lengths", "1024", "--dilation_rates", "1")
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "dst").eval()
    x = ids(1, 600)  # longer than max_position_embeddings (512): the base frequency grows
    with torch.no_grad():
        torch.testing.assert_close(converted(x).logits, source(x).logits, atol=1e-5, rtol=0)


def test_sharded_source_gives_sharded_destination(tmp_path, tokenizer):
    source = source_model("llama", tmp_path / "src", tokenizer, max_shard_size="100KB")
    shards = sorted((tmp_path / "src").glob("model-*.safetensors"))
    assert len(shards) > 1
    convert(tmp_path / "src", tmp_path / "dst", "--segment_lengths", "64", "--dilation_rates", "1")
    assert len(sorted((tmp_path / "dst").glob("model-*.safetensors"))) == len(shards)
    assert (tmp_path / "dst" / "model.safetensors.index.json").exists()
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "dst").eval()
    torch.testing.assert_close(converted(ids()).logits, source(ids()).logits, atol=1e-5, rtol=0)


def test_conversion_errors_say_what_is_supported(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path / "gpt2")
    result = convert(tmp_path / "gpt2", tmp_path / "out", check=False, in_process=False)  # as a user runs it
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "not supported; supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM" in result.stderr

    result = convert(tmp_path / "nothing", tmp_path / "out", check=False)
    assert result.returncode == 2 and "has no config.json" in result.stderr

    source_model("llama", tmp_path / "src")
    (tmp_path / "notes.txt").write_text("mine")
    result = convert(tmp_path / "src", tmp_path / "notes.txt", check=False)
    assert (
        result.returncode == 2
        and result.stderr.strip() == f"error: {tmp_path / 'notes.txt'} exists and is not a folder"
    )
    assert (tmp_path / "notes.txt").read_text() == "mine"

    model = source_model("llama")
    (tmp_path / "bin").mkdir()
    model.config.save_pretrained(tmp_path / "bin")
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    result = convert(tmp_path / "bin", tmp_path / "out", check=False)
    assert result.returncode == 2 and "--allow_pytorch_bin" in result.stderr
    convert(
        tmp_path / "bin", tmp_path / "out", "--allow_pytorch_bin", "--segment_lengths", "64", "--dilation_rates", "1"
    )
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(converted(ids()).logits, model(ids()).logits, atol=1e-5, rtol=0)


def truncate_weights(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])


def corrupt_pytorch_bin(folder: Path) -> None:
    """Weights that pass every check before writing starts and fail while the destination is written."""
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not a pickle" * 10)


# case: (what breaks the source, flags, what the error says). One case per check: each run costs the
# script's imports (5-10 s here).
CONVERSION_ERRORS = {
    "truncated safetensors": (truncate_weights, [], "model.safetensors is truncated or corrupt"),
    "corrupt pytorch_model.bin": (corrupt_pytorch_bin, ["--allow_pytorch_bin"], "pytorch_model.bin is truncated"),
    "zero segment length": (
        None,
        ["--segment_lengths", "4", "0", "--dilation_rates", "1", "2"],
        "--segment_lengths / --dilation_rates: segment_lengths must hold positive integers, got 0",
    ),
}


@pytest.mark.parametrize("case", list(CONVERSION_ERRORS))
def test_conversion_refuses_bad_input_and_writes_nothing(case, tmp_path):
    breaks, flags, message = CONVERSION_ERRORS[case]
    source_model("llama", tmp_path / "src")
    if breaks:
        breaks(tmp_path / "src")
    branches = ["--segment_lengths", "64", "--dilation_rates", "1"] if "--segment_lengths" not in flags else []
    result = convert(tmp_path / "src", tmp_path / "dst", *branches, *flags, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert message in result.stderr.splitlines()[-1] and result.stderr.splitlines()[-1].startswith("error: ")
    assert "Traceback" not in result.stdout + result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no destination, no partial sibling


def test_conversion_sets_token_ids_outside_the_vocabulary_to_none_and_keeps_the_license(
    tmp_path, tokenizer, monkeypatch
):
    source_model("llama", tmp_path / "src", tokenizer)
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    (tmp_path / "src" / "config.json").write_text(json.dumps({**config, "pad_token_id": -1}))
    generation = json.loads((tmp_path / "src" / "generation_config.json").read_text())
    (tmp_path / "src" / "generation_config.json").write_text(json.dumps({**generation, "pad_token_id": -1}))
    (tmp_path / "src" / "README.md").write_text("---\nlicense: llama3.1\n---\n# A Llama\n")
    result = convert(tmp_path / "src", tmp_path / "dst", "--segment_lengths", "64", "--dilation_rates", "1")
    assert "changed: pad_token_id=-1 -> None (outside the vocabulary)" in result.stdout
    assert "license: llama3.1" in result.stdout
    assert "generation_config.json pad_token_id=-1 -> None" in result.stdout
    for name in ("config.json", "generation_config.json"):
        assert json.loads((tmp_path / "dst" / name).read_text())["pad_token_id"] is None, name
    assert json.loads((tmp_path / "dst" / "training_info.json").read_text())["license"] == {"license": "llama3.1"}
    import push_to_hub  # the standalone load is tested on converted folders above; here: the card

    monkeypatch.setattr(push_to_hub, "check_loads_standalone", lambda folder: {"class": "LongNetForCausalLM"})
    push([str(tmp_path / "dst"), "someone/longnet-llama", "--dry-run"], monkeypatch)
    card = ModelCard.load(tmp_path / "dst-hub-staging" / "README.md")
    assert card.data.license == "llama3.1"


# ---------------------------------------------------------------------------------------------------
# attn_implementation="longnet_dilated" on a stock model


def stock_llama(**branches):
    torch.manual_seed(0)
    config = LlamaConfig(**TINY, **(branches or BRANCHES))
    return LlamaForCausalLM._from_config(config, attn_implementation="longnet_dilated").eval()


def test_stock_model_cached_decoding_equals_full_forward():
    model = stock_llama()
    x = ids(2, 40)
    full = model(x).logits
    out = model(x[:, :6], use_cache=True)
    cache, steps = out.cache, [out.logits]
    for t in range(6, 40):
        out = model(x[:, t : t + 1], cache=cache, use_cache=True)
        cache, steps = out.cache, steps + [out.logits]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=0)


def test_stock_model_left_padding_equals_each_prompt_alone():
    model = stock_llama()
    prompts = [ids(1, n, seed=n)[0] for n in (4, 11)]
    batch, mask = left_padded(prompts)
    kwargs = dict(
        max_new_tokens=15,
        min_new_tokens=15,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    batched = model.generate(batch, attention_mask=mask, **kwargs)
    for row, p in enumerate(prompts):
        alone = model.generate(p[None], **kwargs)
        assert torch.equal(batched.sequences[row, 11:], alone.sequences[0, len(p) :])
        torch.testing.assert_close(
            torch.stack(batched.logits, 1)[row], torch.stack(alone.logits, 1)[0], atol=1e-4, rtol=0
        )


@pytest.mark.parametrize("cache", ["static", "sliding window"])
def test_stock_model_refuses_a_cache_that_does_not_hold_every_key(cache):
    # Both gave wrong logits silently: a static cache's unwritten slots made every attention output 0, and
    # a sliding window's dropped keys moved every segment and dilation offset.
    prompt = ids(1, 6)
    if cache == "static":
        model, kwargs = stock_llama(), {"cache_implementation": "static"}
    else:
        torch.manual_seed(0)
        config = MistralConfig(**TINY, **BRANCHES, sliding_window=8)
        model, kwargs = MistralForCausalLM._from_config(config, attn_implementation="longnet_dilated").eval(), {}
    with pytest.raises(ValueError, match=f"needs a cache that holds every key in order .*{cache}"):
        model.generate(prompt, max_new_tokens=12, do_sample=False, **kwargs)
    if cache == "sliding window":  # without the window: cached decoding equals the full forward
        model.config.sliding_window = None
        out = model.generate(
            prompt, max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        full = model(out.sequences).logits[0, 5:-1]
        torch.testing.assert_close(torch.stack(out.logits, 1)[0], full, atol=1e-4, rtol=0)


def test_stock_model_without_branches_is_a_clear_error():
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(LlamaConfig(**TINY), attn_implementation="longnet_dilated").eval()
    with pytest.raises(ValueError, match="needs segment_lengths and dilation_rates in the model's config"):
        model(ids())


def test_stock_model_training_with_attention_dropout_is_refused():
    config = LlamaConfig(**TINY, **BRANCHES, attention_dropout=0.1)
    model = LlamaForCausalLM._from_config(config, attn_implementation="longnet_dilated")
    model.eval()(ids())  # no dropout at inference: runs
    with pytest.raises(ValueError, match="attention_dropout=0.1"):
        model.train()(ids())


# ---------------------------------------------------------------------------------------------------
# push_to_hub


@pytest.fixture
def model_folder(tmp_path, tokenizer):
    folder = tmp_path / "model"
    torch.manual_seed(0)
    LongNetForCausalLM(longnet.LongNetConfig(**TINY, **BRANCHES)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "perplexity_by_context.json").write_text(json.dumps({"model": {"64": 12.5, "128": 11.0}}))
    (folder / "perplexity_by_context.md").write_text("# title\n\n| context | model |\n|---:|---:|\n| 64 | 12.50 |\n")
    return folder


def push(argv, monkeypatch, existing=None, calls=None):
    """push_to_hub.main(argv) against a fake Hub whose ``existing`` repositories (id: private?) are there
    already; returns the calls it got (into ``calls`` as they come, when given)."""
    import push_to_hub

    calls = {} if calls is None else calls
    repositories = dict(existing or {})

    def create_repo(self, repo_id, **kw):
        calls.setdefault("repo", (repo_id, kw))
        repositories.setdefault(repo_id, kw.get("private", False))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "repo_info", lambda self, repo_id, **kw: SimpleNamespace(private=repositories[repo_id]))
    monkeypatch.setattr(HfApi, "create_branch", lambda self, repo_id, **kw: calls.setdefault("branch", kw))

    def create_commit(self, repo_id, operations, commit_message, revision=None, **kw):
        calls["commit"] = {
            "repo_id": repo_id,
            "message": commit_message,
            "revision": revision,
            "files": {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations},
        }
        return "https://huggingface.co/fake/commit/1"

    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    push_to_hub.main(argv)
    return calls


def test_push_to_hub_uploads_a_complete_folder_without_the_token(model_folder, monkeypatch, capsys):
    token = "hf_TESTTOKENdoNotLeak1234567890"
    monkeypatch.setenv("HF_TOKEN", token)
    calls = push(
        [
            str(model_folder),
            "someone/tiny-longnet",
            "--private",
            "--revision",
            "dev",
            "--commit_message",
            "first upload",
        ],
        monkeypatch,
    )
    assert calls["repo"] == ("someone/tiny-longnet", {"repo_type": "model", "private": True, "exist_ok": True})
    assert calls["branch"]["branch"] == "dev"
    commit = calls["commit"]
    assert commit["revision"] == "dev" and commit["message"] == "first upload"
    files = commit["files"]
    for name in (
        "model.safetensors",
        "config.json",
        "configuration_longnet.py",
        "modeling_longnet.py",
        "dilated_attention.py",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "README.md",
    ):
        assert name in files, name
    assert "auto_map" in json.loads(files["config.json"])
    card = ModelCard(files["README.md"].decode())
    metadata = card.data.to_dict()
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "text-generation"
    assert metadata["license"] == "apache-2.0"
    assert {"longnet", "dilated-attention"} <= set(metadata["tags"])
    assert metadata["model-index"][0]["results"][0]["metrics"][0]["value"] == 12.5
    assert "segment lengths `w` | [4, 8, 12]" in card.text and "trust_remote_code=True" in card.text
    assert "| 64 | 12.50 |" in card.text
    captured = capsys.readouterr()
    assert token not in captured.out + captured.err
    assert all(token.encode() not in content for content in files.values())


@pytest.mark.parametrize("private", [True, False], ids=["private", "public"])
def test_push_says_the_visibility_the_repository_has(private, model_folder, monkeypatch, capsys):
    # An upload never changes an existing repository's visibility: --private into a public one is refused
    # before anything is uploaded, and what is printed is what the repository is.
    flags = ["--private"] if private else []
    existing, calls = {"someone/tiny-longnet": not private}, {}
    if private:
        with pytest.raises(SystemExit) as stopped:
            push([str(model_folder), "someone/tiny-longnet", *flags], monkeypatch, existing, calls)
        assert stopped.value.code == 2 and "commit" not in calls
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith("error: --private: someone/tiny-longnet already exists and is public")
    else:
        push([str(model_folder), "someone/tiny-longnet", *flags], monkeypatch, existing, calls)
        assert "commit" in calls
        assert "uploaded to someone/tiny-longnet (private): " in capsys.readouterr().out


def remove_tokenizer(folder: Path) -> None:
    (folder / "tokenizer.json").unlink()


def record_unknown_license(folder: Path) -> None:
    """What conversion records for a source whose card names no license."""
    (folder / "training_info.json").write_text(json.dumps({"license": None, "training_data": "converted"}))


def stage_something_else(folder: Path) -> None:
    (folder.parent / "stage").mkdir()
    (folder.parent / "stage" / "notes.txt").write_text("mine")


# case: (what breaks the folder, repo id, what the error says). Every case stops before the standalone load.
PUSH_ERRORS = {
    "no tokenizer": (remove_tokenizer, "someone/tiny-longnet", "has no tokenizer (none of tokenizer.json"),
    "invalid repo id": (None, "someone/not valid!", "repo_id 'someone/not valid!' is not a valid Hub repository id"),
    "repo id with three parts": (None, "a/b/c", "repo_id 'a/b/c' is not a valid Hub repository id"),
    "source license unknown": (record_unknown_license, "someone/tiny-longnet", "names no license: give the source"),
    "staging folder not staged here": (stage_something_else, "someone/tiny-longnet", "was not staged by this script"),
}


@pytest.mark.parametrize("case", list(PUSH_ERRORS))
def test_push_refuses_bad_input_and_stages_nothing(case, model_folder, tmp_path, monkeypatch, capsys):
    breaks, repo_id, message = PUSH_ERRORS[case]
    if breaks:
        breaks(model_folder)
    staging = tmp_path / "stage"
    with pytest.raises(SystemExit) as stopped:
        push([str(model_folder), repo_id, "--dry-run", "--staging_dir", str(staging)], monkeypatch)
    assert stopped.value.code == 2
    captured = capsys.readouterr()
    error = captured.err.strip().splitlines()[-1]
    assert error.startswith("error: ") and message in error
    assert "Traceback" not in captured.out + captured.err
    if case == "staging folder not staged here":
        assert [p.name for p in staging.iterdir()] == ["notes.txt"]  # left as it was
    else:
        assert not staging.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no partial staging


def test_card_states_the_recorded_data_and_nothing_more(model_folder):
    """With --validation_file nothing is split off: the card says what training_info.json records, and no
    "held-out part" of the training data."""
    from longnet.hub import render_model_card

    data = "3 local files (a.py b.py c.py), validation: 1 files (v.py)"
    (model_folder / "training_info.json").write_text(json.dumps({"training_data": data}))
    card = ModelCard(render_model_card(ROOT / "model_cards" / "longnet.md", model_folder, repo_id="someone/x"))
    assert f"| data | {data} |" in card.text and "held-out" not in str(card)
    assert card.data.to_dict()["model-index"][0]["results"][0]["dataset"]["name"] == data
    assert card.data.license == "apache-2.0"  # trained here: no source license recorded


def package_imports(name: str, seen: set[str]) -> set[str]:
    """The package's files ``name`` needs: itself and, transitively, every ``from .module import``."""
    seen.add(name)
    source = (ROOT / "longnet" / name).read_text()
    for module in re.findall(r"^\s*from \.(\w+) import", source, flags=re.M):
        if f"{module}.py" not in seen:
            package_imports(f"{module}.py", seen)
    return seen


LOADS_WITHOUT_THE_PACKAGE = (
    "import sys\n"
    "class Block:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.split('.')[0] == 'longnet': raise ModuleNotFoundError(name)\n"
    "sys.meta_path.insert(0, Block())\n"
    "from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline\n"
    "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
    "t = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
    "print(pipeline('text-generation', model=m, tokenizer=t)('x = ', max_new_tokens=3)[0]['generated_text'])\n"
)


def test_every_folder_writer_writes_the_files_remote_code_needs(model_folder, tmp_path, tokenizer, monkeypatch):
    """One list (longnet.hub.remote_code_files) for save_pretrained, conversion and upload, equal to what
    the modeling file imports; a converted folder then loads where longnet cannot be imported."""
    from longnet.hub import remote_code_files

    needed = sorted(package_imports("modeling_longnet.py", set()))
    assert remote_code_files() == needed and "sequence_parallel.py" in needed
    assert set(needed) <= {p.name for p in model_folder.iterdir()}  # save_pretrained
    source_model("llama", tmp_path / "src", tokenizer)
    convert(tmp_path / "src", tmp_path / "dst", "--segment_lengths", "64", "--dilation_rates", "1")
    assert set(needed) <= {p.name for p in (tmp_path / "dst").iterdir()}
    push(
        [str(model_folder), "someone/tiny-longnet", "--dry-run", "--staging_dir", str(tmp_path / "stage")], monkeypatch
    )
    assert set(needed) <= {p.name for p in (tmp_path / "stage").iterdir()}
    script = LOADS_WITHOUT_THE_PACKAGE
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "dst")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def test_dry_run_stages_a_folder_that_loads_without_the_package(model_folder, tmp_path, monkeypatch, capsys):
    import push_to_hub

    staging = tmp_path / "stage"
    calls = push([str(model_folder), "someone/tiny-longnet", "--dry-run", "--staging_dir", str(staging)], monkeypatch)
    assert "commit" not in calls and "repo" not in calls
    listed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert listed["files"] == sorted(p.name for p in staging.iterdir() if p.name != push_to_hub.STAGING_MARKER)
    script = LOADS_WITHOUT_THE_PACKAGE
    result = subprocess.run([sys.executable, "-c", script, str(staging)], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().startswith("x = ")
    # A second dry run replaces what the first staged (the standalone load is checked above).
    (staging / "leftover.txt").write_text("from the first run")
    monkeypatch.setattr(push_to_hub, "check_loads_standalone", lambda folder: {"class": "LongNetForCausalLM"})
    push([str(model_folder), "someone/tiny-longnet", "--dry-run", "--staging_dir", str(staging)], monkeypatch)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["files"] == listed["files"]
    assert not (staging / "leftover.txt").exists()


def test_command_lines_are_recorded_without_secrets(monkeypatch):
    from longnet.hub import redact_command_line

    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false-but-long")  # not a secret: a tokenizer setting
    argv = ["--hub_token", "abc12345", "--hub_token=xyz98765", "--tokenizer_name", "gpt2", "--run_name"]
    argv += ["hf_abcdefghijklmnopqrstuvwxyz", "--report_to", "0123456789abcdef", "--note", "false-but-long"]
    assert redact_command_line(argv) == [
        "--hub_token",
        "<redacted>",
        "--hub_token=<redacted>",
        "--tokenizer_name",
        "gpt2",
        "--run_name",
        "<redacted>",
        "--report_to",
        "<redacted>",
        "--note",
        "false-but-long",
    ]


def test_push_redacts_a_recorded_token_and_refuses_one_in_a_binary_file(model_folder, tmp_path, monkeypatch, capsys):
    token, environment_token = "hf_PLANTEDtoken1234567890abcd", "a-secret-from-the-environment"
    monkeypatch.setenv("HF_TOKEN", environment_token)
    info = {"command": f"python scripts/train.py --hub_token {token}", "summary": {"note": environment_token}}
    (model_folder / "training_info.json").write_text(json.dumps(info))
    staging = tmp_path / "stage"
    push([str(model_folder), "someone/tiny-longnet", "--dry-run", "--staging_dir", str(staging)], monkeypatch)
    for path in staging.iterdir():
        assert token.encode() not in path.read_bytes() and environment_token.encode() not in path.read_bytes(), path
    staged = json.loads((staging / "training_info.json").read_text())
    assert staged == {"command": "python scripts/train.py --hub_token <redacted>", "summary": {"note": "<redacted>"}}
    assert "training_info.json holds a secret-looking string" in capsys.readouterr().out
    assert token in (model_folder / "training_info.json").read_text()  # the model folder is left as it is

    (model_folder / "training_info.json").unlink()
    (model_folder / "extra.bin").write_bytes(b"\x00\xff" + token.encode() + b"\x80")
    with pytest.raises(SystemExit) as stopped:
        push(
            [str(model_folder), "someone/tiny-longnet", "--dry-run", "--staging_dir", str(tmp_path / "stage2")],
            monkeypatch,
        )
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert "extra.bin holds a secret-looking string" in error and token not in error
    assert not (tmp_path / "stage2").exists()


def test_push_refuses_a_folder_without_remote_code(model_folder, monkeypatch):
    (model_folder / "modeling_longnet.py").unlink()
    with pytest.raises(SystemExit):
        push([str(model_folder), "someone/tiny-longnet", "--dry-run"], monkeypatch)


@pytest.mark.parametrize("interrupted", ["while writing", "while renaming"])
def test_an_interrupted_folder_write_keeps_the_folder_it_would_replace(interrupted, tmp_path, monkeypatch):
    """write_folder (conversion destination, push staging) replaces an existing folder only once the new
    one is complete: an interruption at any step leaves the old folder whole and no temporary behind."""
    from longnet.hub import write_folder

    destination = tmp_path / "model"
    destination.mkdir()
    (destination / "config.json").write_text("old")
    rename = Path.rename

    def interrupting_rename(self, target):
        if ".partial-" in self.name:  # the complete new folder being moved into place
            raise KeyboardInterrupt
        return rename(self, target)

    if interrupted == "while renaming":
        monkeypatch.setattr(Path, "rename", interrupting_rename)
    with pytest.raises(KeyboardInterrupt), write_folder(destination) as folder:
        (folder / "config.json").write_text("new")
        if interrupted == "while writing":
            raise KeyboardInterrupt
    assert (destination / "config.json").read_text() == "old"
    assert [path.name for path in tmp_path.iterdir()] == ["model"]
    monkeypatch.undo()
    with write_folder(destination) as folder:
        (folder / "config.json").write_text("new")
    assert (destination / "config.json").read_text() == "new"
    assert [path.name for path in tmp_path.iterdir()] == ["model"]
