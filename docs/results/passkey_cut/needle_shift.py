"""Where a local segment boundary falls in the needle, and whether the key is still read (a probe of session 27).

python needle_shift.py MODEL TOKENIZER [--shifts S ...] [--depth D] [--seed N]: the 40 prompts of the cell
(16376 tokens, depth D, default 25 %) that `evaluate.py --task passkey --keys_per_cell 40 --seed N` asks, each
with its needle moved S tokens later (the same haystack window, key and question), teacher-forced on the key.
Prints per shift, for the keys of 3 tokens (whose two copies lie 8 apart, at one parity), how many needle tokens
precede the next multiple of 256 (the local segment's boundary; 23 or more: the needle is not cut) and how
many keys are right, with each miss's key tokens right (1) or wrong (0) and the tokens predicted (each after the
key's true tokens before it). An even shift keeps the answer's
direct read of both copies (or of none) that the unshifted prompt has; an odd one swaps them.
"""

import argparse
import random

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import longnet  # noqa: F401  (registers LongNet with the Auto classes)
from longnet.passkey import NEEDLE, QUESTION, Prompt, copies_seen, key_in_prompt, make_prompt
from longnet.training import DEFAULT_SPLIT_PERCENTAGE, load_documents, split_by_file, stdlib_python_files

LENGTH, PROMPTS, SEGMENT = 16376, 40, 256


def moved(prompt: Prompt, needle: int, question: int, shift: int) -> Prompt:
    """The same haystack, key and question (the last ``question`` tokens) with the ``needle`` tokens at
    ``prompt.needle_start`` moved ``shift`` tokens later."""
    ids, start = prompt.ids, prompt.needle_start
    haystack = ids[:start] + ids[start + needle : len(ids) - question]
    at = start + shift
    return Prompt(
        haystack[:at] + ids[start : start + needle] + haystack[at:] + ids[len(ids) - question :], prompt.key, at
    )


def held_out_haystack(tokenizer) -> list[int]:
    """The held-out standard-library text evaluate.py plants needles in, as one token list."""
    texts = load_documents(split_by_file(stdlib_python_files(), DEFAULT_SPLIT_PERCENTAGE)[1])["text"]
    return [t for text in texts for t in tokenizer(text, add_special_tokens=False)["input_ids"]]


def cell_prompts(tokenizer, haystack: list[int], depth: float, seed: int, count: int) -> list[Prompt]:
    """The first ``count`` prompts that ``evaluate.py --task passkey --seed SEED`` asks in the cell of
    ``LENGTH`` tokens and ``depth`` percent (its random generator is seeded per cell)."""
    rng = random.Random(f"{seed}-{LENGTH}-{depth}")
    return [make_prompt(tokenizer, haystack, LENGTH, depth, rng) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("tokenizer")
    parser.add_argument("--shifts", type=int, nargs="+", default=list(range(-12, 13)))
    parser.add_argument("--depth", type=float, default=25.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True, dtype=torch.bfloat16).eval()
    question = len(tokenizer(QUESTION, add_special_tokens=False)["input_ids"])
    prompts = cell_prompts(tokenizer, held_out_haystack(tokenizer), args.depth, args.seed, PROMPTS)
    needles = [len(tokenizer(NEEDLE.format(key=p.key), add_special_tokens=False)["input_ids"]) for p in prompts]
    for shift in args.shifts:
        right, asked, misses, before, read = 0, 0, [], set(), set()
        for index, (prompt, needle) in enumerate(zip(prompts, needles, strict=True)):
            shifted = moved(prompt, needle, question, shift)
            key_ids, copies = key_in_prompt(tokenizer, shifted)
            if len(key_ids) != 3:
                continue
            before.add(-shifted.needle_start % SEGMENT)
            read.add(min(copies_seen(model.config, LENGTH - 1, copies, len(key_ids))))
            with torch.no_grad():
                logits = model(torch.tensor([shifted.ids + key_ids]), use_cache=False, logits_to_keep=len(key_ids) + 1)
            predicted = logits.logits[0, :-1].argmax(-1).tolist()
            hits = [int(p == k) for p, k in zip(predicted, key_ids, strict=True)]
            right += all(hits)
            asked += 1
            if not all(hits):
                misses.append(f"{index}: {''.join(map(str, hits))} {tokenizer.decode(predicted)!r} for {prompt.key}")
        print(
            f"shift {shift:+d}: {sorted(before)} needle tokens before the boundary, {sorted(read)} copies read "
            f"directly; 3-token keys right {right}/{asked}; misses {', '.join(misses)}",
            flush=True,
        )


if __name__ == "__main__":
    main()
