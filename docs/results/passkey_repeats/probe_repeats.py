"""Teacher-forced copying of repeated random spans by a model folder (needs repeats.patch applied).

python probe_repeats.py MODEL: 24 blocks of 1024 random tokens, each with one or two repeat episodes;
prints, by whether the predicting position and the span's copy share a local segment (the first branch;
256 tokens for a dense model) and whether one attention step reads the copy (``sees_directly``), how many
repeated tokens it predicts.
"""

import random
import sys

import datasets
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

import longnet  # noqa: F401  (registers the Auto classes)
from longnet.passkey import plant_passkeys, sees_directly

path = sys.argv[1]
tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
config = model.config
local = getattr(config, "segment_lengths", [256])[0]  # a dense model: LongNet's shortest segment
rng = random.Random(0)
blocks = datasets.Dataset.from_dict({"input_ids": [[rng.randrange(4, 4000) for _ in range(1024)] for _ in range(24)]})
planted = plant_passkeys(blocks, tokenizer, 1.0, 123, episodes=2, config=config, repeats=1.0)
counts: dict[tuple[bool, bool], list[int]] = {}
with torch.no_grad():
    for block in planted:
        ids, mask = block["input_ids"], block["answer_mask"]
        predicted = model(torch.tensor([ids]), use_cache=False).logits[0].argmax(-1).tolist()
        for start in (i for i in range(1, len(ids)) if mask[i] and not mask[i - 1]):
            stop = next((i for i in range(start, len(ids)) if not mask[i]), len(ids))
            span = ids[start - 1 : stop]
            copy = max(a for a in range(start - len(span)) if ids[a : a + len(span)] == span)
            for k in range(1, len(span)):  # span[k] is predicted at start - 2 + k; its copy is at copy + k
                at = start - 2 + k
                cell = counts.setdefault(
                    ((at // local) == (copy + k) // local, sees_directly(config, at, copy + k)), [0, 0]
                )
                cell[0] += predicted[at] == span[k]
                cell[1] += 1
for (same_segment, direct), (right, total) in sorted(counts.items()):
    where = "same local segment" if same_segment else "earlier segment"
    print(f"{where}, {'read directly' if direct else 'not read directly'}: {right}/{total}")
