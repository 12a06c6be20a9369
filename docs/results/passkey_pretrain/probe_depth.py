"""Which key tokens a model gets at each depth of a 1K prompt, teacher-forced (a probe of session 21).

python probe_depth.py MODEL TOKENIZER: 40 prompts of 1024 tokens per depth (0, 10, 25, 50, 75, 100 %) in a
haystack of the standard library's `email` package, the needle as `evaluate.py --task passkey` plants it;
prints per depth the share right of the key's first, second and third token and of whole keys, then, for
far (0-25 %) and near (50-100 %) needles, the later tokens right by the copies the predicting position reads
directly. Why: exact match at 1K fails for far needles only, and the key-token analysis mixes all depths.
"""

import glob
import random
import sys
import sysconfig

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from longnet.passkey import NEEDLE, key_copies, make_prompt, sees_directly

LENGTH, PROMPTS = 1024, 40


def main() -> None:
    model_folder, tokenizer_folder = sys.argv[1:3]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    model = AutoModelForCausalLM.from_pretrained(model_folder, trust_remote_code=True, dtype=torch.bfloat16).eval()
    files = sorted(glob.glob(sysconfig.get_paths()["stdlib"] + "/email/*.py"))
    haystack = [t for f in files for t in tokenizer(open(f).read(), add_special_tokens=False)["input_ids"]]
    by_copies = {"far (0-25 %)": {}, "near (50-100 %)": {}}
    for depth in (0, 10, 25, 50, 75, 100):
        rng = random.Random(f"probe-{depth}")
        right, asked, whole = [0, 0, 0], [0, 0, 0], 0  # keys have 2 to 4 tokens
        for _ in range(PROMPTS):
            prompt = make_prompt(tokenizer, haystack, LENGTH, depth, rng)
            key_ids = tokenizer(" " + prompt.key, add_special_tokens=False)["input_ids"]
            needle = tokenizer(NEEDLE.format(key=prompt.key), add_special_tokens=False)["input_ids"]
            copies = [prompt.needle_start + i for i in key_copies(needle, key_ids)]
            with torch.no_grad():
                logits = model(torch.tensor([prompt.ids + key_ids]), use_cache=False, logits_to_keep=len(key_ids) + 1)
            correct = [int(token) == key_ids[j] for j, token in enumerate(logits.logits[0, :-1].argmax(-1))]
            for j, hit in enumerate(correct[:3]):
                right[j] += hit
                asked[j] += 1
            whole += all(correct)
            counts = by_copies["far (0-25 %)" if depth <= 25 else "near (50-100 %)"]
            for j in range(1, len(key_ids)):
                seen = sum(sees_directly(model.config, LENGTH - 1 + j, copy + j) for copy in copies)
                cell = counts.setdefault(seen, [0, 0])
                cell[0] += correct[j]
                cell[1] += 1
        shares = " / ".join(f"{r / n:.2f}" for r, n in zip(right, asked, strict=True))
        print(f"depth {depth:3d} %: key tokens 1 / 2 / 3 right {shares}, whole keys {whole / PROMPTS:.2f}")
    for place, counts in by_copies.items():
        cells = ", ".join(f"{seen} copies read {r}/{t}" for seen, (r, t) in sorted(counts.items()))
        print(f"later tokens, {place}: {cells}")


if __name__ == "__main__":
    main()
