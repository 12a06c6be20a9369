"""dilated_attention against a dense N x N reference written from DESIGN.md section 1.

Every path runs here: eager and sdpa on CPU tensors, triton under Triton's interpreter (the test run
sets TRITON_INTERPRET=1 on machines without CUDA, tests/conftest.py), and on a GPU the sdpa and triton
paths on CUDA tensors.
"""

import random

import pytest
import torch
import torch.nn.functional as F
from dense_reference import reference_attention

from longnet import dilated_attention
from longnet import dilated_attention_triton as triton_path
from longnet.dilated_attention import choose_backend

# (backend, device) pairs that run on this machine.
PATHS = [("eager", "cpu"), ("sdpa", "cpu")]
if triton_path.INTERPRETED:
    PATHS.append(("triton", "cpu"))
if torch.cuda.is_available():
    PATHS += [("sdpa", "cuda")] + (
        [("triton", "cuda")] if triton_path.AVAILABLE and not triton_path.INTERPRETED else []
    )
PATH_IDS = [f"{backend}-{device}" for backend, device in PATHS]


def make_inputs(batch, heads, kv_heads, q_len, k_len, head_dim, dtype, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, head_dim, generator=generator, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, k_len, head_dim, generator=generator, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, k_len, head_dim, generator=generator, dtype=torch.float64)
    return [x.to(device=device, dtype=dtype) for x in (q, k, v)]


# (batch, heads, kv_heads, q_len, k_len, branches): each case names what it covers.
CASES = {
    "ragged-length": (2, 4, 4, 45, 45, [(8, 1), (16, 2), (32, 4)]),
    "segment-longer-than-sequence": (1, 4, 2, 30, 30, [(8, 1), (64, 2)]),
    "w-not-multiple-of-r": (1, 6, 6, 70, 70, [(16, 6), (32, 12), (8, 1)]),
    "r-greater-than-heads": (2, 2, 1, 40, 40, [(16, 3), (32, 5)]),
    "r-greater-than-w": (1, 8, 8, 40, 40, [(4, 8), (16, 1)]),  # heads 4-7 keep nothing in the first branch
    "gqa": (1, 8, 2, 33, 33, [(8, 2), (16, 4)]),
    "mqa": (2, 6, 1, 33, 33, [(4, 1), (16, 4), (64, 8)]),
    "kv-cache-one-query": (2, 4, 2, 1, 53, [(8, 1), (16, 2), (32, 6)]),
    "kv-cache-one-query-mha": (2, 6, 6, 1, 83, [(8, 1), (16, 4), (64, 6), (128, 12)]),  # 82 mod 12 >= 6 heads
    "kv-cache-several-queries": (1, 4, 2, 11, 53, [(8, 1), (16, 2), (32, 6)]),
    "kv-cache-query-spans-segments": (1, 3, 3, 21, 50, [(8, 2), (12, 3)]),
    "single-uncovering-branch": (1, 4, 4, 24, 24, [(8, 2)]),
}
EQUAL_LENGTH_CASES = [name for name, case in CASES.items() if case[3] == case[4]]


def path_cases(cases):
    """``(backend, device, case)`` for every path that takes the case (triton: equal lengths only)."""
    return [
        pytest.param(backend, device, case, id=f"{backend}-{device}-{case}")
        for backend, device in PATHS
        for case in cases
        if backend != "triton" or case in EQUAL_LENGTH_CASES
    ]


# Interpreted Triton is checked in float32 by test_triton_matches_reference (gradients too); not again here.
@pytest.mark.parametrize("backend, device, case", [p for p in path_cases(CASES) if p.values[:2] != ("triton", "cpu")])
@pytest.mark.parametrize("is_causal", [True, False], ids=["causal", "bidirectional"])
def test_matches_dense_reference_fp32(backend, device, case, is_causal):
    batch, heads, kv_heads, q_len, k_len, branches = CASES[case]
    q, k, v = make_inputs(batch, heads, kv_heads, q_len, k_len, 16, torch.float32, device)
    segments, rates = zip(*branches, strict=True)
    out, lse = dilated_attention(q, k, v, segments, rates, is_causal=is_causal, backend=backend, return_lse=True)
    ref_out, ref_lse = reference_attention(q, k, v, branches, is_causal)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=0)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], atol=1e-5, rtol=0)


# bf16 keeps 8 significant bits (relative step 2**-8 = 0.0039). The reference gets the same
# bf16-rounded inputs, so the error comes from rounding inside the kernel (probabilities cast to
# bf16 before the product with V, outputs rounded to bf16): each a relative 2**-8 of a value whose
# magnitude is at most max |v| ~ 4 for these normal inputs, so 4 * 4 * 2**-8 ~ 0.06 bounds it.
BF16_ATOL = 0.06


# Triton's interpreter multiplies bf16 wrongly (DESIGN.md section 6): its bf16 runs on a GPU only.
@pytest.mark.parametrize(
    "backend, device, case",
    [
        p
        for p in path_cases(["ragged-length", "w-not-multiple-of-r", "gqa", "kv-cache-several-queries"])
        if p.values[:2] != ("triton", "cpu")
    ],
)
def test_matches_dense_reference_bf16(backend, device, case):
    batch, heads, kv_heads, q_len, k_len, branches = CASES[case]
    q, k, v = make_inputs(batch, heads, kv_heads, q_len, k_len, 16, torch.bfloat16, device)
    segments, rates = zip(*branches, strict=True)
    out, lse = dilated_attention(q, k, v, segments, rates, backend=backend, return_lse=True)
    ref_out, ref_lse = reference_attention(q, k, v, branches, True)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out, atol=BF16_ATOL, rtol=0)
    finite = torch.isfinite(ref_lse)
    # The log-sum-exp is accumulated in float32 from bf16 products: an absolute error of a few
    # 2**-8 relative steps of scores of magnitude ~ sqrt(head_dim) * scale ~ 1.
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], atol=0.03, rtol=0)


# The paths that take float64 (CUDA's memory-efficient kernel and Triton do not; checked in float32).
FP64_BACKENDS = ["eager", "sdpa"]


@pytest.mark.parametrize("backend", FP64_BACKENDS)
@pytest.mark.parametrize("is_causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize(
    "case",
    ["ragged-length", "w-not-multiple-of-r", "gqa", "kv-cache-several-queries", "single-uncovering-branch"],
)
def test_gradients_match_reference_fp64(backend, is_causal, case):
    batch, heads, kv_heads, q_len, k_len, branches = CASES[case]
    inputs = [x.requires_grad_() for x in make_inputs(batch, heads, kv_heads, q_len, k_len, 8, torch.float64)]
    segments, rates = zip(*branches, strict=True)
    grad_out = torch.randn(batch, heads, q_len, 8, dtype=torch.float64)
    out = dilated_attention(*inputs, segments, rates, is_causal=is_causal, backend=backend)
    grads = torch.autograd.grad(out, inputs, grad_out)
    ref_grads = torch.autograd.grad(reference_attention(*inputs, branches, is_causal)[0], inputs, grad_out)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref_grad, atol=1e-10, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gradients_match_reference_fp32():
    batch, heads, kv_heads, q_len, k_len, branches = CASES["w-not-multiple-of-r"]
    inputs = [x.requires_grad_() for x in make_inputs(batch, heads, kv_heads, q_len, k_len, 16, torch.float32, "cuda")]
    segments, rates = zip(*branches, strict=True)
    grad_out = torch.randn(batch, heads, q_len, 16, device="cuda")
    for is_causal in (True, False):
        grads = torch.autograd.grad(
            dilated_attention(*inputs, segments, rates, is_causal=is_causal, backend="sdpa"), inputs, grad_out
        )
        ref_grads = torch.autograd.grad(reference_attention(*inputs, branches, is_causal)[0], inputs, grad_out.double())
        for grad, ref_grad in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(grad.double(), ref_grad.double(), atol=1e-4, rtol=0)


# Triton: every case of the contract, outputs, log-sum-exp and gradients against the reference. On
# CPU through the interpreter in float32 and float16 (its bf16 products are wrong), on a GPU in bfloat16
# and float16. "long" has several 128-row tiles per segment, so whole (unmasked) and diagonal blocks.
TRITON_CASES = {name: CASES[name] for name in EQUAL_LENGTH_CASES} | {"long": (1, 2, 1, 300, 300, [(256, 1), (512, 2)])}
TRITON_DTYPES = [torch.float32, torch.float16] if triton_path.INTERPRETED else [torch.bfloat16, torch.float16]
TRITON_DEVICE = "cuda" if torch.cuda.is_available() and not triton_path.INTERPRETED else "cpu"
HAS_TRITON_PATH = any(backend == "triton" for backend, _ in PATHS)


@pytest.mark.skipif(not HAS_TRITON_PATH, reason="needs triton (and CUDA or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
@pytest.mark.parametrize("is_causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("case", list(TRITON_CASES))
def test_triton_matches_reference(case, is_causal, dtype):
    batch, heads, kv_heads, length, _, branches = TRITON_CASES[case]
    head_dim = 32 if case == "long" else 16
    inputs = make_inputs(batch, heads, kv_heads, length, length, head_dim, dtype, TRITON_DEVICE)
    if case in ("gqa", "ragged-length", "long"):  # the model's (B, L, H, D) storage, read in place
        inputs = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in inputs]
    inputs = [x.requires_grad_() for x in inputs]
    segments, rates = zip(*branches, strict=True)
    out, lse = dilated_attention(*inputs, segments, rates, is_causal=is_causal, backend="triton", return_lse=True)
    ref_out, ref_lse = reference_attention(*inputs, branches, is_causal)
    assert out.dtype == dtype and lse.dtype == torch.float32
    # float32: exact products; half precision: probabilities and outputs rounded to 8 or 11 bits
    # (BF16_ATOL's argument; float16 has 8x finer steps).
    atol = {torch.float32: 1e-5, torch.float16: BF16_ATOL / 8, torch.bfloat16: BF16_ATOL}[dtype]
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=0)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(
        lse.double()[finite], ref_lse[finite], atol=1e-5 if dtype == torch.float32 else 0.03, rtol=0
    )
    grad_out = torch.randn(batch, length, heads, head_dim, dtype=torch.float64).transpose(1, 2).to(out)
    grads = torch.autograd.grad(out, inputs, grad_out)
    ref_grads = torch.autograd.grad(ref_out, inputs, grad_out.double())
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert grad.dtype == dtype and grad.shape == ref_grad.shape
        if dtype == torch.float32:
            torch.testing.assert_close(grad.double(), ref_grad.double(), atol=1e-4, rtol=0)
        else:  # rounding of probabilities and products bounds the relative error at a few 2**-8 steps
            assert (grad.double() - ref_grad.double()).norm() / ref_grad.double().norm() < 0.02


@pytest.mark.skipif(not HAS_TRITON_PATH, reason="needs triton (and CUDA or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("head_dim", [16, 128])
def test_triton_backward_one_head_slice_at_a_time(head_dim, monkeypatch):
    """Long inputs get their float32 accumulators a slice of key/value heads at a time; each slice keeps
    its heads' dilation offsets and GQA groups. Forced here by a 1-byte budget: one key/value head (and
    its query heads) per launch, against the reference. The two head sizes take the two backward orders
    (query gradient inside the key/value loop, and in a loop of its own: BACKWARD_CONFIGS)."""
    # Head size 16 takes the first entry's settings (64's); 128 must take the other order.
    assert triton_path.BACKWARD_CONFIGS[128][4] != next(iter(triton_path.BACKWARD_CONFIGS.values()))[4]
    monkeypatch.setattr(triton_path, "ACCUMULATOR_BYTES", 1)
    dtype = TRITON_DTYPES[0]
    branches = [(32, 1), (64, 2), (96, 3)]
    inputs = make_inputs(2, 6, 3, 100, 100, head_dim, dtype, TRITON_DEVICE)
    inputs = [x.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for x in inputs]
    segments, rates = zip(*branches, strict=True)
    out = dilated_attention(*inputs, segments, rates, backend="triton")
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad_out)
    ref_grads = torch.autograd.grad(reference_attention(*inputs, branches, True)[0], inputs, grad_out.double())
    for grad, ref_grad, tensor in zip(grads, ref_grads, inputs, strict=True):
        assert grad.stride() == tensor.stride()  # laid out like the input
        assert (grad.double() - ref_grad).norm() / ref_grad.norm() < (1e-5 if dtype == torch.float32 else 0.02)


@pytest.mark.skipif(not HAS_TRITON_PATH, reason="needs triton (and CUDA or TRITON_INTERPRET=1)")
# float32 too on CUDA: there the flash kernel does not take it and PyTorch routes the views elsewhere.
@pytest.mark.parametrize("dtype", list(dict.fromkeys([*TRITON_DTYPES, torch.float32])), ids=str)
@pytest.mark.parametrize("is_causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("rate", triton_path.BACKWARD_FLASH_RATE_CANDIDATES[1:])
def test_triton_backward_hands_low_rate_branches_to_the_device_kernel(rate, is_causal, dtype, monkeypatch):
    """The GPU sweep may give the branches of low rates (BACKWARD_FLASH_RATES, every candidate) to the
    device kernel's backward (flash on CUDA, the CPU flash kernel here) and the rest to the Triton kernel,
    both adding into one set of accumulators (rates from 3 on: no Triton launch at all). Against the
    reference, with a ragged last segment, w % r != 0, one head per slice (odd first heads keep their
    dilation offsets), the model's (B, L, H, D) storage, and grouped-query inputs, which stay on the
    Triton kernel: the profiler shows the device kernel's backward ran exactly when it should."""
    monkeypatch.setitem(triton_path.BACKWARD_FLASH_RATES, 16, rate)
    monkeypatch.setattr(triton_path, "ACCUMULATOR_BYTES", 1)
    branches = [(32, 1), (64, 2), (91, 3)]
    segments, rates = zip(*branches, strict=True)
    for kv_heads in (5, 1):
        inputs = make_inputs(2, 5, kv_heads, 100, 100, 16, dtype, TRITON_DEVICE)
        inputs = [x.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for x in inputs]
        out = dilated_attention(*inputs, segments, rates, is_causal=is_causal, backend="triton")
        grad_out = torch.randn_like(out)
        with torch.profiler.profile() as profile:
            grads = torch.autograd.grad(out, inputs, grad_out)
        device_kernel_ran = any(
            "scaled_dot_product" in event.key and "backward" in event.key for event in profile.key_averages()
        )
        assert device_kernel_ran == (kv_heads == 5)
        ref_out = reference_attention(*inputs, branches, is_causal)[0]
        ref_grads = torch.autograd.grad(ref_out, inputs, grad_out.double())
        for grad, ref_grad, tensor in zip(grads, ref_grads, inputs, strict=True):
            assert grad.stride() == tensor.stride()
            assert (grad.double() - ref_grad).norm() / ref_grad.norm() < (1e-5 if dtype == torch.float32 else 0.02)


LAUNCH_CANDIDATES = (
    [("forward", d, c) for d, cs in triton_path.FORWARD_CANDIDATES.items() for c in cs]
    + [("merge", 64, c) for c in triton_path.MERGE_CANDIDATES]
    + [("backward", d, c) for d, cs in triton_path.BACKWARD_CANDIDATES.items() for c in cs]
)


@pytest.mark.skipif(not HAS_TRITON_PATH, reason="needs triton (and CUDA or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("kind, head_dim, candidate", LAUNCH_CANDIDATES, ids=str)
def test_every_launch_setting_the_sweep_may_choose_is_exact(kind, head_dim, candidate, monkeypatch):
    """The GPU sweep (scripts/run_cuda_checks.sh) installs whichever candidate is fastest: each must give
    the reference's output and gradients. Key blocks of 64 and 128 rows over several blocks per segment,
    a ragged last segment, GQA and the model's (B, L, H, D) storage. Interpreted: at head size 16 (the
    settings do not depend on it there; four times faster)."""
    head_dim = 16 if triton_path.INTERPRETED else head_dim
    if kind == "merge":
        monkeypatch.setattr(triton_path, "MERGE_CONFIG", candidate)
    else:
        monkeypatch.setitem(triton_path.FORWARD_CONFIGS if kind == "forward" else triton_path.BACKWARD_CONFIGS,
                            head_dim, candidate)  # fmt: skip
    dtype = TRITON_DTYPES[0]
    branches = [(256, 1), (128, 2)]
    inputs = make_inputs(1, 2, 1, 300, 300, head_dim, dtype, TRITON_DEVICE)
    inputs = [x.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for x in inputs]
    segments, rates = zip(*branches, strict=True)
    out = dilated_attention(*inputs, segments, rates, backend="triton")
    ref_out = reference_attention(*inputs, branches, True)[0]
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad_out)
    ref_grads = torch.autograd.grad(ref_out, inputs, grad_out.double())
    tolerance = 1e-5 if dtype == torch.float32 else 0.02
    assert (out.double() - ref_out).norm() / ref_out.norm() < tolerance
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert (grad.double() - ref_grad).norm() / ref_grad.norm() < tolerance


@pytest.mark.skipif(not HAS_TRITON_PATH, reason="needs triton (and CUDA or TRITON_INTERPRET=1)")
def test_a_backward_key_block_the_query_block_does_not_divide_is_refused(monkeypatch):
    """Such a setting would count the diagonal block's pairs twice: a clear error, not wrong gradients."""
    monkeypatch.setitem(triton_path.BACKWARD_CONFIGS, 16, (128, 32, 4, 3, False, 64))
    inputs = [x.requires_grad_() for x in make_inputs(1, 2, 2, 40, 40, 16, TRITON_DTYPES[0], TRITON_DEVICE)]
    out = dilated_attention(*inputs, [16], [1], backend="triton")
    with pytest.raises(ValueError, match="key block .64. must be a multiple of the query block .128."):
        out.sum().backward()


def random_case(seed: int) -> tuple:
    """A random ``(batch, heads, kv_heads, q_len, k_len, branches, is_causal)``: 1-4 branches with w up to
    40 and r up to 10 (so r > w, r > heads, w % r != 0 and w > L all occur), MHA/GQA/MQA, and a query
    block shorter than the keys (a KV cache) a third of the time."""
    rng = random.Random(seed)
    kv_heads = rng.choice([1, 2, 3])
    heads = kv_heads * rng.choice([1, 2, 3])
    branches = [(rng.randint(1, 40), rng.randint(1, 10)) for _ in range(rng.randint(1, 4))]
    k_len = rng.randint(1, 90)
    q_len = rng.randint(1, k_len) if rng.random() < 1 / 3 else k_len
    return rng.randint(1, 2), heads, kv_heads, q_len, k_len, branches, rng.random() < 0.7


def takes(backend: str, case: tuple) -> bool:
    """Whether a path takes a random case: gathered, query blocks of at most 16; triton, equal lengths."""
    q_len, k_len = case[3], case[4]
    return not ((backend == "gathered" and q_len > 16) or (backend == "triton" and q_len != k_len))


@pytest.mark.parametrize("backend, device", [*PATHS, ("gathered", "cpu")], ids=[*PATH_IDS, "gathered-cpu"])
def test_random_configurations_match_reference(backend, device):
    """Beyond the named cases: random configurations (60 in float64 on the CPU's PyTorch paths, 20 in
    float32 on Triton and CUDA, which take no float64), output, log-sum-exp and gradients against the
    reference."""
    exact = device == "cpu" and backend != "triton"
    dtype, count, tolerance = (torch.float64, 60, 1e-10) if exact else (torch.float32, 20, 1e-4)
    seeds = [seed for seed in range(500) if takes(backend, random_case(seed))][:count]
    assert len(seeds) == count
    for seed in seeds:
        batch, heads, kv_heads, q_len, k_len, branches, is_causal = random_case(seed)
        inputs = [x.requires_grad_() for x in make_inputs(batch, heads, kv_heads, q_len, k_len, 16, dtype, device)]
        segments, rates = zip(*branches, strict=True)
        out, lse = dilated_attention(*inputs, segments, rates, is_causal=is_causal, backend=backend, return_lse=True)
        ref_out, ref_lse = reference_attention(*inputs, branches, is_causal)
        grad_out = torch.randn_like(ref_out)
        grads = torch.autograd.grad(out, inputs, grad_out.to(dtype))
        ref_grads = torch.autograd.grad(ref_out, inputs, grad_out)
        for got, expected in zip((out, *grads), (ref_out, *ref_grads), strict=True):
            torch.testing.assert_close(
                got.double(), expected.double(), atol=tolerance, rtol=0, msg=lambda m, seed=seed: f"seed {seed}: {m}"
            )
        assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), f"seed {seed}"
        finite = torch.isfinite(ref_lse)
        torch.testing.assert_close(lse.double()[finite], ref_lse[finite].detach(), atol=tolerance, rtol=0)


@pytest.mark.parametrize("backend", FP64_BACKENDS)
@pytest.mark.parametrize("is_causal", [True, False], ids=["causal", "bidirectional"])
def test_gradcheck(backend, is_causal):
    inputs = [x.requires_grad_() for x in make_inputs(1, 3, 1, 5, 11, 4, torch.float64)]
    assert torch.autograd.gradcheck(
        lambda q, k, v: dilated_attention(q, k, v, [4, 8], [1, 3], is_causal=is_causal, backend=backend),
        inputs,
    )


@pytest.mark.parametrize("backend", FP64_BACKENDS)
def test_gradient_flows_through_mixing_weights(backend):
    """Gradients that treat the mixing weights S_i / sum S_j as constants differ from the true ones.

    The detached variant below is what torchscale computes; the test first shows that it is far
    from the reference (so the check is sensitive), then that ours matches the reference.
    """
    branches = [(8, 1), (16, 2)]
    inputs = [x.requires_grad_() for x in make_inputs(1, 2, 2, 32, 32, 8, torch.float64)]
    grad_out = torch.randn(1, 2, 32, 8, dtype=torch.float64)
    ref_grads = torch.autograd.grad(reference_attention(*inputs, branches, True)[0], inputs, grad_out)

    outs, lses = [], []
    for w, r in branches:
        out, lse = dilated_attention(*inputs, [w], [r], backend=backend, return_lse=True)
        outs.append(out)
        lses.append(lse)
    weights = torch.softmax(torch.stack(lses), dim=0).detach()
    detached = (weights[..., None] * torch.stack(outs)).sum(0)
    detached_grads = torch.autograd.grad(detached, inputs, grad_out)
    assert max((g - rg).abs().max().item() for g, rg in zip(detached_grads, ref_grads, strict=True)) > 1e-2

    grads = torch.autograd.grad(dilated_attention(*inputs, [8, 16], [1, 2], backend=backend), inputs, grad_out)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref_grad, atol=1e-10, rtol=0)


@pytest.mark.parametrize(
    "backend, device, q_len",
    [(b, d, n) for b, d in PATHS for n in (37, 5) if b != "triton" or n == 37],  # triton: no KV cache
    ids=str,
)
@pytest.mark.parametrize("is_causal", [True, False], ids=["causal", "bidirectional"])
def test_one_dense_branch_equals_sdpa(backend, device, is_causal, q_len):
    q, k, v = make_inputs(2, 4, 4, q_len, 37, 16, torch.float32, device)
    # The queries are the last q_len positions; SDPA's own is_causal aligns them top-left instead.
    t = torch.arange(37 - q_len, 37, device=q.device)
    mask = (torch.arange(37, device=q.device) <= t[:, None]) if is_causal else None
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    for w in (37, 64):
        out = dilated_attention(q, k, v, [w], [1], is_causal=is_causal, backend=backend)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend, device", PATHS, ids=PATH_IDS)
def test_changing_a_key_never_changes_earlier_outputs(backend, device):
    branches = ([8, 16, 32], [1, 2, 4])
    q, k, v = make_inputs(1, 4, 2, 48, 48, 16, torch.float32, device)
    base = dilated_attention(q, k, v, *branches, backend=backend)
    for t in (0, 13, 31, 47):
        k2, v2 = k.clone(), v.clone()
        k2[:, :, t] += 3.0
        v2[:, :, t] -= 3.0
        out = dilated_attention(q, k2, v2, *branches, backend=backend)
        assert torch.equal(out[:, :, :t], base[:, :, :t])
        assert not torch.equal(out[:, :, t:], base[:, :, t:])


def test_long_sequence_without_quadratic_memory():
    """N = 256K: an N x N float32 score matrix per head would need 256 GiB, ten times this machine."""
    n = 1 << 18
    segments, rates = [1024, 4096, 8192], [1, 4, 16]
    q, k, v = [x.requires_grad_() for x in make_inputs(1, 2, 1, n, n, 16, torch.float32)]
    out = dilated_attention(q, k, v, segments, rates, backend="sdpa")
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(k.grad).all()
    # Segments never cross a multiple of every w, so the last 8192 positions are an independent
    # problem: check them against the eager reference backend.
    tail = slice(n - 8192, n)
    expected = dilated_attention(q[:, :, tail], k[:, :, tail], v[:, :, tail], segments, rates, backend="eager")
    torch.testing.assert_close(out[:, :, tail], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("q_len", [100, 60], ids=["strided", "gathered"])
def test_chunked_calls_match_one_call(monkeypatch, q_len):
    """Long inputs are cut into several kernel calls per branch on the sdpa path (whole sequences when
    lengths are equal, gathered copies against a longer cache); the result must not change."""
    import longnet.dilated_attention_sdpa as module

    branches = ([8, 16, 64], [1, 2, 6])
    inputs = [x.requires_grad_() for x in make_inputs(2, 4, 2, q_len, 100, 8, torch.float64)]
    grad_out = torch.randn(2, 4, q_len, 8, dtype=torch.float64)
    for is_causal in (True, False):
        whole = dilated_attention(*inputs, *branches, is_causal=is_causal, backend="sdpa")
        whole_grads = torch.autograd.grad(whole, inputs, grad_out)
        monkeypatch.setattr(module, "MAX_SLOTS_PER_CALL", 40)
        chunked = dilated_attention(*inputs, *branches, is_causal=is_causal, backend="sdpa")
        chunked_grads = torch.autograd.grad(chunked, inputs, grad_out)
        monkeypatch.undo()
        torch.testing.assert_close(chunked, whole, atol=1e-12, rtol=0)
        for a, b in zip(chunked_grads, whole_grads, strict=True):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("is_causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize(
    "case",
    ["kv-cache-one-query", "kv-cache-one-query-mha", "kv-cache-several-queries", "kv-cache-query-spans-segments"],
)
@pytest.mark.parametrize("backend", ["sdpa", "gathered"])
def test_both_kv_cache_paths_match_reference(backend, case, is_causal):
    """A few queries against a cache go through the gathered (decoding) path, more through the sdpa
    path's gathered segments; both must equal the reference, outputs and gradients."""
    batch, heads, kv_heads, q_len, k_len, branches = CASES[case]
    inputs = [x.requires_grad_() for x in make_inputs(batch, heads, kv_heads, q_len, k_len, 8, torch.float64)]
    segments, rates = zip(*branches, strict=True)
    out, lse = dilated_attention(*inputs, segments, rates, is_causal=is_causal, backend=backend, return_lse=True)
    ref_out, ref_lse = reference_attention(*inputs, branches, is_causal)
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=0)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=1e-10, rtol=0)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad_out)
    ref_grads = torch.autograd.grad(ref_out, inputs, grad_out)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref_grad, atol=1e-10, rtol=0)


def test_auto_backend_choice():
    """What ``backend="auto"`` takes (the reasons are in ``choose_backend``'s docstring)."""
    q, k, v = make_inputs(1, 4, 2, 8, 64, 16, torch.float32)
    assert choose_backend(q, k) == "gathered"  # 8 queries against 64 cached keys
    assert choose_backend(k, k) == "sdpa"  # CPU tensors
    assert choose_backend(k.to("meta"), k.to("meta")) == "eager"
    if torch.cuda.is_available():
        half = k.to("cuda", torch.bfloat16)
        expected = "triton" if triton_path.unsupported_reason(half, half) is None else "sdpa"
        assert choose_backend(half, half) == expected
        assert choose_backend(k.cuda(), k.cuda()) == "sdpa"  # float32


@pytest.mark.skipif(not HAS_TRITON_PATH, reason="needs triton (and CUDA or TRITON_INTERPRET=1)")
def test_triton_refuses_what_it_cannot_take():
    q, k, v = make_inputs(1, 4, 2, 8, 64, 16, torch.float32, TRITON_DEVICE)
    with pytest.raises(ValueError, match="backend 'triton' cannot run here: .*one length"):
        dilated_attention(q, k, v, [4], [1], backend="triton")
    q, k, v = make_inputs(1, 4, 2, 8, 8, 24, torch.float32, TRITON_DEVICE)
    with pytest.raises(ValueError, match="head sizes"):
        dilated_attention(q, k, v, [4], [1], backend="triton")


@pytest.mark.parametrize(
    "segments, rates, message",
    [
        ([], [], "segment_lengths must not be empty"),
        ([8], [], "dilation_rates must not be empty"),
        ([8, 16], [1], "same length"),
        ([8, 0], [1, 2], "segment_lengths must hold positive integers"),
        ([8], [-1], "dilation_rates must hold positive integers"),
        ([8.5], [1], "segment_lengths must hold positive integers"),
        ([8], [True], "dilation_rates must hold positive integers"),
        ("8", [1], "segment_lengths must be a list"),
        (8, [1], "segment_lengths must be a list"),
    ],
)
def test_bad_branches_raise(segments, rates, message):
    q, k, v = make_inputs(1, 2, 2, 8, 8, 4, torch.float32)
    with pytest.raises(ValueError, match=message):
        dilated_attention(q, k, v, segments, rates)


def test_bad_tensors_raise():
    q, k, v = make_inputs(1, 4, 2, 8, 8, 4, torch.float32)
    cases = [
        ((q[0], k, v), "query must have 4 dimensions"),
        ((q, k[0], v), "key must have 4 dimensions"),
        ((q, k, v[..., :2]), "key and value must have the same shape"),
        ((q, k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1)), "same batch size"),
        ((q, k[..., :2], v[..., :2]), "same head_dim"),
        ((q[:, :3], k, v), "multiple of the number of key/value heads"),
        ((torch.cat([q, q], 2), k, v), "must not exceed key length"),
        ((q, k.double(), v.double()), "one dtype"),
        ((q, k.long(), v.long()), "floating-point"),
        ((q, k.to("meta"), v.to("meta")), "one device"),
        ((q[:, :, :0], k, v), "must not be empty"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            dilated_attention(*args, [4], [1])
    with pytest.raises(ValueError, match="unknown backend 'flash'"):
        dilated_attention(q, k, v, [4], [1], backend="flash")
    with pytest.raises(ValueError, match="backend 'sdpa' needs CPU or CUDA tensors"):
        dilated_attention(q.to("meta"), k.to("meta"), v.to("meta"), [4], [1], backend="sdpa")
    with pytest.raises(ValueError, match="backend 'gathered' takes at most 32 queries"):
        dilated_attention(*make_inputs(1, 2, 2, 40, 40, 4, torch.float32), [4], [1], backend="gathered")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"scale": 0.0}, "scale must be a positive finite number"),
        ({"scale": -1.0}, "scale must be a positive finite number"),
        ({"scale": float("nan")}, "scale must be a positive finite number"),
        ({"scale": float("inf")}, "scale must be a positive finite number"),
        ({"scale": "0.5"}, "scale must be a positive finite number"),
        ({"is_causal": 1}, "is_causal must be a bool"),
        ({"is_causal": None}, "is_causal must be a bool"),
    ],
)
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_bad_arguments_raise(backend, kwargs, message):
    q, k, v = make_inputs(1, 2, 2, 8, 8, 4, torch.float32)
    with pytest.raises(ValueError, match=message):
        dilated_attention(q, k, v, [4], [1], backend=backend, **kwargs)


def test_absurd_segment_length_raises_before_allocating():
    q, k, v = make_inputs(1, 2, 2, 8, 8, 4, torch.float32)
    with pytest.raises(ValueError, match="segment_lengths must hold integers below 2\\*\\*31"):
        dilated_attention(q, k, v, [2**40], [1])


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_fused_operator_passes_torch_library_opcheck(backend):
    """The fused paths are custom operators (what torch.compile calls as one node): PyTorch's own checks of
    their schema, fake implementation (shapes, dtypes, strides against the real outputs), autograd
    registration and dispatch, on inputs in the model's (B, L, H, D) storage and contiguous ones."""
    from longnet.dilated_attention import fused_attention

    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    q, k, v = make_inputs(1, 4, 2, 40, 40, 16, torch.float32, device=device)
    transposed = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v)]
    for inputs in ([q, k, v], transposed):
        inputs = [x.requires_grad_() for x in inputs]
        torch.library.opcheck(fused_attention, (*inputs, [8, 16], [1, 2], True, 0.25, backend))


def test_writing_gradients_is_refused_for_branches_that_do_not_cover_every_position():
    """add_strided_gradients(assign=True) writes instead of adding: only a single branch of rate 1 covers
    every position once; anything else would leave rows unwritten, so it is a clear error."""
    from longnet.dilated_attention_sdpa import add_strided_gradients

    q, k, v = make_inputs(1, 2, 2, 16, 16, 8, torch.float32)
    lse = torch.zeros(1, 2, 16)
    gradients = [torch.zeros_like(q) for _ in range(3)]
    for branches in ([(8, 2)], [(8, 1), (16, 1)]):
        with pytest.raises(ValueError, match="assign takes one branch of rate 1"):
            add_strided_gradients(q, k, v, q, lse, q, gradients, branches, True, 0.3, assign=True)
        assert all(not gradient.any() for gradient in gradients)  # nothing written
