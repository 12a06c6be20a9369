"""Training causal LMs on long documents: corpus files, a tokenizer, packed blocks, a Trainer that
splits each sequence across processes and one that weighs pass-key answers.

Used by ``scripts/train.py`` and ``scripts/evaluate.py``; not needed to load or run a model.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NoReturn

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
import torch.distributed as dist
from huggingface_hub.errors import StrictDataclassError
from torch.utils.data import DataLoader, DistributedSampler
from transformers import PreTrainedTokenizerFast, Trainer

from .hub import has_tokenizer, redact

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".c", ".h", ".cpp", ".java", ".js", ".ts", ".go", ".rs"}
TABLE_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]
# What train.py saves of a run (its flags, for --resume_from_checkpoint and evaluate.py's held-out split) and
# the share of the files it holds out when given no --validation_file.
ARGUMENTS_FILE = "train_arguments.json"
DEFAULT_SPLIT_PERCENTAGE = 5.0


# What building a LongNetConfig from bad values raises: transformers' @strict validation wraps the
# ValueError that names the field in a StrictDataclassError.
CONFIG_ERRORS = (ValueError, StrictDataclassError)


def fail(message: str) -> NoReturn:
    """Stops a script with one ``error:`` line (secrets redacted) and exit code 2, as argparse does."""
    one_line = re.sub(r"\s*\n\s*", " ", message)
    print(f"error: {redact(one_line)}", file=sys.stderr)
    raise SystemExit(2)


def lacks_tokenizer(name: str) -> bool:
    """Whether ``name`` is a local folder without tokenizer files (a Hub id is not checked here)."""
    return Path(name).is_dir() and not has_tokenizer(name)


def stdlib_python_files() -> list[str]:
    """The Python standard library's own ``.py`` files (no third-party site-packages)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(
        str(path)
        for path in root.rglob("*.py")
        if not {"site-packages", "dist-packages", "__pycache__"} & set(path.relative_to(root).parts)
    )


def expand_paths(paths: Iterable[str]) -> list[str]:
    """Files named directly, plus the text, code and table files found under named folders.

    A text or code file that is not UTF-8 text (binary, or another encoding) is skipped with a warning:
    decoded anyway it would train on replacement characters."""
    paths = list(paths)
    files = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            files += sorted(
                str(p) for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES | set(TABLE_SUFFIXES)
            )
        elif path.is_file():
            files.append(str(path))
        else:
            raise FileNotFoundError(f"data path {name!r} does not exist")
    skipped = [f for f in files if Path(f).suffix not in TABLE_SUFFIXES and not _is_utf8_text(f)]
    if skipped:
        shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        print(f"warning: skipped {len(skipped)} file(s) that are not UTF-8 text: {shown}", file=sys.stderr)
        files = [f for f in files if f not in set(skipped)]
    if not files:
        suffixes = " ".join(sorted(TEXT_SUFFIXES | set(TABLE_SUFFIXES)))
        raise FileNotFoundError(f"no readable data files in {', '.join(paths)} (UTF-8 text or tables: {suffixes})")
    return files


def _is_utf8_text(file: str) -> bool:
    data = Path(file).read_bytes()
    if b"\0" in data:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def split_by_file(files: list[str], validation_percentage: float) -> tuple[list[str], list[str]]:
    """A deterministic train/validation split by file (a file's hash decides), so no document is in both.

    A split that leaves either side empty is refused, with the percentage that would hold out a file, rather
    than a file picked here: the user decides what is held out."""
    fraction = _hash_fractions(files)
    validation = [f for f in files if fraction[f] < validation_percentage / 100]
    train = [f for f in files if f not in set(validation)]
    given = f"--validation_split_percentage {validation_percentage:g}"
    if len(files) == 1:
        raise ValueError(
            f"one data file ({files[0]}) cannot be split by file into train and validation: pass --validation_file"
        )
    if not train:
        raise ValueError(
            f"{given} holds out all {len(files)} data files: pass --validation_file or a smaller percentage"
        )
    if not validation:
        needed = math.floor(min(fraction.values()) * 100) + 1
        raise ValueError(
            f"{given} holds out none of the {len(files)} data files (the split is by file): pass --validation_file, "
            f"or --validation_split_percentage {needed} or more"
        )
    return train, validation


def _hash_fractions(files: list[str]) -> dict[str, float]:
    """Each file's place in [0, 1), from its path below the files' common folder: the same files split the
    same way wherever they lie (the standard library of /usr/lib/python3.11 as of ~/.pyenv/.../python3.11)."""
    root = os.path.commonpath([os.path.abspath(f) for f in files]) if len(files) > 1 else ""
    fractions = {}
    for name in files:
        relative = os.path.relpath(os.path.abspath(name), root) if root else os.path.basename(name)
        digest = hashlib.sha1(relative.encode()).digest()
        fractions[name] = int.from_bytes(digest[:8], "big") / 2**64
    return fractions


def load_documents(files: list[str], text_column: str = "text") -> datasets.Dataset:
    """One example per document: a whole text/code file, or a row of a json/jsonl/parquet/csv file."""
    kinds = {TABLE_SUFFIXES.get(Path(f).suffix, "text"): f for f in files}
    if len(kinds) > 1:
        found = ", ".join(f"{kind} ({file})" for kind, file in sorted(kinds.items()))
        raise ValueError(f"a mix of file kinds: {found}; pass files of one kind (text/code, json, parquet or csv)")
    kind = next(iter(kinds))
    if kind == "text":
        # expand_paths has skipped non-UTF-8 files of the user's data; "replace" only reads the standard
        # library's few non-UTF-8 test files in the main job as its published results were made.
        dataset = datasets.load_dataset(
            "text", data_files=files, sample_by="document", split="train", encoding_errors="replace"
        )
    else:
        dataset = datasets.load_dataset(kind, data_files=files, split="train")
    if text_column not in dataset.column_names:
        raise ValueError(f"--text_column {text_column!r} is not a column of the data (columns: {dataset.column_names})")
    dataset = dataset.select_columns([text_column])
    if text_column != "text":
        dataset = dataset.rename_column(text_column, "text")
    return dataset.filter(lambda example: bool(example["text"] and example["text"].strip()))


def train_tokenizer(texts: Iterator[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text encodes; no unknown tokens), trained on ``texts``."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>", model_max_length=10**9
    )
    return tokenizer


def pack_documents(
    dataset: datasets.Dataset, tokenizer, block_size: int, num_proc: int | None = None
) -> datasets.Dataset:
    """Tokenizes documents and packs them into ``block_size`` blocks that never attend across documents.

    Each block has ``input_ids``, ``labels`` and ``position_ids``; ``position_ids`` restart at 0 where a
    document (or a block) starts, which LongNet and transformers' Llama both read as a document
    boundary, and the label of a document's first token is -100 (nothing before it predicts it).
    The documents run on back to back through the whole dataset: only the tokens after the last whole
    block are dropped (transformers' run_clm drops a remainder per 1,000 documents, which loses most of a
    corpus of short rows at LongNet's block sizes).
    """
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        return {"input_ids": [tokenizer(text, add_special_tokens=False)["input_ids"] + [eos] for text in batch["text"]]}

    documents = dataset.map(
        tokenize, batched=True, remove_columns=dataset.column_names, num_proc=num_proc, desc="Tokenizing"
    )
    rows = documents.with_format("arrow")  # slices as Arrow tables: no Python int per token
    lengths = pc.list_value_length(rows["input_ids"]).to_numpy() if len(documents) else np.zeros(0)
    ends = np.cumsum(lengths, dtype=np.int64)  # the stream position after each document
    begins = ends - lengths  # and where each one starts
    count = int(ends[-1]) // block_size if len(ends) else 0
    if not count:  # no block (datasets' map of no rows would drop the columns)
        column = datasets.Sequence(datasets.Value("int64"))
        features = datasets.Features({"input_ids": column, "labels": column, "position_ids": column})
        return datasets.Dataset.from_dict({name: [] for name in features}, features=features)

    def cut(batch):
        """Blocks ``batch["block"]`` (consecutive numbers) from the documents that hold their tokens."""
        begin, end = batch["block"][0] * block_size, (batch["block"][-1] + 1) * block_size
        first, last = np.searchsorted(ends, [begin, end - 1], side="right")
        stream_start = int(begins[first])
        tokens = pc.list_flatten(rows[int(first) : int(last) + 1]["input_ids"]).to_numpy().astype(np.int64)
        starts = np.zeros(len(tokens), dtype=bool)
        starts[begins[first : last + 1] - stream_start] = True
        window = slice(begin - stream_start, end - stream_start)
        tokens, starts = tokens[window].reshape(-1, block_size), starts[window].reshape(-1, block_size)
        starts[:, 0] = True  # a block starts a sequence too
        index = np.arange(block_size)
        positions = index - np.maximum.accumulate(np.where(starts, index, 0), axis=1)
        return {"input_ids": tokens, "labels": np.where(starts, -100, tokens), "position_ids": positions}

    per_batch = max(1, (1 << 20) // block_size)  # about a million tokens at a time, whatever the block size
    return datasets.Dataset.from_dict({"block": np.arange(count)}).map(
        cut,
        batched=True,
        batch_size=per_batch,
        writer_batch_size=per_batch,
        remove_columns=["block"],
        num_proc=num_proc,
        desc=f"Packing into blocks of {block_size}",
    )


def sequence_parallel_group(size: int):
    """This rank's group of ``size`` consecutive ranks: ranks ``[g*size, (g+1)*size)`` form group ``g``.

    Every rank must call this (each group is made by all ranks, in the same order). The world splits
    into ``world_size / size`` groups, which train data parallel.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    if size < 1 or world % size != 0:
        raise ValueError(f"sequence_parallel_size={size} must divide the number of processes ({world})")
    mine = None
    for start in range(0, world, size):
        group = dist.new_group(list(range(start, start + size)))
        if start <= rank < start + size:
            mine = group
    return mine


class _EpochDataLoader(DataLoader):
    """A DataLoader whose ``set_epoch`` (called by the Trainer) reshuffles its distributed sampler."""

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)


class SequenceParallelTrainer(Trainer):
    """A Trainer that runs each sequence split across the ranks of ``sequence_parallel_group``.

    The ranks of a group read the same batches (data is sharded over groups, not ranks, shuffled as
    the Trainer's own sampler does: the same order as a one-process run when there is one group).
    Each rank feeds its contiguous chunk of every sequence to ``LongNetForCausalLM`` with the group;
    the loss is the whole sequence's on every rank, and a group's gradient is the sum of its ranks'.
    DDP averages over all ``data_parallel * sequence_parallel`` ranks, so the backward pass is scaled
    by the group size: the update equals data parallel training on whole sequences.
    """

    def __init__(self, *args, sequence_parallel_group, **kwargs):
        super().__init__(*args, **kwargs)
        self.sequence_parallel_group = sequence_parallel_group
        self.sequence_parallel_size = dist.get_world_size(sequence_parallel_group)
        self.sequence_parallel_rank = dist.get_rank(sequence_parallel_group)
        self.loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean
        self.args.prediction_loss_only = True  # each rank holds logits of its chunk only

    def _group_loader(self, dataset, batch_size: int, shuffle: bool) -> DataLoader:
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        sampler = DistributedSampler(
            dataset,
            num_replicas=self.args.world_size // self.sequence_parallel_size,
            rank=self.args.process_index // self.sequence_parallel_size,
            shuffle=shuffle,
            seed=seed,
        )
        return _EpochDataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=self.data_collator,
            drop_last=self.args.dataloader_drop_last,
            num_workers=self.args.dataloader_num_workers,
        )

    def get_train_dataloader(self) -> DataLoader:
        return self._group_loader(self.train_dataset, self._train_batch_size, shuffle=True)

    def get_eval_dataloader(self, eval_dataset=None) -> DataLoader:
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        return self._group_loader(dataset, self.args.eval_batch_size, shuffle=False)

    def get_total_train_batch_size(self, args) -> int:
        return super().get_total_train_batch_size(args) // self.sequence_parallel_size

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        length = inputs["input_ids"].shape[1]
        chunk = length // self.sequence_parallel_size
        if chunk * self.sequence_parallel_size != length:
            raise ValueError(
                f"a sequence of {length} tokens does not split into {self.sequence_parallel_size} equal chunks"
            )
        part = slice(self.sequence_parallel_rank * chunk, (self.sequence_parallel_rank + 1) * chunk)
        outputs = model(
            input_ids=inputs["input_ids"][:, part],
            labels=inputs["labels"][:, part],
            use_cache=False,
            sequence_parallel_group=self.sequence_parallel_group,
        )
        # Same value; gradient times the group size (see the class docstring).
        loss = outputs.loss + (self.sequence_parallel_size - 1) * (outputs.loss - outputs.loss.detach())
        return (loss, outputs) if return_outputs else loss


class AnswerWeightedTrainer(Trainer):
    """A Trainer whose loss counts each pass-key answer token (``answer_mask`` of ``plant_passkeys``) as
    ``1 + answer_weight`` tokens: the weighted mean of the next-token cross-entropy over the batch.

    An answer is ~5 tokens of an episode's hundreds; with the plain language-modelling loss a small model
    learns retrieval far more slowly (docs/results/passkey.md). Blocks without ``answer_mask`` (evaluation)
    get the model's own loss.
    """

    def __init__(self, *args, answer_weight: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.answer_weight = answer_weight
        self.loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean
        self.args.remove_unused_columns = False  # keep answer_mask, which the model's forward does not take

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        answer_mask = inputs.pop("answer_mask", None)
        if answer_mask is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        targets, answers = labels[:, 1:], answer_mask[:, 1:]
        token_losses = torch.nn.functional.cross_entropy(
            outputs.logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none"
        )
        weights = (targets != -100) * (1 + self.answer_weight * answers)
        loss = (token_losses * weights.flatten()).sum() / weights.sum()
        return (loss, outputs) if return_outputs else loss
