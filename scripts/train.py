"""Train or fine-tune a LongNet (or, with --attention dense, the same-size Llama) with the HF Trainer.

With no arguments it runs the project's main job: a small LongNet trained on the Python standard
library's own source files (4K-token contexts, about 10 minutes on 2 CPU cores), then perplexity by
context length on held-out files and a code completion from the reloaded folder.

    python scripts/train.py
    python scripts/train.py --train_file my_corpus/ --block_size 8192 --output_dir out --max_steps 1000
    python scripts/train.py --attention dense --output_dir outputs/llama-stdlib     # the baseline
    accelerate launch --num_processes 2 scripts/train.py ...                         # data parallel
    torchrun --nproc-per-node 4 scripts/train.py --sequence_parallel_size 2 ...      # 2 x 2: sequence x data

Every TrainingArguments flag works (--bf16, --gradient_accumulation_steps, --gradient_checkpointing,
--eval_steps, --save_steps, --resume_from_checkpoint, --report_to, ...).
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
    default_data_collator,
    pipeline,
    set_seed,
)

import longnet  # noqa: F401  (registers LongNet with the Auto classes)
from longnet import LongNetConfig, LongNetForCausalLM
from longnet.evaluation import evaluation_documents, perplexity_by_context, write_report
from longnet.hub import render_model_card
from longnet.sequence_parallel import check_split
from longnet.training import (
    SequenceParallelTrainer,
    expand_paths,
    load_documents,
    pack_documents,
    sequence_parallel_group,
    split_by_file,
    stdlib_python_files,
    train_tokenizer,
)

ROOT = Path(__file__).resolve().parents[1]


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
    segment_lengths: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048, 4096])
    dilation_rates: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
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
    validation_split_percentage: float = 5.0
    max_train_documents: int | None = None
    preprocessing_num_workers: int | None = None
    eval_context_lengths: list[int] = field(default_factory=lambda: [512, 1024, 2048, 4096, 8192, 16384])
    eval_max_documents: int = 4
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
    bf16: bool = True
    use_cpu: bool = not torch.cuda.is_available()  # bf16 on CPU needs it said
    dataloader_drop_last: bool = True
    sequence_parallel_size: int = field(
        default=1,
        metadata={
            "help": "Split each sequence across this many processes (consecutive ranks); the world size must be a "
            "multiple, and the groups train data parallel."
        },
    )


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = HfArgumentParser((ModelArguments, DataArguments, LongNetTrainingArguments))
    if len(argv) == 1 and argv[0].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(argv[0])
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(argv)
    check_arguments(model_args, data_args, training_args)
    set_seed(training_args.seed)
    output_dir = Path(training_args.output_dir)

    train_docs, validation_docs, data_description = load_data(data_args)
    tokenizer = get_tokenizer(model_args, training_args, train_docs)
    model = get_model(model_args, tokenizer, data_args.block_size)
    check_fit(model, tokenizer, data_args.block_size, training_args.sequence_parallel_size)

    with training_args.main_process_first(desc="packing"):
        train_blocks = pack_documents(train_docs, tokenizer, data_args.block_size, data_args.preprocessing_num_workers)
        validation_blocks = pack_documents(
            validation_docs, tokenizer, data_args.block_size, data_args.preprocessing_num_workers
        )
    if len(train_blocks) == 0:
        fail(f"the training data has fewer than block_size={data_args.block_size} tokens")
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
    else:
        trainer = Trainer(**trainer_kwargs)
    started = time.time()
    train_result = trainer.train(resume_from_checkpoint=resume_path(training_args))
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
        "command": "python scripts/train.py " + shlex.join(argv),
        "training_data": data_description,
        "datasets": [data_args.dataset_name] if data_args.dataset_name else [],
        "parameters": sum(p.numel() for p in model.parameters()),
        "summary": {
            "tokens per sequence": data_args.block_size,
            "processes": training_args.world_size,
            "sequence parallel size": training_args.sequence_parallel_size,
            "training sequences": len(train_blocks),
            "wall-clock seconds": round(time.time() - started),
        },
        "model_args": asdict(model_args),
    }
    (output_dir / "training_info.json").write_text(json.dumps(info, indent=1))
    evaluate_by_context(trainer.model, tokenizer, validation_docs, data_args, output_dir)
    (output_dir / "README.md").write_text(render_model_card(ROOT / "model_cards" / "longnet.md", output_dir))
    show_completion(output_dir, model_args.trust_remote_code)
    print(f"\nSaved to {output_dir.resolve()}:")
    for path in sorted(output_dir.iterdir()):
        print(f"  {path.name}")


def check_arguments(model_args, data_args, training_args) -> None:
    """Everything that can be checked before any data is read or model built."""
    if model_args.attention not in ("dilated", "dense"):
        fail(f"--attention must be 'dilated' or 'dense', got {model_args.attention!r}")
    for name in ("train_file", "validation_file"):
        for path in getattr(data_args, name) or []:
            if not Path(path).exists():
                fail(f"--{name} {path!r} does not exist")
    for name in ("model_name_or_path", "config_name", "tokenizer_name"):
        path = getattr(model_args, name)
        if path and not Path(path).exists() and (Path(path).is_absolute() or path.startswith(".")):
            fail(f"--{name} {path!r} does not exist")
    if data_args.block_size <= 1:
        fail(f"--block_size must be at least 2, got {data_args.block_size}")
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
        if data_args.train_file:
            files = expand_paths(data_args.train_file)
            description = f"{len(files)} local files ({', '.join(data_args.train_file)})"
        else:
            files = stdlib_python_files()
            version = f"{sys.version_info.major}.{sys.version_info.minor}"
            description = f"the Python {version} standard library's {len(files)} .py files"
        if data_args.validation_file:
            train_files, validation_files = files, expand_paths(data_args.validation_file)
        else:
            train_files, validation_files = split_by_file(files, data_args.validation_split_percentage)
        description += f", split by file: {len(train_files)} train / {len(validation_files)} validation"
        train = load_documents(train_files, data_args.text_column)
        validation = load_documents(validation_files, data_args.text_column)
    if data_args.max_train_documents is not None:
        train = train.select(range(min(data_args.max_train_documents, len(train))))
    return train, validation, description


def get_tokenizer(model_args, training_args, train_docs):
    name = model_args.tokenizer_name or model_args.model_name_or_path
    if name:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=model_args.trust_remote_code)
    # Trained once, by the main process; the others load what it saved.
    saved = Path(training_args.output_dir) / "tokenizer"
    with training_args.main_process_first(desc="tokenizer"):
        if (saved / "tokenizer.json").exists() and training_args.resume_from_checkpoint:
            return AutoTokenizer.from_pretrained(saved)
        if training_args.process_index == 0:
            tokenizer = train_tokenizer(iter(train_docs["text"]), model_args.vocab_size)
            tokenizer.save_pretrained(saved)
        return AutoTokenizer.from_pretrained(saved)


def get_model(model_args, tokenizer, block_size: int):
    if model_args.model_name_or_path:
        return AutoModelForCausalLM.from_pretrained(
            model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code
        )
    if model_args.config_name:
        path = Path(model_args.config_name)
        config = LongNetConfig.from_json_file(path) if path.is_file() else LongNetConfig.from_pretrained(path)
    else:
        config = LongNetConfig(
            vocab_size=len(tokenizer),
            hidden_size=model_args.hidden_size,
            intermediate_size=model_args.intermediate_size,
            num_hidden_layers=model_args.num_hidden_layers,
            num_attention_heads=model_args.num_attention_heads,
            num_key_value_heads=model_args.num_key_value_heads,
            max_position_embeddings=model_args.max_position_embeddings,
            segment_lengths=model_args.segment_lengths,
            dilation_rates=model_args.dilation_rates,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=True,
        )
    if model_args.attention == "dense":
        fields = config.to_dict()
        for name in ("segment_lengths", "dilation_rates", "model_type", "auto_map", "architectures"):
            fields.pop(name, None)
        return LlamaForCausalLM(LlamaConfig(**fields))
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


def evaluate_by_context(model, tokenizer, validation_docs, data_args, output_dir: Path) -> None:
    token_lists = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in validation_docs["text"]]
    try:
        documents, lengths = evaluation_documents(
            token_lists, data_args.eval_context_lengths, data_args.eval_max_documents
        )
    except ValueError as error:
        print(f"perplexity by context length skipped: {error}")
        return
    results = perplexity_by_context(model, documents, lengths, description="by context length")
    write_report(
        {"model": results},
        output_dir / "perplexity_by_context",
        title=f"Validation perplexity by context length ({type(model).__name__})",
        notes=f"{len(documents)} held-out documents of {lengths[-1]} tokens each, read in windows of each length; "
        f"trained with {data_args.block_size}-token sequences.",
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
