"""A deeper copy of a trained LongNet with the same logits (the probe of session 29: do more layers lift retrieval?).

python grow_layers.py MODEL OUT: each decoder layer of MODEL is followed by a copy of itself whose attention output
(o_proj) and MLP output (down_proj) weights are zero, so the copy adds nothing to the residual stream and OUT's
logits equal MODEL's; training then starts the new layers from the old ones' queries, keys and values rather
than from noise. Checks the logits on a random block before saving and saves MODEL's tokenizer with it.
"""

import argparse
import copy
import re

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import longnet  # noqa: F401  (registers LongNet with the Auto classes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("out")
    args = parser.parse_args()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = 2 * model.config.num_hidden_layers
    grown = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {}
    for name, weight in model.state_dict().items():
        found = re.match(r"model\.layers\.(\d+)\.(.*)", name)
        if found is None:
            state[name] = weight
            continue
        index, rest = int(found[1]), found[2]
        state[f"model.layers.{2 * index}.{rest}"] = weight
        twin = rest in ("self_attn.o_proj.weight", "mlp.down_proj.weight")
        state[f"model.layers.{2 * index + 1}.{rest}"] = torch.zeros_like(weight) if twin else weight
    grown.load_state_dict(state, strict=True)
    grown.eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 2048), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = (model(ids).logits - grown(ids).logits).abs().max().item()
    if difference > 1e-5:
        raise SystemExit(f"grown model's logits differ from {args.model}'s by {difference}")
    grown.save_pretrained(args.out)
    AutoTokenizer.from_pretrained(args.model).save_pretrained(args.out)
    layers = f"{model.config.num_hidden_layers} -> {config.num_hidden_layers} layers"
    print(f"{layers}, logits equal (max difference {difference:.1e})")


if __name__ == "__main__":
    main()
