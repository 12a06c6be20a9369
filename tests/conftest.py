"""Shared fixtures: tiny configs and a tokenizer trained here on local text (no Hub access)."""

import gc
import os
import socket
import sysconfig
import traceback
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Without a GPU, the Triton kernels run on CPU tensors through Triton's interpreter (read when the
# kernels are defined, so before longnet is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TINY = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
# Branches small enough that a few dozen tokens cross several segment boundaries of each,
# with w % r != 0 and r > num_key_value_heads.
TINY_BRANCHES = dict(segment_lengths=[4, 8, 12], dilation_rates=[1, 2, 3])


@pytest.fixture
def cpu_bf16_in_hardware() -> bool | None:
    """Whether this machine's CPU multiplies bf16 in hardware, from the kernel's CPU flags (AMX's bf16 tiles,
    AVX512-BF16): a reference independent of torch's feature checks, which longnet.machine uses. None where
    there is no /proc/cpuinfo (not Linux)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return None
    return bool({"amx_bf16", "avx512_bf16"} & set(cpuinfo.read_text().split()))


def tiny_config(**overrides):
    from longnet import LongNetConfig

    return LongNetConfig(**{**TINY, **TINY_BRANCHES, **overrides})


def make_model(model_class=None, seed: int = 0, **overrides):
    """A tiny LongNet (LongNetForCausalLM unless ``model_class``), in eval mode, seeded."""
    from longnet import LongNetForCausalLM

    torch.manual_seed(seed)
    return (model_class or LongNetForCausalLM)(tiny_config(**overrides)).eval()


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """Token ids above the special tokens (pad 0, bos 1, eos 2)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, TINY["vocab_size"], (batch, length), generator=generator)


def left_padded(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of 1D prompts left-padded with 0 to the longest, and its attention mask."""
    longest = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, longest - len(p) :], mask[row, longest - len(p) :] = p, 1
    return ids, mask


def stdlib_text(max_chars: int = 200_000) -> str:
    """Python standard library source, the corpus every machine has."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="ignore")
        chunks.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "\n".join(chunks)


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """A byte-level BPE tokenizer with TINY's vocabulary size, trained on stdlib code."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([stdlib_text()], vocab_size=TINY["vocab_size"], special_tokens=["<pad>", "<s>", "</s>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    assert (fast.pad_token_id, fast.bos_token_id, fast.eos_token_id) == (0, 1, 2)
    return fast


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world: int, target, *args) -> None:
    """``target(rank, world, *args)`` in ``world`` spawned processes joined in a gloo process group."""
    import torch.multiprocessing as mp

    mp.spawn(_entry, args=(world, free_port(), target, args), nprocs=world, join=True)


def _entry(rank, world, port, target, args):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        target(rank, world, *args)
        dist.barrier()  # no rank tears the group down while another still has collectives in flight
    except Exception:
        traceback.print_exc()
        raise
    finally:
        # Free what the target built before the group goes: FSDP2's modules sit in reference cycles that hold
        # the process group, and left to the collector at interpreter exit, the group's gloo threads are torn
        # down mid-finalization (std::terminate, SIGABRT; seen once in CI).
        gc.collect()
        dist.destroy_process_group()
