"""Sequence-parallel dilated attention (gloo, spawned processes) against the single-process kernel."""

import pytest
import torch
import torch.distributed as dist
from conftest import run_ranks

from longnet import dilated_attention

# Per-rank length 32: w = 16 and 32 stay on a rank; 64 and 128 span ranks; r = 6 and 12 do not divide
# the power-of-two lengths; heads 6 with 2 key/value heads (GQA).
BRANCHES = ([16, 32, 64, 128], [1, 2, 6, 12])


def full_inputs(length, heads=6, kv_heads=2, head_dim=8, dtype=torch.float64):
    generator = torch.Generator().manual_seed(0)
    shapes = [(2, heads, length, head_dim), (2, kv_heads, length, head_dim), (2, kv_heads, length, head_dim)]
    q, k, v = (torch.randn(shape, generator=generator, dtype=dtype) for shape in shapes)
    grad_out = torch.randn(2, heads, length, head_dim, generator=generator, dtype=dtype)
    return q, k, v, grad_out


def _check_kernel(rank, world, is_causal, local_length):
    q, k, v, grad_out = full_inputs(local_length * world)
    full = [x.clone().requires_grad_() for x in (q, k, v)]
    expected = dilated_attention(*full, *BRANCHES, is_causal=is_causal, backend="sdpa")
    expected.backward(grad_out)

    chunk = slice(rank * local_length, (rank + 1) * local_length)
    mine = [x[:, :, chunk].clone().requires_grad_() for x in (q, k, v)]
    out, lse = dilated_attention(*mine, *BRANCHES, is_causal=is_causal, return_lse=True, group=dist.group.WORLD)
    out.backward(grad_out[:, :, chunk])
    torch.testing.assert_close(out, expected[:, :, chunk], atol=1e-10, rtol=0)
    for got, reference in zip(mine, full, strict=True):
        torch.testing.assert_close(got.grad, reference.grad[:, :, chunk], atol=1e-10, rtol=0)
    _, full_lse = dilated_attention(*[x.detach() for x in full], *BRANCHES, is_causal=is_causal, return_lse=True)
    torch.testing.assert_close(lse, full_lse[:, :, chunk], atol=1e-10, rtol=0)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("is_causal", [True, False], ids=["causal", "bidirectional"])
def test_kernel_matches_single_process(world, is_causal):
    run_ranks(world, _check_kernel, is_causal, 32)


def _check_bad_split(rank, world, local_length):
    q, k, v, _ = full_inputs(local_length)
    with pytest.raises(ValueError, match="neither divides nor is a multiple of the per-rank length"):
        dilated_attention(q, k, v, [16, 64], [1, 2], group=dist.group.WORLD)
    # The ranks are still in step: a collective after the error completes.
    flag = torch.ones(1)
    dist.all_reduce(flag)
    assert flag.item() == world


def test_bad_split_is_a_clear_error_on_every_rank():
    run_ranks(2, _check_bad_split, 24)


def _check_unequal_lengths(rank, world):
    q, k, v, _ = full_inputs(32 if rank == 0 else 16)
    with pytest.raises(ValueError, match="same length on every rank"):
        dilated_attention(q, k, v, [16], [1], group=dist.group.WORLD)


def test_unequal_lengths_are_a_clear_error_on_every_rank():
    run_ranks(2, _check_unequal_lengths)


def _check_model(rank, world, local_length):
    from conftest import TINY

    from longnet import LongNetConfig, LongNetForCausalLM

    torch.manual_seed(0)
    config = LongNetConfig(
        **{**TINY, "num_attention_heads": 6, "num_key_value_heads": 2, "hidden_size": 48},
        segment_lengths=[8, 16, 32, 64],
        dilation_rates=[1, 2, 6, 12],
    )
    model = LongNetForCausalLM(config).double()
    ids = torch.randint(3, TINY["vocab_size"], (2, local_length * world), generator=torch.Generator().manual_seed(1))
    expected = model(ids, labels=ids, use_cache=False)
    expected.loss.backward()
    expected_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    chunk = slice(rank * local_length, (rank + 1) * local_length)
    out = model(ids[:, chunk], labels=ids[:, chunk], sequence_parallel_group=dist.group.WORLD)
    torch.testing.assert_close(out.logits, expected.logits[:, chunk], atol=1e-10, rtol=0)
    torch.testing.assert_close(out.loss, expected.loss, atol=1e-12, rtol=0)
    out.loss.backward()
    for name, parameter in model.named_parameters():
        grad = parameter.grad.clone()
        dist.all_reduce(grad)
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-10, rtol=0, msg=name)


@pytest.mark.parametrize("world", [2])
def test_model_matches_single_process(world):
    run_ranks(world, _check_model, 16)
