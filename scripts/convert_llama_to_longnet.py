"""Convert a Llama-family checkpoint folder (Llama, Mistral, Qwen2) into a LongNet folder.

    python scripts/convert_llama_to_longnet.py SRC DST --segment_lengths 2048 4096 --dilation_rates 1 2

Weights are streamed one source shard at a time into safetensors shards of the same grouping, so
memory stays near one shard. The tokenizer and generation config are copied, the remote-code files
and auto_map are written, and a model card is filled in. What LongNet cannot express (Mistral's
and Qwen2's sliding window) is dropped and said so. Weights are read only from safetensors unless
--allow_pytorch_bin is given.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import longnet
from longnet import LongNetConfig
from longnet.hub import render_model_card
from longnet.modeling_longnet import AUTO_MAP

ROOT = Path(__file__).resolve().parents[1]
SUPPORTED = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
# LongNetConfig fields taken over unchanged (Llama's names).
SHARED_FIELDS = [
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
    "rope_parameters",
    "attention_bias",
    "mlp_bias",
]
TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
]
CODE_FILES = ["configuration_longnet.py", "modeling_longnet.py", "dilated_attention.py"]


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def convert_config(source_config: dict, segment_lengths: list[int], dilation_rates: list[int]):
    """LongNetConfig for a source config.json, and what could not be carried over."""
    architectures = source_config.get("architectures") or []
    model_type = source_config.get("model_type")
    if not architectures and model_type in SUPPORTED.values():
        architectures = [name for name, kind in SUPPORTED.items() if kind == model_type]
    if len(architectures) != 1 or architectures[0] not in SUPPORTED:
        fail(f"architecture {architectures or model_type} is not supported; supported: {', '.join(SUPPORTED)}")
    fields = {name: source_config[name] for name in SHARED_FIELDS if source_config.get(name) is not None}
    if "rope_parameters" not in fields and "rope_theta" in source_config:
        fields["rope_parameters"] = {"rope_type": "default", "rope_theta": source_config["rope_theta"]}
    dropped = []
    model_type = SUPPORTED[architectures[0]]
    if model_type == "qwen2":
        # Qwen2 has biases on q/k/v but not on o_proj; LongNet's attention_bias covers all four, so
        # o_proj gets a zero bias (the same function).
        fields["attention_bias"] = True
        if source_config.get("use_sliding_window"):
            dropped.append(f"sliding_window={source_config.get('sliding_window')} (use_sliding_window=True)")
    if model_type == "mistral" and source_config.get("sliding_window") is not None:
        dropped.append(f"sliding_window={source_config['sliding_window']}")
    if source_config.get("attention_dropout"):
        dropped.append(f"attention_dropout={source_config['attention_dropout']}")
    config = LongNetConfig(**fields, segment_lengths=segment_lengths, dilation_rates=dilation_rates)
    config.architectures = ["LongNetForCausalLM"]
    config.auto_map = dict(AUTO_MAP)
    return config, model_type, dropped


def source_shards(source: Path, allow_pytorch_bin: bool) -> list[Path]:
    for pattern in ("model.safetensors", "model-*-of-*.safetensors"):
        found = sorted(source.glob(pattern))
        if found:
            return found
    bins = sorted(source.glob("pytorch_model*.bin"))
    if bins and not allow_pytorch_bin:
        fail(f"{source} has only pytorch_model*.bin weights (pickle); pass --allow_pytorch_bin to read them")
    if not bins:
        fail(f"no weights in {source}: expected model.safetensors or model-*-of-*.safetensors")
    return bins


def read_shard(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        with safe_open(path, framework="pt") as shard:
            return {name: shard.get_tensor(name) for name in shard.keys()}
    return torch.load(path, map_location="cpu", weights_only=True)


def convert(args: argparse.Namespace) -> None:
    source, destination = Path(args.source), Path(args.destination)
    if not (source / "config.json").exists():
        fail(f"{source} has no config.json: it is not a transformers checkpoint folder")
    if destination.exists() and any(destination.iterdir()):
        fail(f"{destination} exists and is not empty")
    config, model_type, dropped = convert_config(
        json.loads((source / "config.json").read_text()), args.segment_lengths, args.dilation_rates
    )
    shards = source_shards(source, args.allow_pytorch_bin)
    destination.mkdir(parents=True, exist_ok=True)

    weight_map, total_size, parameters = {}, 0, 0
    for number, shard_path in enumerate(shards, start=1):
        tensors = read_shard(shard_path)
        if model_type == "qwen2":
            for name in [n for n in tensors if n.endswith("self_attn.o_proj.weight")]:
                tensors[name.replace(".weight", ".bias")] = torch.zeros(
                    tensors[name].shape[0], dtype=tensors[name].dtype
                )
        if config.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)
        name = "model.safetensors" if len(shards) == 1 else f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, destination / name, metadata={"format": "pt"})
        weight_map.update({tensor_name: name for tensor_name in tensors})
        total_size += sum(t.numel() * t.element_size() for t in tensors.values())
        parameters += sum(t.numel() for t in tensors.values())
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (destination / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    config.save_pretrained(destination)
    package = Path(longnet.__file__).parent
    for name in CODE_FILES:
        shutil.copy(package / name, destination / name)
    copied = [name for name in TOKENIZER_FILES if (source / name).exists()]
    for name in copied:
        shutil.copy(source / name, destination / name)
    if "tokenizer.json" not in copied and "tokenizer.model" not in copied:
        print(f"warning: no tokenizer files in {source}; the LongNet folder has none either", file=sys.stderr)
    info = {
        "training_data": f"converted from {source.name} ({model_type}); not trained further",
        "parameters": parameters,
        "summary": {"converted from": str(source), "dropped": ", ".join(dropped) or "nothing"},
    }
    (destination / "training_info.json").write_text(json.dumps(info, indent=1))
    (destination / "README.md").write_text(render_model_card(ROOT / "model_cards" / "longnet.md", destination))
    print(f"converted {model_type} {source} -> {destination} ({len(weight_map)} tensors, {len(shards)} shard(s))")
    print("dropped: " + (", ".join(dropped) if dropped else "nothing"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a transformers checkpoint folder (config.json + safetensors)")
    parser.add_argument("destination", help="the LongNet folder to write (must not exist or be empty)")
    parser.add_argument("--segment_lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--dilation_rates", type=int, nargs="+", default=[1, 2, 4, 6, 12])
    parser.add_argument(
        "--allow_pytorch_bin",
        action="store_true",
        help="also read pytorch_model*.bin (pickle; only for checkpoints you trust)",
    )
    convert(parser.parse_args())


if __name__ == "__main__":
    main()
