"""Is the cross-residue hop learnable at all? Induction on random tokens, dense against LongNet.

python hop_synthetic.py OUT_DIR [--steps N]: trains 2-layer models from scratch on sequences of 256 random
tokens (vocabulary 256) holding a span of 24-48 tokens and, at least 32 tokens after it (so never in the same
local segment), the span again; the loss is on the repeat's tokens after its first (each predicted from the
token before it: an induction step). The distance's parity is set per run: odd, the copy of each predicted
token sits at the predicting position's residue mod 2 (LongNet's r = 2 branch reads it in one step, as "1 copy
read" in the pass-key analysis); even, at the other residue (the hop: "0 copies read"). The same models on the
same batches: a Llama (dense) and a LongNet with w = 32, 256 and r = 1, 2 (a local branch and one r = 2 branch
over the whole sequence). Writes OUT_DIR/hop_synthetic.{json,md} and prints the held-out accuracy on the
repeated tokens every 100 steps, all and split by the predicting position's parity; --kinds and --distances
pick runs, --seed the initial weights and training batches (the held-out batches stay), --heads the heads,
--local_segment the local branch's segment length, --layers the depth.

As a pre-training stage for the pass-key recipe (session 21): --save DIR --tokenizer TOKENIZER writes the last
LongNet trained (--save_dense DIR: the last dense model) as a model of that tokenizer's vocabulary, for
`scripts/train.py --model_name_or_path DIR`: the 256 token ids become the tokenizer's digit tokens (pass keys
are made of them) and others drawn from it, the other rows of the embedding freshly initialised;
--intermediate_size and --max_positions set the rest of the pass-key models' size. With --full_vocabulary the
models train with the tokenizer's whole embedding table (the same 256 ids drawn from it) instead. --device
trains elsewhere than on the CPU (the batches are drawn on the CPU either way, so a seed gives the same data).
"""

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from longnet import LongNetConfig, LongNetForCausalLM
from longnet.passkey import sees_directly

LENGTH, VOCAB, BATCH = 256, 256, 32
SIZE = dict(
    vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=LENGTH, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None,
)  # fmt: skip
LEARNING_RATE, WARMUP = 1e-3, 100


def batch(generator: torch.Generator, parity: int, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens (of the VOCAB ids ``tokens``) with a span repeated at a distance of the given parity; labels
    -100 but on the repeat."""
    ids = tokens[torch.randint(VOCAB, (BATCH, LENGTH), generator=generator)]
    labels = torch.full_like(ids, -100)
    for row in range(BATCH):
        span = int(torch.randint(24, 49, (), generator=generator))
        first = int(torch.randint(0, LENGTH // 2 - span, (), generator=generator))
        low = first + span + 32  # the repeat starts beyond the span's local segment, anywhere it still fits
        start = int(torch.randint(low, LENGTH - span + 1, (), generator=generator))
        if (start - first) % 2 != parity:
            start += 1 if start + span < LENGTH else -1
        ids[row, start : start + span] = ids[row, first : first + span]
        labels[row, start + 1 : start + span] = ids[row, start + 1 : start + span]
    return ids, labels


def model_of(kind: str, seed: int, longnet_config: LongNetConfig) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "dense":
        size = {k: v for k, v in longnet_config.to_dict().items() if k in SIZE}
        return LlamaForCausalLM(LlamaConfig(**size, attn_implementation="sdpa"))
    return LongNetForCausalLM(longnet_config)


def with_vocabulary(model: torch.nn.Module, larger: torch.nn.Module, ids: torch.Tensor) -> torch.nn.Module:
    """``larger`` (a fresh model of the same kind and size, of a larger vocabulary) given ``model``'s weights, the
    embedding rows placed at ``ids``: its logits at ``ids`` are ``model``'s; its other rows stay fresh."""
    embedding = "model.embed_tokens.weight"
    trained = {name: weight for name, weight in model.state_dict().items() if name not in (embedding, "lm_head.weight")}
    missing = larger.load_state_dict(trained, strict=False).missing_keys
    assert set(missing) <= {embedding, "lm_head.weight"}, missing
    with torch.no_grad():
        larger.get_input_embeddings().weight[ids] = model.get_input_embeddings().weight
    assert larger.lm_head.weight.data_ptr() == larger.get_input_embeddings().weight.data_ptr()  # tied
    return larger


def accuracy(model: torch.nn.Module, held_out: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    """Accuracy on the repeated tokens: all, then those predicted at even and at odd positions (in a LongNet's
    r = 2 branch, two disjoint sets of heads)."""
    right, total = torch.zeros(3), torch.zeros(3)
    with torch.no_grad():
        for ids, labels in held_out:
            correct = model(ids).logits[:, :-1].argmax(-1) == labels[:, 1:]
            scored = labels[:, 1:] != -100
            even = (torch.arange(LENGTH - 1, device=scored.device) % 2 == 0).expand_as(scored)
            for i, where in enumerate((scored, scored & even, scored & ~even)):
                right[i] += correct[where].sum()
                total[i] += where.sum()
    return (right / total).tolist()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--kinds", nargs="+", default=["dense", "longnet"], choices=["dense", "longnet"])
    parser.add_argument("--distances", nargs="+", default=["odd", "even"], choices=["odd", "even"])
    parser.add_argument("--seed", type=int, default=0, help="of the initial weights and the training batches")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (hidden size 128 either way)")
    parser.add_argument("--local_segment", type=int, default=32, help="LongNet's local segment length (at most 32)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--intermediate_size", type=int, default=SIZE["intermediate_size"])
    parser.add_argument("--max_positions", type=int, default=LENGTH, help="the models' max_position_embeddings")
    parser.add_argument("--tokenizer", type=Path, help="a tokenizer folder: the vocabulary --save writes")
    parser.add_argument("--full_vocabulary", action="store_true", help="train with the tokenizer's embedding table")
    parser.add_argument("--save", type=Path, help="a folder for the last LongNet trained (and the tokenizer)")
    parser.add_argument("--save_dense", type=Path, help="a folder for the last dense model trained (and the tokenizer)")
    parser.add_argument("--device", default="cpu", help="where the models train, e.g. cuda")
    args = parser.parse_args()
    if not 1 <= args.local_segment <= 32:
        parser.error(f"--local_segment must be 1 to 32 (span and repeat lie >= 32 apart), got {args.local_segment}")
    if args.max_positions < LENGTH:
        parser.error(f"--max_positions must be at least {LENGTH}, the sequence length, got {args.max_positions}")
    folders = {"longnet": args.save, "dense": args.save_dense}
    if (args.save or args.save_dense or args.full_vocabulary) and not args.tokenizer:
        parser.error(
            "--save, --save_dense and --full_vocabulary need --tokenizer (the vocabulary of the model written)"
        )
    for kind, flag in (("longnet", "--save"), ("dense", "--save_dense")):
        if folders[kind] and kind not in args.kinds:
            parser.error(f"{flag} writes a {kind} model: --kinds must include {kind}")
    size = {
        **SIZE, "num_attention_heads": args.heads, "num_hidden_layers": args.layers,
        "intermediate_size": args.intermediate_size, "max_position_embeddings": args.max_positions,
    }  # fmt: skip
    branches = dict(segment_lengths=[args.local_segment, LENGTH], dilation_rates=[1, 2])
    tokens = torch.arange(VOCAB)  # the ids the batches hold
    if args.tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        special = set(tokenizer.all_special_ids)
        ordinary = [i for i in range(len(tokenizer)) if i not in special]
        digits = [i for i in ordinary if tokenizer.decode([i]).strip().isdigit()]
        others = sorted(set(ordinary) - set(digits))
        drawn = torch.randperm(len(others), generator=torch.Generator().manual_seed(0))[: VOCAB - len(digits)]
        drawn_ids = torch.tensor(digits + [others[i] for i in drawn.tolist()])
        specials = {name: getattr(tokenizer, name) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
        saved_config = LongNetConfig(**size | specials | {"vocab_size": len(tokenizer)}, **branches)
        if args.full_vocabulary:
            tokens = drawn_ids
    longnet_config = saved_config if args.full_vocabulary else LongNetConfig(**size, **branches)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    # The parity check: odd distances put every predicted token's copy where the r = 2 branch reads it.
    for parity, readable in ((1, True), (0, False)):
        ids, labels = batch(torch.Generator().manual_seed(1), parity, tokens)
        row = ids[0].tolist()
        at = next(i for i in range(1, LENGTH) if labels[0, i] != -100) - 1  # predicts labels[0, at + 1]
        copy = next(j for j in range(at) if row[j : j + 2] == row[at : at + 2]) + 1
        assert sees_directly(longnet_config, at, copy) == readable, (parity, at, copy)
    results: dict[str, list[tuple[int, list[float]]]] = {}
    for parity, name in ((1, "odd"), (0, "even")):
        if name not in args.distances:
            continue
        held_out = [batch(torch.Generator().manual_seed(10_000 + i), parity, tokens) for i in range(4)]
        held_out = [(ids.to(args.device), labels.to(args.device)) for ids, labels in held_out]
        for kind in args.kinds:
            model = model_of(kind, args.seed, longnet_config).to(args.device)
            optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.95), weight_decay=0.0)
            generator = torch.Generator().manual_seed(args.seed)
            curve, begin = [(0, accuracy(model.eval(), held_out))], time.perf_counter()
            for step in range(1, args.steps + 1):
                model.train()
                ids, labels = (t.to(args.device) for t in batch(generator, parity, tokens))
                for group in optimizer.param_groups:
                    group["lr"] = LEARNING_RATE * min(1.0, step / WARMUP)
                loss = model(ids, labels=labels).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if step % 100 == 0:
                    curve.append((step, accuracy(model.eval(), held_out)))
                    shown = " / ".join(f"{x:.3f}" for x in curve[-1][1])
                    print(f"{kind:8s} {name:4s} step {step:5d} loss {loss.item():.3f} accuracy all / at even / at odd "
                          f"positions {shown} ({time.perf_counter() - begin:.0f} s)", flush=True)  # fmt: skip
            results[f"{kind}, {name} distance"] = curve
            if folders[kind]:
                fresh = None if args.full_vocabulary else model_of(kind, args.seed, saved_config)
                saved = model.cpu() if fresh is None else with_vocabulary(model.cpu(), fresh, drawn_ids)
                saved.save_pretrained(folders[kind])
                tokenizer.save_pretrained(folders[kind])
    (args.out_dir / "hop_synthetic.json").write_text(json.dumps(results, indent=1))
    steps = [step for step, _ in next(iter(results.values()))]
    lines = [
        "Accuracy on the repeated tokens, held out: all (at even / at odd predicting positions).",
        "",
        "| step | " + " | ".join(results) + " |",
        "|---:|" + "---:|" * len(results),
        *(f"| {step} | " + " | ".join("{:.2f} ({:.2f} / {:.2f})".format(*curve[i][1]) for curve in results.values())
          + " |" for i, step in enumerate(steps)),
    ]  # fmt: skip
    (args.out_dir / "hop_synthetic.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
