"""Convert a Llama-family checkpoint folder (Llama, Mistral, Qwen2) into a LongNet folder.

    python scripts/convert_llama_to_longnet.py SRC DST --segment_lengths 2048 4096 --dilation_rates 1 2

Weights are streamed one source shard at a time into safetensors shards of the same grouping, so
memory stays near one shard. The source config is read as transformers reads it (AutoConfig: the 4.x
`rope_theta` + `rope_scaling` format and the 5.x `rope_parameters` both end up in `rope_parameters`,
so llama3 / yarn / linear / dynamic RoPE scaling carries over) and every field LongNet has is taken
over. The tokenizer and generation config are copied, the remote-code files and auto_map are
written, and a model card is filled in. What LongNet cannot express (Mistral's and Qwen2's sliding
window, any field it does not know) is dropped and said so; a special token id outside the vocabulary
(`pad_token_id: -1`, which transformers only warns about) becomes None and is reported. The source's
license (its README.md metadata) is recorded for the card. Weights are read only from safetensors
unless --allow_pytorch_bin is given; a corrupt or truncated weight file is refused before anything is
written, and the destination appears only once it is complete.
"""

from __future__ import annotations

import argparse
import json
import pickle
import shutil
import sys
from pathlib import Path

import torch
import yaml
from huggingface_hub import ModelCard
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, PreTrainedConfig

import longnet
from longnet import LongNetConfig
from longnet.dilated_attention import check_branches
from longnet.hub import has_tokenizer, remote_code_files, render_model_card, write_folder
from longnet.modeling_longnet import AUTO_MAP
from longnet.training import CONFIG_ERRORS, fail

ROOT = Path(__file__).resolve().parents[1]
SUPPORTED = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
# Source config entries that describe the file, not the model: LongNet writes its own.
NOT_CARRIED = {"_name_or_path", "architectures", "auto_map", "model_type", "transformers_version"}
# Source-only entries handled in convert_config, or without effect in transformers 5 (pretraining_tp).
SOURCE_ONLY = {"pretraining_tp", "sliding_window", "use_sliding_window", "max_window_layers", "layer_types"}
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


def convert_config(
    source_config: PreTrainedConfig, segment_lengths: list[int], dilation_rates: list[int]
) -> tuple[LongNetConfig, str, list[str], list[str]]:
    """LongNetConfig for a source config as transformers loaded it, its model type, what could not be
    carried over, and what was changed.

    Every entry LongNetConfig has is taken over as it is (rope_parameters with its scaling, dtype, token
    ids, ...); any other entry that changes the model is reported as dropped, never silently lost."""
    architectures = source_config.architectures or [
        name for name, kind in SUPPORTED.items() if kind == source_config.model_type
    ]
    if len(architectures) != 1 or architectures[0] not in SUPPORTED:
        fail(
            f"architecture {architectures or source_config.model_type} is not supported; "
            f"supported: {', '.join(SUPPORTED)}"
        )
    model_type = SUPPORTED[architectures[0]]
    values = source_config.to_dict()
    known = set(LongNetConfig().to_dict())
    fields = {name: value for name, value in values.items() if name in known and name not in NOT_CARRIED}
    dropped = [f"{name}={value!r}" for name, value in values.items() if name not in known | NOT_CARRIED | SOURCE_ONLY]
    if model_type == "qwen2":
        # Qwen2 has biases on q/k/v but not on o_proj; LongNet's attention_bias covers all four, so
        # o_proj gets a zero bias (the same function).
        fields["attention_bias"] = True
        if values.get("use_sliding_window"):
            dropped.append(f"sliding_window={values.get('sliding_window')} (use_sliding_window=True)")
    if model_type == "mistral" and values.get("sliding_window") is not None:
        dropped.append(f"sliding_window={values['sliding_window']}")
    if fields.pop("attention_dropout", 0):
        dropped.append(f"attention_dropout={values['attention_dropout']}")
    changed = drop_token_ids_outside_vocabulary(fields, fields["vocab_size"])
    try:
        config = LongNetConfig(**fields, segment_lengths=segment_lengths, dilation_rates=dilation_rates)
    except CONFIG_ERRORS as error:
        fail(str(error))
    config.architectures = ["LongNetForCausalLM"]
    config.auto_map = dict(AUTO_MAP)
    return config, model_type, dropped, changed


def drop_token_ids_outside_vocabulary(fields: dict, vocab_size: int) -> list[str]:
    """Sets special token ids outside the vocabulary (``pad_token_id: -1`` of many Llama checkpoints) to None,
    dropping them from an eos list; returns what changed. transformers only warns about such ids, and
    LongNetConfig refuses them; None is what they mean (no such token), with the same forward pass. Used
    for config.json and generation_config.json alike, so generation does not pad with an id the model
    lacks."""
    changed = []
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = fields.get(name)
        ids = value if isinstance(value, list) else [value]
        kept = [i for i in ids if i is None or 0 <= i < vocab_size]
        if kept != ids:
            fields[name] = kept if isinstance(value, list) and kept else None
            changed.append(f"{name}={value!r} -> {fields[name]!r} (outside the vocabulary)")
    return changed


def source_license(source: Path) -> dict[str, str] | None:
    """The license metadata of the source's model card (README.md), or None when it names none."""
    if not (source / "README.md").is_file():
        return None
    try:
        metadata = ModelCard.load(source / "README.md").data.to_dict()
    except (OSError, ValueError, yaml.YAMLError):
        return None
    names = ("license", "license_name", "license_link")
    return {name: metadata[name] for name in names if metadata.get(name)} if metadata.get("license") else None


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


def check_shards(shards: list[Path]) -> None:
    """Refuses a truncated or corrupt safetensors file before anything is written: opening one reads its
    header and checks that the file holds every tensor it lists."""
    for path in shards:
        if path.suffix == ".safetensors":
            try:
                with safe_open(path, framework="pt"):
                    pass
            except SafetensorError as error:
                fail(f"{path} is truncated or corrupt ({error}); download or copy it again")


def read_shard(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            with safe_open(path, framework="pt") as shard:
                return {name: shard.get_tensor(name) for name in shard.keys()}
        return torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        fail(f"{path} is truncated or corrupt ({str(error).splitlines()[0]}); download or copy it again")


def convert(args: argparse.Namespace) -> None:
    source, destination = Path(args.source), Path(args.destination)
    if not (source / "config.json").exists():
        fail(f"{source} has no config.json: it is not a transformers checkpoint folder")
    if destination.exists() and not destination.is_dir():
        fail(f"{destination} exists and is not a folder")
    if destination.exists() and any(destination.iterdir()):
        fail(f"{destination} exists and is not empty")
    try:
        check_branches(args.segment_lengths, args.dilation_rates)
    except ValueError as error:
        fail(f"--segment_lengths / --dilation_rates: {error}")
    try:
        source_config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        fail(f"{source / 'config.json'} does not load as a transformers config: {error}")
    config, model_type, dropped, changed = convert_config(source_config, args.segment_lengths, args.dilation_rates)
    shards = source_shards(source, args.allow_pytorch_bin)
    check_shards(shards)
    license = source_license(source)
    with write_folder(destination) as folder:
        tensor_count = write_weights(shards, folder, model_type, config.tie_word_embeddings)
        config.save_pretrained(folder)
        package = Path(longnet.__file__).parent
        for name in remote_code_files():
            shutil.copy(package / name, folder / name)
        for name in TOKENIZER_FILES:
            if (source / name).exists():
                shutil.copy(source / name, folder / name)
        generation_path = folder / "generation_config.json"
        if generation_path.exists():
            generation = json.loads(generation_path.read_text())
            if generation_changes := drop_token_ids_outside_vocabulary(generation, config.vocab_size):
                generation_path.write_text(json.dumps(generation, indent=2))
                changed += [f"generation_config.json {change}" for change in generation_changes]
        summary = {"converted from": str(source), "dropped": ", ".join(dropped) or "nothing"}
        if changed:
            summary["changed"] = ", ".join(changed)
        info = {
            "training_data": f"converted from {source.name} ({model_type}); not trained further",
            "parameters": tensor_count["parameters"],
            "license": license,
            "summary": summary,
        }
        (folder / "training_info.json").write_text(json.dumps(info, indent=1))
        card = render_model_card(ROOT / "model_cards" / "longnet.md", folder, repo_id=str(destination))
        (folder / "README.md").write_text(card)
    if not has_tokenizer(source):
        print(f"warning: no tokenizer files in {source}; the LongNet folder has none either", file=sys.stderr)
    print(
        f"converted {model_type} {source} -> {destination} ({tensor_count['tensors']} tensors, {len(shards)} shard(s))"
    )
    print(f"rope_parameters: {config.rope_parameters}")
    print("dropped: " + (", ".join(dropped) if dropped else "nothing"))
    if changed:
        print("changed: " + ", ".join(changed))
    if license:
        print(f"license: {', '.join(license.values())} (from {source / 'README.md'})")
    else:
        print(f"license: unknown ({source / 'README.md'} names none); give push_to_hub.py --license")


def write_weights(shards: list[Path], folder: Path, model_type: str, tie_word_embeddings: bool) -> dict[str, int]:
    """Streams the source shards into safetensors shards of the same grouping (an index when several);
    returns the tensor and parameter counts."""
    weight_map, total_size, parameters = {}, 0, 0
    for number, shard_path in enumerate(shards, start=1):
        tensors = read_shard(shard_path)
        if model_type == "qwen2":
            for name in [n for n in tensors if n.endswith("self_attn.o_proj.weight")]:
                tensors[name.replace(".weight", ".bias")] = torch.zeros(
                    tensors[name].shape[0], dtype=tensors[name].dtype
                )
        if tie_word_embeddings:
            tensors.pop("lm_head.weight", None)
        name = "model.safetensors" if len(shards) == 1 else f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, folder / name, metadata={"format": "pt"})
        weight_map.update({tensor_name: name for tensor_name in tensors})
        total_size += sum(t.numel() * t.element_size() for t in tensors.values())
        parameters += sum(t.numel() for t in tensors.values())
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return {"tensors": len(weight_map), "parameters": parameters}


def main(argv: list[str] | None = None) -> None:
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
    convert(parser.parse_args(argv))


if __name__ == "__main__":
    main()
