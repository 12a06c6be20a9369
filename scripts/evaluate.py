"""Causal LM folders (LongNet or dense) side by side: perplexity by context length, or pass key retrieval.

``--task perplexity`` (the default): every model is scored on the same held-out documents at every
length, read in independent windows of that length. Writes ``{out}.md`` (table), ``{out}.json`` and
``{out}.png`` (plot). A length longer than every document is skipped, and the output and the table's
notes say so.

``--task passkey``: a random 5-digit key planted in held-out text at each depth, asked for at the end,
over a grid of context lengths x depths, ``--keys_per_cell`` keys a cell (``longnet.passkey``). Writes
``{out}/passkey.json``, ``{out}/passkey.md`` and a heatmap ``{out}/passkey_<name>.png`` per model.

``--task branches`` (LongNet models): which branches carry retrieval. On ``--keys_per_cell`` pass key
prompts of each length (needles at random depths), teacher-forced accuracy of the key's first token with
every branch, each branch left out and the local branch alone, by whether the needle is in the question's
local segment (``longnet.passkey.retrieval_by_branch``). Writes ``{out}/branches.md`` and ``.json``.

``--task tokens`` (any model): which tokens of the key a model gets. On ``--keys_per_cell`` prompts of
each length, teacher-forced accuracy of the key's first and later tokens by how many of the needle's two
copies of each the predicting position reads in one attention step: a dilated branch joins one residue
class only (``longnet.passkey.retrieval_by_token``); the later tokens also by the predicting position's
parity (an r = 2 branch serves the two with disjoint heads). Writes ``{out}/tokens.md`` and ``.json``.

    python scripts/evaluate.py outputs/longnet-stdlib outputs/llama-stdlib --out docs/results/stdlib_perplexity
    python scripts/evaluate.py MODEL --validation_file held_out/ --context_lengths 1024 4096 16384
    python scripts/evaluate.py MODEL OTHER --task passkey --lengths 1024 4096 --depths 0 50 100 --out results/
    python scripts/evaluate.py MODEL --task branches --lengths 1024 --keys_per_cell 100 --out results/
    python scripts/evaluate.py MODEL OTHER --task tokens --lengths 4096 --keys_per_cell 200 --out results/
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import longnet  # noqa: F401  (registers LongNet with the Auto classes)
from longnet.evaluation import check_context_lengths, evaluation_documents, perplexity_by_context, write_report
from longnet.hub import TOKENIZER_VOCABULARY_FILES
from longnet.passkey import (
    PLACES,
    answer_reach,
    check_grid,
    needle_and_question_tokens,
    passkey_accuracy,
    retrieval_by_branch,
    retrieval_by_token,
    write_passkey_report,
)
from longnet.training import (
    ARGUMENTS_FILE,
    DEFAULT_SPLIT_PERCENTAGE,
    expand_paths,
    fail,
    lacks_tokenizer,
    load_documents,
    split_by_file,
    stdlib_python_files,
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="model folders")
    parser.add_argument("--names", nargs="+", help="column names (default: folder names)")
    parser.add_argument(
        "--validation_file",
        nargs="+",
        help="files or folders; default: the held-out standard library files of the main job's split",
    )
    parser.add_argument(
        "--validation_split_percentage",
        type=float,
        help="the standard library split to score on (default: the one the models held out in training, from "
        "their train_arguments.json; else 5)",
    )
    parser.add_argument("--text_column", default="text")
    parser.add_argument("--context_lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--max_documents", type=int, default=4)
    parser.add_argument("--tokenizer_name", help="default: the first model's tokenizer")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--trust_remote_code", action="store_true")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the models run (default: cuda if there is one)",
    )
    parser.add_argument("--task", default="perplexity", choices=["perplexity", "passkey", "branches", "tokens"])
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384], help="passkey, branches, tokens"
    )
    parser.add_argument(
        "--depths", type=float, nargs="+", default=[0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100], help="passkey, %%"
    )
    parser.add_argument(
        "--keys_per_cell", type=int, default=20, help="passkey: keys per cell; branches, tokens: prompts per length"
    )
    parser.add_argument("--batch_size", type=int, default=1, help="passkey: prompts per generate() call")
    parser.add_argument("--seed", type=int, default=0, help="passkey, branches, tokens: the keys and haystack windows")
    parser.add_argument(
        "--out", help="perplexity: file prefix (default perplexity_by_context); passkey, branches, tokens: folder"
    )
    parser.error = fail  # an unknown flag or bad value: one error line
    args = parser.parse_args(argv)

    names = args.names or [Path(m).name for m in args.models]
    if len(names) != len(args.models):
        fail(f"--names gives {len(names)} names for {len(args.models)} models")
    if repeated := sorted({name for name in names if names.count(name) > 1}):
        fail(f"two models are named {repeated[0]!r} (results are kept by name): give each its own with --names")
    for folder in args.models:
        if not (Path(folder) / "config.json").exists():
            fail(f"{folder!r} is not a model folder (no config.json)")
    tokenizer_source = args.tokenizer_name or args.models[0]
    if lacks_tokenizer(tokenizer_source):
        fail(
            f"{tokenizer_source!r} has no tokenizer (none of {', '.join(TOKENIZER_VOCABULARY_FILES)}); "
            "pass --tokenizer_name with the folder of the tokenizer the model was trained with"
        )
    if args.max_documents < 1:
        fail(f"--max_documents must be at least 1, got {args.max_documents}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        fail(f"--device {args.device!r} is not a device (cpu, cuda, cuda:1, ...)")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {args.device!r}: this machine has no CUDA GPU")
    try:
        check_context_lengths(args.context_lengths, "--context_lengths")
        if args.validation_file:
            files = expand_paths(args.validation_file)
        else:
            files = split_by_file(stdlib_python_files(), held_out_percentage(args))[1]
        texts = load_documents(files, args.text_column)["text"]
    except (OSError, ValueError) as error:
        fail(str(error))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, trust_remote_code=args.trust_remote_code)
    token_lists = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    if args.task in ("passkey", "branches", "tokens"):
        haystack = passkey_haystack(args, tokenizer, token_lists)
        if args.task == "passkey":
            evaluate_passkey(args, names, tokenizer, haystack, documents=len(token_lists))
        elif args.task == "branches":
            evaluate_branches(args, names, tokenizer, haystack)
        else:
            evaluate_tokens(args, names, tokenizer, haystack)
        return
    try:
        documents, lengths, skipped = evaluation_documents(token_lists, args.context_lengths, args.max_documents)
    except ValueError as error:
        fail(f"--context_lengths: {error}")
    print(f"{len(documents)} documents of {lengths[-1]} tokens; context lengths {lengths}")
    if skipped:
        print(skipped)

    results = {}
    for name, folder in zip(names, args.models, strict=True):
        results[name] = perplexity_by_context(load_model(folder, args, tokenizer), documents, lengths, description=name)
        trained = (
            json.loads((Path(folder) / "training_info.json").read_text())
            if (Path(folder) / "training_info.json").exists()
            else {}
        )
        block = trained.get("summary", {}).get("tokens per sequence")
        print(
            f"{name}: "
            + ", ".join(f"{k}: {v:.2f}" for k, v in results[name].items())
            + (f"  (trained at {block} tokens)" if block else "")
        )
    files = write_report(
        results,
        Path(args.out or "perplexity_by_context"),
        title="Validation perplexity by context length",
        notes=f"{len(documents)} held-out documents of {lengths[-1]} tokens each, read in independent windows "
        f"of each length ({args.dtype}). {skipped}".strip(),
    )
    print("wrote " + ", ".join(map(str, files)))


def held_out_percentage(args) -> float:
    """The standard library split to score on: the one the models held out when train.py trained them on the
    standard library (their train_arguments.json), so that no scored file was trained on."""
    recorded = {}
    for folder in args.models:
        saved = Path(folder) / ARGUMENTS_FILE
        if not saved.is_file():
            continue  # not trained by train.py
        flags = json.loads(saved.read_text())
        if flags.get("train_file") or flags.get("dataset_name"):
            continue  # not trained on the standard library
        if flags.get("validation_file"):
            print(f"warning: {folder} was trained on the whole standard library (it was given --validation_file)")
            continue
        recorded[folder] = float(flags.get("validation_split_percentage", DEFAULT_SPLIT_PERCENTAGE))
    if args.validation_split_percentage is not None:
        for folder, percentage in recorded.items():
            if percentage != args.validation_split_percentage:
                print(
                    f"warning: {folder} held out {percentage:g} % of the standard library in training, not "
                    f"{args.validation_split_percentage:g} %: some files scored here were trained on"
                )
        return args.validation_split_percentage
    if len(set(recorded.values())) > 1:
        held = ", ".join(f"{folder}: {percentage:g} %" for folder, percentage in recorded.items())
        fail(
            f"the models held out different shares of the standard library in training ({held}): pass "
            "--validation_file, or --validation_split_percentage to choose one"
        )
    percentage = next(iter(recorded.values()), DEFAULT_SPLIT_PERCENTAGE)
    print(f"held out: the standard library split at {percentage:g} %" + (" (as trained)" if recorded else ""))
    return percentage


def load_model(folder: str, args, tokenizer):
    """The model in ``folder``, refused when the shared tokenizer has ids beyond its vocabulary."""
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=getattr(torch, args.dtype), trust_remote_code=args.trust_remote_code
    )
    if len(tokenizer) > model.config.vocab_size:
        fail(
            f"the tokenizer ({len(tokenizer)} tokens, from {args.tokenizer_name or args.models[0]}) has ids beyond "
            f"{folder}'s vocabulary of {model.config.vocab_size}: models evaluated together must share a tokenizer "
            "(--tokenizer_name names it)"
        )
    return model.to(args.device)


def passkey_haystack(args, tokenizer, token_lists: list[list[int]]) -> list[int]:
    """The held-out documents end to end, after checking the pass key flags against them."""
    try:
        check_grid(args.lengths, args.depths, args.keys_per_cell, needle_and_question_tokens(tokenizer))
    except ValueError as error:
        fail(str(error))
    if args.batch_size < 1:
        fail(f"--batch_size must be at least 1, got {args.batch_size}")
    haystack = [token for tokens in token_lists for token in tokens]
    if len(haystack) < max(args.lengths):
        fail(
            f"--lengths {max(args.lengths)}: the held-out text has {len(haystack)} tokens; pass --validation_file "
            "with more text or shorter --lengths"
        )
    return haystack


def evaluate_passkey(args, names: list[str], tokenizer, haystack: list[int], documents: int) -> None:
    """The pass key grid for every model, on one haystack."""
    results, by_copies, reach = {}, {}, []
    for name, folder in zip(names, args.models, strict=True):
        model = load_model(folder, args, tokenizer)
        if note := answer_reach(model.config, args.lengths):
            reach.append(f"{name}: {note}")
        results[name], by_copies[name] = passkey_accuracy(
            model,
            tokenizer,
            haystack,
            args.lengths,
            args.depths,
            args.keys_per_cell,
            batch_size=args.batch_size,
            seed=args.seed,
            description=name,
        )
        cells = [accuracy for row in results[name].values() for accuracy in row.values()]
        print(f"{name}: mean accuracy {sum(cells) / len(cells):.2f} over {len(cells)} cells")
    out = Path(args.out or "passkey")
    write_passkey_report(
        results,
        out,
        notes=f"{args.keys_per_cell} keys per cell, greedy decoding ({args.dtype}); haystack: "
        f"{documents} held-out documents, {len(haystack)} tokens, windows from seed {args.seed}."
        + "".join(f"\n\n{line}" for line in reach),
        by_copies=by_copies,
    )
    print(f"wrote {out}/passkey.md, {out}/passkey.json and a heatmap per model")


def evaluate_branches(args, names: list[str], tokenizer, haystack: list[int]) -> None:
    """``--task branches``: the retrieval of each LongNet with every branch, each left out, the local one alone."""
    results, lines = {}, ["# Which branches carry retrieval", ""]
    lines += [
        f"Teacher-forced accuracy of the key's first token over {args.keys_per_cell} prompts per length (needles "
        f"at random depths, seed {args.seed}, {args.dtype}), by where the needle lies: in the question's segment "
        "of the first (local) branch, or in an earlier one (visible only through the other branches).",
        "",
    ]
    for name, folder in zip(names, args.models, strict=True):
        model = load_model(folder, args, tokenizer)
        if not getattr(model.config, "segment_lengths", None):
            fail(f"--task branches needs LongNet models (segment_lengths in the config); {folder!r} has none")
        results[name] = {}
        for length in args.lengths:
            table = retrieval_by_branch(model, tokenizer, haystack, length, args.keys_per_cell, seed=args.seed)
            results[name][str(length)] = table
            places = [place for place in PLACES if any(place in row for row in table.values())]
            lines += [f"## {name} at {length} tokens", ""] + count_table("branches kept", places, places, table)
    write_analysis(Path(args.out or "branches"), "branches", results, lines)


def evaluate_tokens(args, names: list[str], tokenizer, haystack: list[int]) -> None:
    """``--task tokens``: each model's accuracy on the key's tokens, by the copies of each it sees directly."""
    results, lines = {}, ["# Which tokens of the key a model gets", ""]
    lines += [
        f"Teacher-forced accuracy of the key's tokens over {args.keys_per_cell} prompts per length (needles at "
        f"random depths, seed {args.seed}, {args.dtype}): the first token (predicted from the question's end) "
        "and the later ones (each from the token before it), by how many of the needle's two copies of that "
        "token the predicting position reads in one attention step. A dense model reads both; a dilated "
        "branch joins only positions of one residue, so a LongNet must first move a copy it cannot read. "
        "The later tokens also by the parity of the position predicting them: an r = 2 branch serves the two "
        "with disjoint heads.",
        "",
    ]
    for name, folder in zip(names, args.models, strict=True):
        model = load_model(folder, args, tokenizer)
        results[name] = {}
        for length in args.lengths:
            table, skipped = retrieval_by_token(model, tokenizer, haystack, length, args.keys_per_cell, seed=args.seed)
            results[name][str(length)] = {"skipped prompts": skipped, **table}
            seen = sorted({copies for row in table.values() for copies in row})
            lines += [f"## {name} at {length} tokens", ""]
            if skipped:
                lines += [f"{skipped} prompts skipped: their needle does not hold the key's tokens as asked.", ""]
            labels = [f"{copies} {'copy' if copies == 1 else 'copies'} read directly" for copies in seen]
            lines += count_table("key token", seen, labels, table)
    write_analysis(Path(args.out or "tokens"), "tokens", results, lines)


def count_table(corner: str, columns: list, labels: list[str], rows: dict[str, dict]) -> list[str]:
    """Markdown lines: a row per entry of ``rows`` (``{column: (right, total)}``), a column per ``columns``
    (headed by ``labels``), each cell the share right and the counts; a blank line after."""
    lines = [f"| {corner} | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(columns)]
    for label, row in rows.items():
        cells = [f"{row[c][0] / row[c][1]:.2f} ({row[c][0]}/{row[c][1]})" if c in row else "" for c in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def write_analysis(out: Path, name: str, results: dict, lines: list[str]) -> None:
    """``out/name.json`` (the counts) and ``out/name.md`` (the report, also printed)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=1))
    (out / f"{name}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {out}/{name}.md and {out}/{name}.json")


if __name__ == "__main__":
    main()
