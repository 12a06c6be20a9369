"""Train or fine-tune a LongNet (or, with --attention dense, the same-size Llama) with the HF Trainer.

With no arguments it runs the project's main job: a small LongNet trained on the Python standard
library's own source files (4K-token contexts, about 10 minutes on 2 CPU cores), then perplexity by
context length on held-out files and a code completion from the reloaded folder.

    python scripts/train.py
    python scripts/train.py --train_file my_corpus/ --block_size 8192 --output_dir out --max_steps 1000
    python scripts/train.py --attention dense --output_dir outputs/llama-stdlib     # the baseline
    accelerate launch --multi_gpu --num_processes 2 scripts/train.py ...             # data parallel
    torchrun --nproc-per-node 4 scripts/train.py --sequence_parallel_size 2 ...      # 2 x 2: sequence x data

Every TrainingArguments flag works (--bf16, --gradient_accumulation_steps, --gradient_checkpointing,
--eval_steps, --save_steps, --resume_from_checkpoint, --report_to, ...).

A run saves the flags it was given in OUTPUT_DIR/train_arguments.json; `--resume_from_checkpoint`
reads them back for every flag not given again (`python scripts/train.py --output_dir out
--resume_from_checkpoint last`) and refuses a flag that would change the data or the model. Secrets
(--hub_token, tokens, secret environment values) are never written or printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    LlamaForCausalLM,
    PretrainedConfig,
    Trainer,
    TrainingArguments,
    default_data_collator,
    pipeline,
    set_seed,
)

import longnet  # noqa: F401  (registers LongNet with the Auto classes)
from longnet import LongNetConfig, LongNetForCausalLM
from longnet.configuration_longnet import llama_config, load_longnet_config
from longnet.dilated_attention import check_branches
from longnet.evaluation import check_context_lengths, evaluation_documents, perplexity_by_context, write_report
from longnet.hub import TOKENIZER_VOCABULARY_FILES, is_secret_name, redact, redact_command_line, render_model_card
from longnet.machine import native_bf16
from longnet.passkey import FAR_WINDOW, plant_passkeys, planting_tokens
from longnet.sequence_parallel import check_split
from longnet.training import (
    ARGUMENTS_FILE,
    CONFIG_ERRORS,
    DEFAULT_SPLIT_PERCENTAGE,
    AnswerWeightedTrainer,
    SequenceParallelTrainer,
    expand_paths,
    fail,
    lacks_tokenizer,
    load_documents,
    pack_documents,
    sequence_parallel_group,
    split_by_file,
    stdlib_python_files,
    train_tokenizer,
)

ROOT = Path(__file__).resolve().parents[1]
# Where and how a run starts, not what it trains: never carried over to a resumed run.
NOT_CARRIED = {"output_dir", "resume_from_checkpoint", "overwrite_output_dir"}
# A model's size: with --model_name_or_path or --config_name these flags may only repeat the model's values.
SIZE_FLAGS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
)
# What decides the data a run reads (and in which order) and the model it builds: a resumed run must
# keep the first run's values.
RUN_DEFINING = [
    "model_name_or_path",
    "config_name",
    "tokenizer_name",
    "attention",
    "vocab_size",
    *SIZE_FLAGS,
    "segment_lengths",
    "dilation_rates",
    "rope_theta",
    "dataset_name",
    "dataset_config_name",
    "train_file",
    "validation_file",
    "text_column",
    "block_size",
    "validation_split_percentage",
    "max_train_documents",
    "document_boundaries",
    "passkey_share",
    "passkey_episodes",
    "passkey_boundary",
    "passkey_hop",
    "passkey_far",
    "passkey_far_window",
    "passkey_both_copies",
    "passkey_cut",
    "passkey_cut_between_copies",
    "seed",
    "data_seed",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "sequence_parallel_size",
]
PATH_ARGUMENTS = {"model_name_or_path", "config_name", "tokenizer_name", "train_file", "validation_file"}


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "A model folder to fine-tune."})
    config_name: str | None = field(default=None, metadata={"help": "A LongNetConfig JSON file or folder."})
    tokenizer_name: str | None = field(
        default=None,
        metadata={"help": "An AutoTokenizer path; without it a byte-level BPE is trained on the data."},
    )
    attention: str = field(
        default="dilated", metadata={"help": "dilated (LongNet) or dense (a Llama of the same size, SDPA)."}
    )
    vocab_size: int = field(default=4096, metadata={"help": "Vocabulary of a tokenizer trained here."})
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    max_position_embeddings: int = 32768
    segment_lengths: list[int] = field(
        default_factory=lambda: [256, 512, 1024, 2048, 4096],
        metadata={"help": "LongNet's branches; with --model_name_or_path they replace the model's (to fine-tune)."},
    )
    dilation_rates: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    rope_theta: float | None = field(
        default=None,
        metadata={
            "help": "RoPE's base (10000 unless given); with --model_name_or_path or --config_name it replaces "
            "theirs: a larger base keeps far tokens matchable, as Code Llama's 1e6 (docs/results/passkey.md)."
        },
    )
    trust_remote_code: bool = False


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "A Hub dataset (needs network)."})
    dataset_config_name: str | None = None
    train_file: list[str] | None = field(
        default=None, metadata={"help": "Files or folders (txt, code, json/jsonl, parquet, csv)."}
    )
    validation_file: list[str] | None = None
    text_column: str = "text"
    block_size: int = field(default=4096, metadata={"help": "Tokens per training sequence."})
    validation_split_percentage: float = DEFAULT_SPLIT_PERCENTAGE
    max_train_documents: int | None = None
    preprocessing_num_workers: int | None = None
    eval_context_lengths: list[int] = field(default_factory=lambda: [512, 1024, 2048, 4096, 8192, 16384])
    eval_max_documents: int = 4
    passkey_share: float = field(
        default=0.0,
        metadata={
            "help": "Share of training blocks that carry a pass key: a random 5-digit key at a random place and, "
            "at the block's end, the question and its answer (the retrieval recipe: docs/results/passkey.md)."
        },
    )
    passkey_episodes: int = field(
        default=1,
        metadata={
            "help": "Most pass keys per planted block: each is cut into 1, 2, 4, ... up to this many equal episodes "
            "(drawn at random), each with its own needle, question and answer, so training distances cover every scale."
        },
    )
    passkey_boundary: int = field(
        default=0,
        metadata={
            "help": "Shortest segment length w of the LongNet trained (0: off): half the planted answers then start "
            "at a multiple of w, a new segment, as after a prompt of a multiple of w tokens (docs/results/passkey.md)."
        },
    )
    passkey_hop: float = field(
        default=0.0,
        metadata={
            "help": "Share of planted episodes (LongNet only) whose needle lies where the answer's positions read no "
            "copy of the key in one attention step, so the model must learn to move it (docs/results/passkey.md)."
        },
    )
    passkey_far: float = field(
        default=0.0,
        metadata={
            "help": "Share of planted episodes whose needle lies in the first quarter of its slot and whose answer "
            "ends in the last: needles half to all of the slot back, which uniform places give rarely."
        },
    )
    passkey_far_window: float = field(
        default=FAR_WINDOW,
        metadata={
            "help": "The part of the slot at each end where far episodes put their needle (the first) and end (the "
            "last): 1/16 = 0.0625 trains the distances of a needle at the start of a prompt as long as the block."
        },
    )
    passkey_both_copies: float = field(
        default=0.0,
        metadata={
            "help": "Share of planted episodes (LongNet only) whose needle lies where the answer's positions read both "
            "key copies through a dilated branch, the read one parity learns worst; with --passkey_hop, at most 1."
        },
    )
    passkey_cut: float = field(
        default=0.0,
        metadata={
            "help": "Share of planted episodes whose needle a multiple of --passkey_boundary cuts in two, which a "
            "LongNet's direct read of both key copies fails on until trained on it (random places: once in W a gap)."
        },
    )
    passkey_cut_between_copies: float = field(
        default=0.0,
        metadata={
            "help": "Share of the --passkey_cut needles cut between the key's two copies (each whole on its side), "
            "the gap depth 25 % of a 2^k - 8 token prompt cuts, whose keys stay weakest when every gap is cut alike."
        },
    )
    passkey_answer_weight: float = field(
        default=0.0,
        metadata={"help": "Extra loss weight of planted keys' answer tokens (0: the plain language-modelling loss)."},
    )
    document_boundaries: bool | None = field(
        default=None,
        metadata={
            "help": "Keep packed documents apart (position_ids restart at each document; default). With "
            "false a block is one sequence (documents separated by EOS only), as sequence parallel training reads it."
        },
    )
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Allow writing into a non-empty output_dir."})


@dataclass
class LongNetTrainingArguments(TrainingArguments):
    """TrainingArguments with defaults for the embedded main job."""

    output_dir: str = "outputs/longnet-stdlib"
    max_steps: int = 250
    per_device_train_batch_size: int = 2
    per_device_eval_batch_size: int = 1
    learning_rate: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: float = 15
    lr_scheduler_type: str = "cosine"
    logging_steps: float = 5
    save_steps: float = 125
    save_total_limit: int | None = 2
    bf16: bool = field(
        default=False,
        metadata={
            "help": "bf16 mixed precision; without --bf16 and --fp16: on where the device trained on runs bf16 "
            "products in hardware (a CUDA GPU that supports them, a CPU with AMX or AVX512-BF16), off elsewhere "
            "(emulated: far slower than float32)"
        },
    )
    use_cpu: bool = not torch.cuda.is_available()  # bf16 on CPU needs it said
    dataloader_drop_last: bool = True
    sequence_parallel_size: int = field(
        default=1,
        metadata={
            "help": "Split each sequence across this many processes (consecutive ranks); the world size must be a "
            "multiple, and the groups train data parallel."
        },
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    # No abbreviations: a mistyped flag (--segment_length) is an error, not silently another flag.
    parser = HfArgumentParser((ModelArguments, DataArguments, LongNetTrainingArguments), allow_abbrev=False)
    parser.error = fail  # an unknown flag or bad value: one line, not a usage of every TrainingArguments flag
    given = given_arguments(parser, argv)
    model_args, data_args, training_args = build_arguments(parser, given)
    if training_args.resume_from_checkpoint:
        given = with_first_run_arguments(parser, given, training_args)
        model_args, data_args, training_args = build_arguments(parser, given)
    keep_token_out_of_files(training_args)
    check_arguments(model_args, data_args, training_args)
    if "bf16" not in given and not training_args.fp16:
        native = "run in hardware" if training_args.bf16 else "would be emulated, far slower than float32"
        print(f"precision: {precision(training_args)} (bf16 products {native} here; --bf16 true|false chooses)")
    checkpoint = resume_path(training_args)
    set_seed(training_args.seed)
    output_dir = Path(training_args.output_dir)

    train_docs, validation_docs, data_description = load_data(data_args)
    tokenizer = get_tokenizer(model_args, training_args, train_docs, checkpoint)
    model = get_model(model_args, tokenizer, given)
    check_fit(model, tokenizer, data_args.block_size, training_args.sequence_parallel_size)
    for name in ("passkey_hop", "passkey_both_copies"):
        if getattr(data_args, name) and not getattr(model.config, "segment_lengths", None):
            fail(f"--{name} needs a LongNet: a {model.config.model_type} model reads every copy of the key directly")
    if data_args.passkey_share and data_args.block_size < planting_tokens(tokenizer) + 1:
        fail(
            f"--block_size {data_args.block_size} is too short to plant pass keys (the needle, the question and "
            f"the answer take up to {planting_tokens(tokenizer)} tokens)"
        )

    with training_args.main_process_first(desc="packing"):
        train_blocks = pack_documents(train_docs, tokenizer, data_args.block_size, data_args.preprocessing_num_workers)
        validation_blocks = pack_documents(
            validation_docs, tokenizer, data_args.block_size, data_args.preprocessing_num_workers
        )
    check_batches(len(train_blocks), data_args.block_size, training_args)
    if data_args.passkey_share:
        train_blocks = plant_passkeys(
            train_blocks,
            tokenizer,
            data_args.passkey_share,
            training_args.seed,
            data_args.passkey_episodes,
            data_args.passkey_boundary,
            data_args.passkey_hop,
            model.config,
            far=data_args.passkey_far,
            far_window=data_args.passkey_far_window,
            both_copies=data_args.passkey_both_copies,
            cut=data_args.passkey_cut,
            cut_between_copies=data_args.passkey_cut_between_copies,
        )
        if not data_args.passkey_answer_weight:
            train_blocks = train_blocks.remove_columns("answer_mask")
    if training_args.process_index == 0:
        save_arguments(given, output_dir)
    if not data_args.document_boundaries:
        train_blocks, validation_blocks = (b.remove_columns("position_ids") for b in (train_blocks, validation_blocks))

    # Without a cache, transformers' Llama reads restarting position_ids as packed documents, as
    # LongNet always does; both models are trained with use_cache=False.
    model.config.use_cache = False
    trainer_kwargs = dict(
        model=model,
        args=training_args,
        train_dataset=train_blocks,
        eval_dataset=validation_blocks if len(validation_blocks) else None,
        data_collator=default_data_collator,
        processing_class=tokenizer,
    )
    if training_args.sequence_parallel_size > 1:
        group = sequence_parallel_group(training_args.sequence_parallel_size)
        trainer = SequenceParallelTrainer(**trainer_kwargs, sequence_parallel_group=group)
    elif data_args.passkey_answer_weight:
        trainer = AnswerWeightedTrainer(**trainer_kwargs, answer_weight=data_args.passkey_answer_weight)
    else:
        trainer = Trainer(**trainer_kwargs)
    started = time.time()
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    model.config.use_cache = True
    trainer.save_model()
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    if trainer.eval_dataset is not None:
        eval_metrics = trainer.evaluate()
        eval_metrics["eval_perplexity"] = float(torch.exp(torch.tensor(eval_metrics["eval_loss"])))
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
    if not trainer.is_world_process_zero():
        return

    info = {
        "command": "python scripts/train.py " + shlex.join(redact_command_line(argv)),
        "training_data": data_description,
        "datasets": [data_args.dataset_name] if data_args.dataset_name else [],
        "parameters": sum(p.numel() for p in model.parameters()),
        "summary": {
            "tokens per sequence": data_args.block_size,
            "processes": training_args.world_size,
            "sequence parallel size": training_args.sequence_parallel_size,
            "training sequences": len(train_blocks),
            "wall-clock seconds": round(time.time() - started),
            "precision": precision(training_args),
        },
        "model_args": asdict(model_args),
    }
    (output_dir / "training_info.json").write_text(redact(json.dumps(info, indent=1)))
    evaluate_by_context(trainer.model, tokenizer, validation_docs, data_args, output_dir)
    if model.config.model_type == "longnet":  # the card describes LongNet; a dense baseline gets none
        (output_dir / "README.md").write_text(render_model_card(ROOT / "model_cards" / "longnet.md", output_dir))
    show_completion(output_dir, model_args.trust_remote_code)
    print(f"\nSaved to {output_dir.resolve()}:")
    for path in sorted(output_dir.iterdir()):
        print(f"  {path.name}")


def given_arguments(parser: HfArgumentParser, argv: list[str]) -> dict:
    """The flags given on the command line (or in a JSON file), parsed, without the defaults filled in.

    argparse fills in a default only where the namespace it is handed lacks the name, so a namespace
    holding a marker for every field keeps the marker wherever no flag was given."""
    if len(argv) == 1 and argv[0].endswith(".json"):
        return json.loads(Path(argv[0]).read_text())
    unset = object()
    names = [f.name for kind in parser.dataclass_types for f in dataclasses.fields(kind) if f.init]
    namespace = parser.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(names, unset)))
    return {name: value for name, value in vars(namespace).items() if value is not unset}


def build_arguments(parser: HfArgumentParser, given: dict) -> tuple:
    """The three argument dataclasses; a value they reject is an error line, not a traceback."""
    try:
        return parser.parse_dict(with_default_precision(given))
    except (TypeError, ValueError) as error:
        fail(str(error))


def with_default_precision(given: dict) -> dict:
    """``given`` with bf16 decided for the device trained on (the CPU with --use_cpu) when neither --bf16
    nor --fp16 was given: on where bf16 products run in hardware, off where they would be emulated."""
    if "bf16" in given or given.get("fp16"):
        return given
    on_cpu = given.get("use_cpu", LongNetTrainingArguments.use_cpu)
    return {**given, "bf16": native_bf16("cpu" if on_cpu else None)}


def with_first_run_arguments(parser: HfArgumentParser, given: dict, training_args) -> dict:
    """``given`` completed with the flags of the run being resumed, saved in its output_dir.

    A flag given again with a value that changes the data or the model (RUN_DEFINING) is refused: the
    checkpoint would be trained on other data, or not load at all."""
    saved_file = Path(training_args.output_dir) / ARGUMENTS_FILE
    if not saved_file.exists():
        print(f"warning: no {saved_file}: resuming with this command line's flags only", file=sys.stderr)
        return given
    saved = json.loads(saved_file.read_text())
    merged = {**saved, **given}
    first, resumed = run_identity(*build_arguments(parser, saved)), run_identity(*build_arguments(parser, merged))
    differing = [
        f"--{name} {resumed[name]} (first run: {first[name]})" for name in RUN_DEFINING if first[name] != resumed[name]
    ]
    if differing:
        fail(
            f"--resume_from_checkpoint: {', '.join(differing)} would change the data or the model of the run saved in "
            f"{saved_file}; leave them out to reuse the first run's values, or start a new run in another --output_dir"
        )
    reused = sorted(set(saved) - set(given))
    if reused and training_args.process_index == 0:
        print(f"resuming with the first run's {' '.join('--' + name for name in reused)} (from {saved_file})")
    return merged


def run_identity(model_args, data_args, training_args) -> dict:
    """The RUN_DEFINING values, with paths resolved and defaults decided, so that equal runs compare equal."""
    values = {}
    for name in RUN_DEFINING:
        value = next(getattr(args, name) for args in (model_args, data_args, training_args) if hasattr(args, name))
        if name in PATH_ARGUMENTS and value:
            value = [str(Path(v).resolve()) for v in value] if isinstance(value, list) else str(Path(value).resolve())
        values[name] = value
    if values["document_boundaries"] is None:  # as check_sequence_parallel decides it
        values["document_boundaries"] = training_args.sequence_parallel_size == 1
    return values


def precision(training_args) -> str:
    return "bf16 mixed" if training_args.bf16 else "fp16 mixed" if training_args.fp16 else "float32"


def save_arguments(given: dict, output_dir: Path) -> None:
    """Saves the flags of this run (secrets left out) for a later --resume_from_checkpoint."""
    kept = {name: value for name, value in given.items() if name not in NOT_CARRIED and not is_secret_name(name)}
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / ARGUMENTS_FILE).write_text(redact(json.dumps(kept, indent=1)))


def keep_token_out_of_files(training_args) -> None:
    """Moves --hub_token into this process's HF_TOKEN, where the Hub client reads it: the Trainer pickles its
    arguments into every checkpoint (training_args.bin), and a token must never be written to a file."""
    if training_args.hub_token:
        os.environ["HF_TOKEN"] = training_args.hub_token
        training_args.hub_token = None


def check_arguments(model_args, data_args, training_args) -> None:
    """Everything that can be checked before any data is read or model built."""
    if model_args.attention not in ("dilated", "dense"):
        fail(f"--attention must be 'dilated' or 'dense', got {model_args.attention!r}")
    if model_args.rope_theta is not None and not model_args.rope_theta > 0:
        fail(f"--rope_theta must be above 0, got {model_args.rope_theta}")
    if not 0 <= data_args.passkey_share <= 1:
        fail(f"--passkey_share must be between 0 and 1, got {data_args.passkey_share}")
    if data_args.passkey_episodes < 1:
        fail(f"--passkey_episodes must be at least 1, got {data_args.passkey_episodes}")
    if data_args.passkey_boundary < 0:
        fail(f"--passkey_boundary must be 0 (off) or a segment length, got {data_args.passkey_boundary}")
    if data_args.passkey_share and data_args.passkey_boundary >= data_args.block_size:
        fail(
            f"--passkey_boundary {data_args.passkey_boundary} leaves no boundary inside a block of --block_size "
            f"{data_args.block_size}: no answer would start on one"
        )
    for name in ("passkey_hop", "passkey_far", "passkey_both_copies", "passkey_cut", "passkey_cut_between_copies"):
        if not 0 <= getattr(data_args, name) <= 1:
            fail(f"--{name} must be between 0 and 1, got {getattr(data_args, name)}")
    if data_args.passkey_hop + data_args.passkey_both_copies > 1:
        fail(
            "--passkey_hop and --passkey_both_copies are shares of the episodes: together at most 1, got "
            f"{data_args.passkey_hop + data_args.passkey_both_copies}"
        )
    if not 0 < data_args.passkey_far_window <= 0.5:
        fail(f"--passkey_far_window must be above 0 and at most 0.5, got {data_args.passkey_far_window}")
    if data_args.passkey_far_window != FAR_WINDOW and not data_args.passkey_far:
        fail("--passkey_far_window needs --passkey_far above 0 (no episode is far)")
    if data_args.passkey_answer_weight < 0:
        fail(f"--passkey_answer_weight must be at least 0, got {data_args.passkey_answer_weight}")
    if not data_args.passkey_share:
        for name, given in (
            ("passkey_episodes", data_args.passkey_episodes != 1),
            ("passkey_boundary", data_args.passkey_boundary),
            ("passkey_hop", data_args.passkey_hop),
            ("passkey_far", data_args.passkey_far),
            ("passkey_both_copies", data_args.passkey_both_copies),
            ("passkey_cut", data_args.passkey_cut),
            ("passkey_answer_weight", data_args.passkey_answer_weight),
        ):
            if given:
                fail(f"--{name} needs --passkey_share above 0 (no block carries a pass key)")
    if data_args.passkey_cut and not data_args.passkey_boundary:
        fail("--passkey_cut needs --passkey_boundary (the shortest segment length, whose multiples cut the needle)")
    if data_args.passkey_cut_between_copies and not data_args.passkey_cut:
        fail("--passkey_cut_between_copies needs --passkey_cut above 0 (it is a share of the cut needles)")
    if data_args.passkey_answer_weight and training_args.sequence_parallel_size > 1:
        fail("--passkey_answer_weight does not work with --sequence_parallel_size above 1 (each rank sees a chunk)")
    for name in ("train_file", "validation_file"):
        if data_args.dataset_name and getattr(data_args, name):
            fail(f"--dataset_name and --{name} are two sources of data: give one")
        for path in getattr(data_args, name) or []:
            if not Path(path).exists():
                fail(f"--{name} {path!r} does not exist")
    for name in ("model_name_or_path", "config_name", "tokenizer_name"):
        path = getattr(model_args, name)
        if path and not Path(path).exists() and (Path(path).is_absolute() or path.startswith(".")):
            fail(f"--{name} {path!r} does not exist")
    tokenizer_source = model_args.tokenizer_name or model_args.model_name_or_path
    if tokenizer_source and lacks_tokenizer(tokenizer_source):
        name = "tokenizer_name" if model_args.tokenizer_name else "model_name_or_path"
        fail(
            f"--{name} {tokenizer_source!r} has no tokenizer (none of {', '.join(TOKENIZER_VOCABULARY_FILES)}); "
            "pass --tokenizer_name with the folder of the tokenizer to use"
        )
    if data_args.block_size <= 1:
        fail(f"--block_size must be at least 2, got {data_args.block_size}")
    if not (model_args.model_name_or_path or model_args.config_name):  # else checked against the model's
        check_branch_flags(model_args.segment_lengths, model_args.dilation_rates)
    try:
        check_context_lengths(data_args.eval_context_lengths, "--eval_context_lengths")
    except ValueError as error:
        fail(str(error))
    if data_args.eval_max_documents < 1:
        fail(f"--eval_max_documents must be at least 1, got {data_args.eval_max_documents}")
    if not (model_args.model_name_or_path or model_args.config_name):
        try:  # the model's shape, before any tokenizer is trained (the vocabulary size comes later)
            config_from_flags(model_args, model_args.vocab_size)
        except CONFIG_ERRORS as error:
            fail(f"model size flags (--hidden_size, --num_attention_heads, ...): {error}")
    check_sequence_parallel(model_args, data_args, training_args)
    output_dir = Path(training_args.output_dir)
    if (
        output_dir.is_dir()
        and any(output_dir.iterdir())
        and not data_args.overwrite_output_dir
        and not training_args.resume_from_checkpoint
    ):
        fail(
            f"output_dir {str(output_dir)!r} exists and is not empty; pass --overwrite_output_dir to write into it "
            "or --resume_from_checkpoint to continue a run"
        )


def check_sequence_parallel(model_args, data_args, training_args) -> None:
    """Sequence parallel runs need a LongNet, whole-block sequences and a world the groups divide."""
    size = training_args.sequence_parallel_size
    if size < 1:
        fail(f"--sequence_parallel_size must be at least 1, got {size}")
    if size == 1:
        data_args.document_boundaries = data_args.document_boundaries is not False
        return
    if model_args.attention != "dilated":
        fail("--sequence_parallel_size needs --attention dilated (LongNet); the dense baseline has no sequence split")
    if data_args.document_boundaries:
        fail(
            "--sequence_parallel_size reads each block as one sequence; it cannot keep packed documents apart "
            "(leave out --document_boundaries or pass false)"
        )
    data_args.document_boundaries = False
    if training_args.world_size % size != 0:
        fail(f"--sequence_parallel_size {size} must divide the number of processes ({training_args.world_size})")
    if data_args.block_size % size != 0:
        fail(f"--block_size {data_args.block_size} must be a multiple of --sequence_parallel_size {size}")


def resume_path(training_args) -> str | None:
    """--resume_from_checkpoint takes a checkpoint folder, or True/last for the newest in output_dir."""
    value = training_args.resume_from_checkpoint
    if value is None:
        return None
    if str(value).lower() in ("true", "last"):
        last = last_complete_checkpoint(Path(training_args.output_dir))
        if last is None:
            fail(f"no checkpoint in {training_args.output_dir!r} to resume from")
        return last
    if not Path(value).is_dir():
        fail(f"--resume_from_checkpoint {value!r} is not a folder")
    return value


def last_complete_checkpoint(output_dir: Path) -> str | None:
    """The newest checkpoint whose trainer_state.json, which the Trainer writes last, is complete.

    A run killed while saving leaves a partial checkpoint behind; resuming from it would fail."""
    checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[-1]), reverse=True)
    for checkpoint in checkpoints:
        try:
            json.loads((checkpoint / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        return str(checkpoint)
    return None


def load_data(data_args) -> tuple[datasets.Dataset, datasets.Dataset, str]:
    """Train and validation documents (one example per document, column "text")."""
    if data_args.dataset_name:
        loaded = datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name)
        train = loaded["train"]
        if "validation" in loaded:
            validation = loaded["validation"]
        else:
            parts = train.train_test_split(test_size=data_args.validation_split_percentage / 100, seed=0)
            train, validation = parts["train"], parts["test"]
        if data_args.text_column not in train.column_names:
            fail(f"--text_column {data_args.text_column!r} not in {train.column_names}")
        train = train.select_columns([data_args.text_column]).rename_column(data_args.text_column, "text")
        validation = validation.select_columns([data_args.text_column]).rename_column(data_args.text_column, "text")
        description = f"the Hub dataset {data_args.dataset_name}"
    else:
        try:
            train, validation, description = local_documents(data_args)
        except (OSError, ValueError) as error:  # no readable file, an empty split, a missing column, mixed kinds
            fail(str(error))
    if data_args.max_train_documents is not None:
        train = train.select(range(min(data_args.max_train_documents, len(train))))
    return train, validation, description


def local_documents(data_args) -> tuple[datasets.Dataset, datasets.Dataset, str]:
    """Train and validation documents from --train_file (default: the standard library) and --validation_file."""
    if data_args.train_file:
        files = expand_paths(data_args.train_file)
        description = f"{len(files)} local files ({', '.join(data_args.train_file)})"
    else:
        files = stdlib_python_files()
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        description = f"the Python {version} standard library's {len(files)} .py files"
    if data_args.validation_file:
        train_files, validation_files = files, expand_paths(data_args.validation_file)
        description += f", validation: {len(validation_files)} files ({', '.join(data_args.validation_file)})"
    else:
        train_files, validation_files = split_by_file(files, data_args.validation_split_percentage)
        description += f", split by file: {len(train_files)} train / {len(validation_files)} validation"
    train = load_documents(train_files, data_args.text_column)
    validation = load_documents(validation_files, data_args.text_column)
    return train, validation, description


def get_tokenizer(model_args, training_args, train_docs, checkpoint: str | None):
    """The named tokenizer, the resumed checkpoint's, or one trained on the data.

    A trained one is trained by the main process and handed to the others in memory, so nothing is
    written before the run's checks pass; the Trainer saves it with every checkpoint and the model."""
    name = model_args.tokenizer_name or model_args.model_name_or_path or checkpoint
    if name:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=model_args.trust_remote_code)
    tokenizer = [None]
    if training_args.process_index == 0:
        tokenizer = [train_tokenizer(iter(train_docs["text"]), model_args.vocab_size)]
    if training_args.world_size > 1:
        torch.distributed.broadcast_object_list(tokenizer, src=0)
    return tokenizer[0]


def config_from_flags(model_args, vocab_size: int, **fields) -> LongNetConfig:
    """The LongNetConfig the size and branch flags describe (raises one of CONFIG_ERRORS for a shape it
    refuses)."""
    return LongNetConfig(
        vocab_size=vocab_size,
        hidden_size=model_args.hidden_size,
        intermediate_size=model_args.intermediate_size,
        num_hidden_layers=model_args.num_hidden_layers,
        num_attention_heads=model_args.num_attention_heads,
        num_key_value_heads=model_args.num_key_value_heads,
        max_position_embeddings=model_args.max_position_embeddings,
        segment_lengths=model_args.segment_lengths,
        dilation_rates=model_args.dilation_rates,
        **fields,
    )


def check_branch_flags(segment_lengths: list[int], dilation_rates: list[int]) -> None:
    try:
        check_branches(segment_lengths, dilation_rates)
    except ValueError as error:
        branches = " ".join(map(str, segment_lengths)), " ".join(map(str, dilation_rates))
        fail(f"--segment_lengths {branches[0]} --dilation_rates {branches[1]}: {error}")


def source_config(model_args, given: dict) -> PretrainedConfig:
    """The config of --model_name_or_path or --config_name, with the branches that --segment_lengths and
    --dilation_rates name: a LongNet's weights do not depend on its branches, so fine-tuning with others (a
    longer largest segment for longer contexts, say) is a change the flags make. A size flag or --attention
    that disagrees with the model stops the run instead of being silently ignored."""
    flag = "model_name_or_path" if model_args.model_name_or_path else "config_name"
    source = getattr(model_args, flag)
    if model_args.model_name_or_path:
        config = AutoConfig.from_pretrained(source, trust_remote_code=model_args.trust_remote_code)
        kind = "dilated" if config.model_type == "longnet" else "dense"
        if given.get("attention", kind) != kind:
            fail(f"--attention {given['attention']}: --model_name_or_path {source!r} is a {config.model_type} model")
    else:
        try:
            config = load_longnet_config(source)
        except (OSError, ValueError) as error:
            fail(f"--config_name: {error}")
    for name in SIZE_FLAGS:
        if name in given and given[name] != getattr(config, name, None):
            fail(
                f"--{name} {given[name]} differs from the {getattr(config, name, None)} of --{flag} {source!r} "
                "(the model's size comes from it)"
            )
    branches = {name: given[name] for name in ("segment_lengths", "dilation_rates") if name in given}
    if branches:
        if config.model_type != "longnet":
            fail(f"--segment_lengths and --dilation_rates set a LongNet's branches: {source!r} is {config.model_type}")
        check_branch_flags(
            branches.get("segment_lengths", config.segment_lengths),
            branches.get("dilation_rates", config.dilation_rates),
        )
        for name, value in branches.items():
            setattr(config, name, list(value))
    return config


def get_model(model_args, tokenizer, given: dict):
    """The model to train. --rope_theta replaces the RoPE base of any config (no weight depends on it): a
    larger base for a longer context is a fine-tuning change, as Code Llama made it."""
    if model_args.model_name_or_path or model_args.config_name:
        config = source_config(model_args, given)
    else:
        config = config_from_flags(
            model_args,
            len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=True,
        )
    if model_args.rope_theta:
        config.rope_parameters = {**config.rope_parameters, "rope_theta": model_args.rope_theta}
    if model_args.model_name_or_path:
        return AutoModelForCausalLM.from_pretrained(
            model_args.model_name_or_path, config=config, trust_remote_code=model_args.trust_remote_code
        )
    if model_args.attention == "dense":
        return LlamaForCausalLM(llama_config(config))
    return LongNetForCausalLM(config)


def check_fit(model, tokenizer, block_size: int, sequence_parallel_size: int) -> None:
    if sequence_parallel_size > 1:
        if not isinstance(model, LongNetForCausalLM):
            fail(f"--sequence_parallel_size needs a LongNetForCausalLM, got {type(model).__name__}")
        branches = list(zip(model.config.segment_lengths, model.config.dilation_rates, strict=True))
        chunk = block_size // sequence_parallel_size
        try:
            check_split(branches, chunk, [chunk])
        except ValueError as error:
            fail(f"--block_size {block_size} over {sequence_parallel_size} processes: {error}")
    if len(tokenizer) > model.config.vocab_size:
        fail(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {model.config.vocab_size}")
    if block_size > model.config.max_position_embeddings:
        fail(
            f"--block_size {block_size} is larger than the model supports "
            f"(max_position_embeddings={model.config.max_position_embeddings})"
        )


def check_batches(blocks: int, block_size: int, training_args) -> None:
    """Refuses a run that would make no optimizer step (and save an untrained model as if trained): with
    dataloader_drop_last only a full batch on every data parallel process counts."""
    processes = training_args.world_size // training_args.sequence_parallel_size
    batch = training_args.per_device_train_batch_size
    needed = batch * processes if training_args.dataloader_drop_last else 1
    if blocks >= needed:
        return
    made = f"the training data makes {blocks} block{'s' if blocks != 1 else ''} of {block_size} tokens (--block_size)"
    if blocks == 0 or not training_args.dataloader_drop_last:
        fail(f"{made}: nothing would be trained; add data or lower --block_size")
    fail(
        f"{made}, but one batch takes {needed} (--per_device_train_batch_size {batch} x {processes} data parallel "
        f"process{'es' if processes != 1 else ''}) and --dataloader_drop_last drops a partial one: nothing would be "
        "trained; add data, lower --block_size or --per_device_train_batch_size, or pass --dataloader_drop_last false"
    )


def evaluate_by_context(model, tokenizer, validation_docs, data_args, output_dir: Path) -> None:
    token_lists = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in validation_docs["text"]]
    try:
        documents, lengths, skipped = evaluation_documents(
            token_lists, data_args.eval_context_lengths, data_args.eval_max_documents
        )
    except ValueError as error:
        print(f"perplexity by context length skipped: {error}")
        return
    if skipped:
        print(skipped)
    results = perplexity_by_context(model, documents, lengths, description="by context length")
    write_report(
        {"model": results},
        output_dir / "perplexity_by_context",
        title=f"Validation perplexity by context length ({type(model).__name__})",
        notes=f"{len(documents)} held-out documents of {lengths[-1]} tokens each, read in windows of each length; "
        f"trained with {data_args.block_size}-token sequences. {skipped}".strip(),
    )
    print("\nValidation perplexity by context length:")
    print(f"{'context':>8} {'perplexity':>11}")
    for length, value in results.items():
        print(f"{length:>8} {value:>11.2f}")


def show_completion(output_dir: Path, trust_remote_code: bool) -> None:
    model = AutoModelForCausalLM.from_pretrained(output_dir, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(output_dir, trust_remote_code=trust_remote_code)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    prompt = "def read_config(path):\n    "
    text = generator(prompt, max_new_tokens=48, do_sample=False)[0]["generated_text"]
    print("\nCompletion from the reloaded folder (greedy):\n" + "-" * 60 + f"\n{text}\n" + "-" * 60)


if __name__ == "__main__":
    main()
