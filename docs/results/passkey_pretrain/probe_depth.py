"""Which key tokens a model gets at each depth of a prompt, teacher-forced (a probe of session 21).

python probe_depth.py MODEL TOKENIZER [--length N] [--depths D ...] [--each]: 40 prompts of N tokens (1024) per
depth (0, 10, 25, 50, 75, 100 % unless named) in a haystack of the standard library's `email` package, the needle as
`evaluate.py --task passkey` plants it; prints per depth the share right of the key's first, second and third
token and of whole keys, then, for far (depth <= 25 %) and near (depth > 25 %) needles, the later tokens right by the
copies the predicting position reads directly. Why: exact match at 1K fails for far needles only, and the
key-token analysis mixes all depths. --each also prints every prompt's key copies and predictions (session 22:
the dip at depth 25 % of 1024 is a key token at the last position of a 256-token segment). --copy_ends P ...
moves each prompt's needle (of the depth 25 % prompts) so that its first key copy ends at position P, and prints
per P the key tokens right by their position (session 23: which token of a key crossing a segment end fails).
--each also says how many key copies each prompt's answer reads in one step (session 24: the misses at 4K and 16K
are keys whose answer reads both copies, in their second token).
"""

import argparse
import glob
import random
import sysconfig

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from longnet.passkey import (
    NEEDLE,
    QUESTION,
    Prompt,
    copies_seen,
    key_copies,
    key_in_prompt,
    make_prompt,
)

PROMPTS = 40


def with_first_copy_ending_at(prompt: Prompt, needle: list[int], question: int, copy_end: int, end: int) -> Prompt:
    """The same haystack, key and question (its last ``question`` tokens) with the needle moved so that the
    token ``copy_end`` tokens into it, the end of its first key copy, lands at position ``end``."""
    ids, start = prompt.ids, prompt.needle_start
    haystack = ids[:start] + ids[start + len(needle) : len(ids) - question]
    at = end - copy_end
    return Prompt(haystack[:at] + needle + haystack[at:] + ids[len(ids) - question :], prompt.key, at)


def predicted_key(model, prompt: Prompt, key_ids: list[int]) -> list[int]:
    """The model's greedy token at each key token's place, teacher-forced on the key."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt.ids + key_ids]), use_cache=False, logits_to_keep=len(key_ids) + 1)
    return logits.logits[0, :-1].argmax(-1).tolist()


def probe_copy_ends(model, tokenizer, haystack: list[int], length: int, ends: list[int]) -> None:
    """Per first-copy end: whole keys right and each key token right by its position in the prompt."""
    question = len(tokenizer(QUESTION, add_special_tokens=False)["input_ids"])
    rng = random.Random("probe-25")
    prompts = []  # each prompt with its key's tokens, its needle's and where the needle's first key copy ends
    for _ in range(PROMPTS):
        prompt = make_prompt(tokenizer, haystack, length, 25, rng)
        key_ids = tokenizer(" " + prompt.key, add_special_tokens=False)["input_ids"]
        needle = tokenizer(NEEDLE.format(key=prompt.key), add_special_tokens=False)["input_ids"]
        prompts.append((prompt, key_ids, needle, key_copies(needle, key_ids)[0] + len(key_ids) - 1))
    for end in ends:
        by_position, whole = {}, 0
        for prompt, key_ids, needle, copy_end in prompts:
            moved = with_first_copy_ending_at(prompt, needle, question, copy_end, end)
            assert len(moved.ids) == length and moved.ids[end - len(key_ids) + 1 : end + 1] == key_ids
            correct = [t == k for t, k in zip(predicted_key(model, moved, key_ids), key_ids, strict=True)]
            whole += all(correct)
            for j, hit in enumerate(correct):
                cell = by_position.setdefault(end - len(key_ids) + 1 + j, [0, 0])
                cell[0] += hit
                cell[1] += 1
        cells = ", ".join(f"{at}: {r}/{n}" for at, (r, n) in sorted(by_position.items()))
        print(f"first copy ends at {end}: whole keys {whole / PROMPTS:.2f}; key tokens right by position {cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("tokenizer")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--depths", type=float, nargs="+", default=[0, 10, 25, 50, 75, 100])
    parser.add_argument("--each", action="store_true", help="also print each prompt's copies and predicted tokens")
    parser.add_argument("--copy_ends", type=int, nargs="+", help="first key copy's last positions (not --depths)")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True, dtype=torch.bfloat16).eval()
    files = sorted(glob.glob(sysconfig.get_paths()["stdlib"] + "/email/*.py"))
    haystack = [t for f in files for t in tokenizer(open(f).read(), add_special_tokens=False)["input_ids"]]
    if args.copy_ends:
        probe_copy_ends(model, tokenizer, haystack, args.length, args.copy_ends)
        return
    by_copies = {"far (depth <= 25 %)": {}, "near (depth > 25 %)": {}}
    for depth in args.depths:
        rng = random.Random(f"probe-{depth:g}")
        right, asked, whole = [0, 0, 0], [0, 0, 0], 0  # keys have 2 to 4 tokens
        for _ in range(PROMPTS):
            prompt = make_prompt(tokenizer, haystack, args.length, depth, rng)
            key_ids, copies = key_in_prompt(tokenizer, prompt)
            predicted = predicted_key(model, prompt, key_ids)
            correct = [token == key_ids[j] for j, token in enumerate(predicted)]
            seen_by_token = copies_seen(model.config, args.length - 1, copies, len(key_ids))
            if args.each:
                spans = ", ".join(f"{start}-{start + len(key_ids) - 1}" for start in copies)
                shown = " ".join(repr(tokenizer.decode([token])) for token in predicted)
                print(
                    f"  key {prompt.key}: copies at {spans} ({min(seen_by_token)} read in one step), predicted {shown}"
                    + ("" if all(correct) else "  (wrong)")
                )
            for j, hit in enumerate(correct[:3]):
                right[j] += hit
                asked[j] += 1
            whole += all(correct)
            counts = by_copies["far (depth <= 25 %)" if depth <= 25 else "near (depth > 25 %)"]
            for j, seen in enumerate(seen_by_token[1:], start=1):
                cell = counts.setdefault(seen, [0, 0])
                cell[0] += correct[j]
                cell[1] += 1
        shares = " / ".join(f"{r / n:.2f}" for r, n in zip(right, asked, strict=True))
        print(f"depth {depth:3g} %: key tokens 1 / 2 / 3 right {shares}, whole keys {whole / PROMPTS:.2f}")
    for place, counts in by_copies.items():
        cells = ", ".join(f"{seen} copies read {r}/{t}" for seen, (r, t) in sorted(counts.items()))
        print(f"later tokens, {place}: {cells}")


if __name__ == "__main__":
    main()
