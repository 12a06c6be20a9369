"""A LongNet folder's weights saved as the same-size Llama (the dense control from the same start).

LongNet keeps Llama's parameter names and shapes and only its attention differs, so the state dict loads
into `LlamaForCausalLM` unchanged; the config drops the branches. The tokenizer is copied beside it.

    python docs/results/passkey_dense/longnet_as_llama.py LONGNET_FOLDER OUT_FOLDER
"""

import argparse

from transformers import AutoTokenizer, LlamaForCausalLM

from longnet import LongNetForCausalLM
from longnet.configuration_longnet import llama_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("longnet", help="a LongNet model folder")
    parser.add_argument("out", help="where the Llama is written")
    args = parser.parse_args()
    longnet = LongNetForCausalLM.from_pretrained(args.longnet)
    llama = LlamaForCausalLM(llama_config(longnet.config))
    llama.load_state_dict(longnet.state_dict(), strict=True)
    llama.save_pretrained(args.out)
    AutoTokenizer.from_pretrained(args.longnet).save_pretrained(args.out)
    print(f"{args.out}: {type(llama).__name__}, {sum(p.numel() for p in llama.parameters())} parameters")


if __name__ == "__main__":
    main()
