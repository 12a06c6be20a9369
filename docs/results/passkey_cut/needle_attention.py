"""Which layers, heads and branches of a LongNet read the needle when it answers (an analysis of session 30).

python needle_attention.py MODEL TOKENIZER [--depths D ...] [--keys_per_cell N] [--seed S]: the prompts
`evaluate.py --task passkey --lengths 16376` asks (the same cells), each answered teacher-forced with its
key. For every position that predicts a key token, every layer and head: the attention the head gives the
needle's tokens, merged over the branches as the model merges them (a key reached by two branches gets both
shares), the share of the dilated branch in that merge, and where in the needle the head looks most.
Prints Markdown: each layer's reading of right and wrong tokens, where the layer that reads the needle most
looks in it, and every layer's heads.

Why recomputed from the layers' inputs: the model's own eager attention (``output_attentions``) forms the
whole 16K x 16K weight matrix of a segment; here only the few answering positions are scored.
"""

import argparse
import math
from collections import defaultdict

import torch
from needle_shift import LENGTH, cell_prompts, held_out_haystack
from transformers import AutoModelForCausalLM, AutoTokenizer

import longnet  # noqa: F401  (registers LongNet with the Auto classes)
from longnet.modeling_longnet import apply_rotary_pos_emb
from longnet.passkey import NEEDLE, copies_seen, key_in_prompt


def layer_inputs(model) -> tuple[list[dict], list]:
    """Hooks that keep each attention layer's normed input, rotary tables and output of the next forward."""
    captured: list[dict] = [{} for _ in model.model.layers]

    def keep_input(index):
        def hook(module, args, kwargs):
            captured[index]["hidden"] = kwargs["hidden_states"]
            captured[index]["rotary"] = kwargs["position_embeddings"]

        return hook

    def keep_output(index):
        def hook(module, args, output):
            captured[index]["output"] = output[0]

        return hook

    handles = []
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.self_attn.register_forward_pre_hook(keep_input(i), with_kwargs=True))
        handles.append(layer.self_attn.register_forward_hook(keep_output(i)))
    return captured, handles


def merged_attention(attention, hidden, rotary, queries: list[int], config) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights, dilated_share)``: each head's attention from the ``queries`` positions over all positions,
    ``(H, len(queries), L)`` in float32, with the branches merged by their log-sum-exp as the model merges
    them, and ``(H, len(queries))`` the merge's weight of the branches with r > 1."""
    heads, head_dim = config.num_attention_heads, config.head_dim
    length = hidden.shape[1]
    query = attention.q_proj(hidden[:, queries]).view(1, len(queries), heads, head_dim).transpose(1, 2)
    key = attention.k_proj(hidden).view(1, length, -1, head_dim).transpose(1, 2)
    cos, sin = rotary
    query, _ = apply_rotary_pos_emb(query, query, cos[:, queries], sin[:, queries])
    _, key = apply_rotary_pos_emb(key, key, cos, sin)
    key = key.repeat_interleave(heads // key.shape[1], dim=1)
    scores = (query.float() @ key.float().transpose(-1, -2))[0] * head_dim**-0.5  # (H, Q, L)
    position = torch.arange(length)
    head = torch.arange(heads)[:, None, None]
    at = torch.tensor(queries)[None, :, None]
    masks, lses, dilated = [], [], []
    for w, r in zip(config.segment_lengths, config.dilation_rates, strict=True):
        same_residue = ((at % w) % r == head % r) & ((position % w) % r == head % r)
        kept = (at // w == position // w) & (position <= at) & same_residue
        lse = torch.logsumexp(scores.masked_fill(~kept, -math.inf), dim=-1)  # -inf where the head skips the query
        masks.append(kept)
        lses.append(lse)
        dilated.append(r > 1)
    total = torch.logsumexp(torch.stack(lses), dim=0)
    weights = sum(torch.exp(scores - total[..., None]) * kept for kept in masks)
    share = sum(torch.exp(lse - total) for lse, far in zip(lses, dilated, strict=True) if far)
    return weights, share


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("tokenizer")
    parser.add_argument("--depths", type=float, nargs="+", default=[0.0, 10.0, 25.0, 50.0, 75.0, 90.0, 100.0])
    parser.add_argument("--keys_per_cell", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True, dtype=torch.bfloat16).eval()
    config = model.config
    haystack = held_out_haystack(tokenizer)
    captured, handles = layer_inputs(model)
    # (layer, first or later token, right, copies read) -> [(the strongest head's needle mass, its mass on the
    # token to copy, its dilated share)]
    reads = defaultdict(list)
    # (layer, head, even position) -> needle mass, over the positions that predict a key token after the first
    by_head = defaultdict(list)
    # (layer, right, copies read, the strongest head's peak from the first copy's token to copy) -> count
    peaks = defaultdict(int)
    largest_difference = 0.0  # between the layers' outputs and those of the weights recomputed here
    analysed = 0  # prompts whose needle holds the key's tokens as an answer tokenizes them
    prompts = [p for d in args.depths for p in cell_prompts(tokenizer, haystack, d, args.seed, args.keys_per_cell)]
    for prompt in prompts:
        key_ids, copies = key_in_prompt(tokenizer, prompt)
        if not copies:
            continue
        analysed += 1
        needle = len(tokenizer(NEEDLE.format(key=prompt.key), add_special_tokens=False)["input_ids"])
        span = slice(prompt.needle_start, prompt.needle_start + needle)
        queries = [LENGTH - 1 + j for j in range(len(key_ids))]
        with torch.no_grad():
            # Only the answering positions' logits: the last len(key_ids) + 1 positions but the final one.
            logits = model(torch.tensor([prompt.ids + key_ids]), use_cache=False, logits_to_keep=len(key_ids) + 1)
            logits = logits.logits[0, :-1]
            right = (logits.argmax(-1) == torch.tensor(key_ids)).tolist()
            seen = copies_seen(config, LENGTH - 1, copies, len(key_ids))
            for index, layer in enumerate(model.model.layers):
                inputs = captured[index]
                weights, share = merged_attention(layer.self_attn, inputs["hidden"], inputs["rotary"], queries, config)
                largest_difference = max(
                    largest_difference, output_difference(layer.self_attn, inputs, weights, queries)
                )
                mass = weights[:, :, span].sum(-1)  # (H, Q)
                for j in range(len(key_ids)):
                    best = int(mass[:, j].argmax())
                    sources = [copy + j for copy in copies]
                    copied = float(weights[best, j, sources].sum())
                    kind = ("first" if j == 0 else "later", bool(right[j]), seen[j])
                    reads[(index, *kind)].append((float(mass[best, j]), copied, float(share[best, j])))
                    if j:
                        for head in range(config.num_attention_heads):
                            by_head[(index, head, (LENGTH - 1 + j) % 2 == 0)].append(float(mass[head, j]))
                        peak = prompt.needle_start + int(weights[best, j, span].argmax())
                        peaks[(index, bool(right[j]), seen[j], peak - sources[0])] += 1
    for handle in handles:
        handle.remove()
    report(reads, by_head, peaks, config, analysed, args)
    print(
        f"\nThe weights recomputed here, applied to the values, give each layer's attention output at the answering "
        f"positions to a largest relative difference of {largest_difference:.3f} (bf16)."
    )


def output_difference(attention, inputs: dict, weights: torch.Tensor, queries: list[int]) -> float:
    """How far ``weights`` applied to the layer's values are from the layer's own output at ``queries``: the
    largest difference relative to the output's largest entry. Why: a check that the weights are the model's."""
    hidden = inputs["hidden"]
    heads, length = weights.shape[0], hidden.shape[1]
    value = attention.v_proj(hidden).view(length, -1, attention.head_dim).transpose(0, 1).float()
    value = value.repeat_interleave(heads // value.shape[0], dim=0)
    mixed = (weights @ value).transpose(0, 1).reshape(len(queries), -1)
    recomputed = attention.o_proj(mixed.to(hidden.dtype)).float()
    actual = inputs["output"][0, queries].float()
    return float((recomputed - actual).abs().max() / actual.abs().max())


def report(reads, by_head, peaks, config, asked: int, args) -> None:
    """The three Markdown tables of the module docstring."""
    print(
        f"{asked} prompts of {LENGTH} tokens (depths {', '.join(f'{d:g}' for d in args.depths)} %, "
        f"{args.keys_per_cell} a cell, seed {args.seed}), each key token teacher-forced.\n"
    )
    print("Per layer, the head that gives the needle most attention at a position predicting a key token: that")
    print("attention (needle mass), the part of it on the key token to copy (in either copy), and the dilated")
    print("branch's share of the head's merge; by token (first, later), right or wrong, and copies read directly.\n")
    print("| layer | token | right | copies read | tokens | needle mass | on the token to copy | dilated share |")
    print("|---:|---|---|---:|---:|---:|---:|---:|")
    for (index, which, right, seen), rows in sorted(reads.items()):
        mean = [sum(column) / len(rows) for column in zip(*rows, strict=True)]
        print(
            f"| {index} | {which} | {'yes' if right else 'no'} | {seen} | {len(rows)} | {mean[0]:.2f} | "
            f"{mean[1]:.2f} | {mean[2]:.2f} |"
        )
    reading = max(
        range(config.num_hidden_layers),
        key=lambda layer: sum(sum(masses) for (index, _, _), masses in by_head.items() if index == layer),
    )
    print(f"\nLayer {reading} (the one whose heads give the needle most attention), later key tokens: where the")
    print("strongest head's largest weight in the needle lies, in tokens from the token to copy in the key's first")
    print("copy (0: on it; the second copy's lies 8 later for a 3-token key, 9 for a 4-token one).\n")
    offsets = sorted({offset for index, _, _, offset in peaks if index == reading})
    print("| right | copies read | " + " | ".join(f"{o:+d}" for o in offsets) + " |")
    print("|---|---:|" + "---:|" * len(offsets))
    for right, seen in sorted({(r, s) for index, r, s, _ in peaks if index == reading}, reverse=True):
        counts = " | ".join(str(peaks[(reading, right, seen, o)]) for o in offsets)
        print(f"| {'yes' if right else 'no'} | {seen} | {counts} |")
    print("\nEvery head's mean needle mass at the positions predicting later key tokens, by the position's parity")
    print("(even / odd; r = 2 heads with an even index serve even positions).\n")
    heads = config.num_attention_heads
    print("| layer | " + " | ".join(f"head {h}" for h in range(heads)) + " |")
    print("|---:|" + "---:|" * heads)
    for index in range(config.num_hidden_layers):
        cells = []
        for head in range(heads):
            even, odd = by_head[(index, head, True)], by_head[(index, head, False)]
            cells.append(f"{sum(even) / max(len(even), 1):.2f} / {sum(odd) / max(len(odd), 1):.2f}")
        print(f"| {index} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
