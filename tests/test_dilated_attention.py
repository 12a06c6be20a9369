"""dilated_attention against a dense N x N reference written from DESIGN.md section 1."""

import importlib

import pytest
import torch
import torch.nn.functional as F
from dense_reference import reference_attention

from longnet import dilated_attention

BACKENDS = ["eager", "cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def device_of(backend: str) -> str:
    return "cuda" if backend == "cuda" else "cpu"


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
    "gqa": (1, 8, 2, 33, 33, [(8, 2), (16, 4)]),
    "mqa": (2, 6, 1, 33, 33, [(4, 1), (16, 4), (64, 8)]),
    "kv-cache-one-query": (2, 4, 2, 1, 53, [(8, 1), (16, 2), (32, 6)]),
    "kv-cache-one-query-mha": (2, 6, 6, 1, 83, [(8, 1), (16, 4), (64, 6), (128, 12)]),  # 82 mod 12 >= 6 heads
    "kv-cache-several-queries": (1, 4, 2, 11, 53, [(8, 1), (16, 2), (32, 6)]),
    "kv-cache-query-spans-segments": (1, 3, 3, 21, 50, [(8, 2), (12, 3)]),
    "single-uncovering-branch": (1, 4, 4, 24, 24, [(8, 2)]),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("is_causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_dense_reference_fp32(backend, is_causal, case):
    batch, heads, kv_heads, q_len, k_len, branches = CASES[case]
    q, k, v = make_inputs(batch, heads, kv_heads, q_len, k_len, 16, torch.float32, device_of(backend))
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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["ragged-length", "w-not-multiple-of-r", "gqa", "kv-cache-several-queries"])
def test_matches_dense_reference_bf16(backend, case):
    batch, heads, kv_heads, q_len, k_len, branches = CASES[case]
    q, k, v = make_inputs(batch, heads, kv_heads, q_len, k_len, 16, torch.bfloat16, device_of(backend))
    segments, rates = zip(*branches, strict=True)
    out, lse = dilated_attention(q, k, v, segments, rates, backend=backend, return_lse=True)
    ref_out, ref_lse = reference_attention(q, k, v, branches, True)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out, atol=BF16_ATOL, rtol=0)
    finite = torch.isfinite(ref_lse)
    # The log-sum-exp is accumulated in float32 from bf16 products: an absolute error of a few
    # 2**-8 relative steps of scores of magnitude ~ sqrt(head_dim) * scale ~ 1.
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], atol=0.03, rtol=0)


def fp64_backends():
    # CUDA's memory-efficient kernel has no float64; it is checked in float32 below.
    return [b for b in BACKENDS if b != "cuda"]


@pytest.mark.parametrize("backend", fp64_backends())
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
            dilated_attention(*inputs, segments, rates, is_causal=is_causal, backend="cuda"), inputs, grad_out
        )
        ref_grads = torch.autograd.grad(reference_attention(*inputs, branches, is_causal)[0], inputs, grad_out.double())
        for grad, ref_grad in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(grad.double(), ref_grad.double(), atol=1e-4, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("is_causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize(
    "branches, length, max_elements",
    [
        ([(64, 1), (128, 2), (256, 4)], 512, 1 << 27),
        ([(64, 1), (128, 2), (256, 4)], 512, 1),  # one flash call per 256 positions
        ([(64, 1), (96, 6), (256, 12)], 500, 1 << 27),  # sequences of unequal lengths, a ragged end
    ],
    ids=["whole-segments", "windows", "ragged"],
)
def test_cuda_bf16_flash_gradients_match_reference(monkeypatch, is_causal, branches, length, max_elements):
    # bf16 takes the packed variable-length flash call; the reference gets the same bf16-rounded
    # inputs in float64. bf16 rounding of probabilities and outputs bounds the relative error of
    # each gradient at a few 2**-8 steps.
    monkeypatch.setattr(importlib.import_module("longnet.dilated_attention"), "MAX_PACKED_ELEMENTS", max_elements)
    inputs = [x.requires_grad_() for x in make_inputs(2, 8, 2, length, length, 64, torch.bfloat16, "cuda")]
    grad_out = torch.randn(2, 8, length, 64, device="cuda", dtype=torch.bfloat16)
    segments, rates = zip(*branches, strict=True)
    grads = torch.autograd.grad(
        dilated_attention(*inputs, segments, rates, is_causal=is_causal, backend="cuda"), inputs, grad_out
    )
    ref_grads = torch.autograd.grad(reference_attention(*inputs, branches, is_causal)[0], inputs, grad_out.double())
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert grad.dtype == torch.bfloat16
        assert (grad.double() - ref_grad).norm() / ref_grad.norm() < 0.02


@pytest.mark.parametrize("backend", fp64_backends())
@pytest.mark.parametrize("is_causal", [True, False], ids=["causal", "bidirectional"])
def test_gradcheck(backend, is_causal):
    inputs = [x.requires_grad_() for x in make_inputs(1, 3, 1, 5, 11, 4, torch.float64)]
    assert torch.autograd.gradcheck(
        lambda q, k, v: dilated_attention(q, k, v, [4, 8], [1, 3], is_causal=is_causal, backend=backend),
        inputs,
    )


@pytest.mark.parametrize("backend", fp64_backends())
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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("is_causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("q_len", [37, 5])
def test_one_dense_branch_equals_sdpa(backend, is_causal, q_len):
    q, k, v = make_inputs(2, 4, 4, q_len, 37, 16, torch.float32, device_of(backend))
    # The queries are the last q_len positions; SDPA's own is_causal aligns them top-left instead.
    t = torch.arange(37 - q_len, 37, device=q.device)
    mask = (torch.arange(37, device=q.device) <= t[:, None]) if is_causal else None
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    for w in (37, 64):
        out = dilated_attention(q, k, v, [w], [1], is_causal=is_causal, backend=backend)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_changing_a_key_never_changes_earlier_outputs(backend):
    branches = ([8, 16, 32], [1, 2, 4])
    q, k, v = make_inputs(1, 4, 2, 48, 48, 8, torch.float32, device_of(backend))
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
    segments, rates = [1024, 4096, 16384], [1, 4, 16]
    q, k, v = [x.requires_grad_() for x in make_inputs(1, 2, 1, n, n, 16, torch.float32)]
    out = dilated_attention(q, k, v, segments, rates, backend="cpu")
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(k.grad).all()
    # Segments never cross a multiple of every w, so the last 16384 positions are an independent
    # problem: check them against the eager reference backend.
    tail = slice(n - 16384, n)
    expected = dilated_attention(q[:, :, tail], k[:, :, tail], v[:, :, tail], segments, rates, backend="eager")
    torch.testing.assert_close(out[:, :, tail], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("q_len", [100, 60], ids=["strided", "gathered"])
def test_chunked_calls_match_one_call(monkeypatch, q_len):
    """Long inputs are cut into several kernel calls per branch (whole sequences on the strided
    path, queries against a longer cache on the gathering one); the result must not change."""
    module = importlib.import_module("longnet.dilated_attention")

    branches = ([8, 16, 64], [1, 2, 6])
    inputs = [x.requires_grad_() for x in make_inputs(2, 4, 2, q_len, 100, 8, torch.float64)]
    grad_out = torch.randn(2, 4, q_len, 8, dtype=torch.float64)
    for is_causal in (True, False):
        whole = dilated_attention(*inputs, *branches, is_causal=is_causal, backend="cpu")
        whole_grads = torch.autograd.grad(whole, inputs, grad_out)
        monkeypatch.setattr(module, "MAX_SLOTS_PER_CALL", 40)
        chunked = dilated_attention(*inputs, *branches, is_causal=is_causal, backend="cpu")
        chunked_grads = torch.autograd.grad(chunked, inputs, grad_out)
        monkeypatch.undo()
        torch.testing.assert_close(chunked, whole, atol=1e-12, rtol=0)
        for a, b in zip(chunked_grads, whole_grads, strict=True):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def _sequence_scores(q, k, start, end, is_causal, scale):
    scores = q[start:end, 0].double() @ k[start:end, 0].double().T * scale
    if is_causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    return scores


def reference_varlen_forward(q, k, v, cu_seqlens, max_len, is_causal, scale):
    """The flash kernel's variable-length forward written out per packed sequence, in float64."""
    outs, lses = [], []
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True):
        scores = _sequence_scores(q, k, start, end, is_causal, scale)
        lses.append(torch.logsumexp(scores, -1))
        outs.append(torch.exp(scores - lses[-1][:, None]) @ v[start:end, 0].double())
    return torch.cat(outs).unsqueeze(1).to(q.dtype), torch.cat(lses)


def reference_varlen_backward(grad_out, q, k, v, out, lse, cu_seqlens, max_len, is_causal, scale):
    """The flash kernel's variable-length backward per packed sequence (softmax gradient against the
    given ``out`` and ``lse``), in float64."""
    grads = [torch.zeros_like(x, dtype=torch.float64) for x in (q, k, v)]
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True):
        rows = slice(start, end)
        q_s, k_s, v_s, out_s, grad_s = (x[rows, 0].double() for x in (q, k, v, out, grad_out))
        probs = torch.exp(_sequence_scores(q, k, start, end, is_causal, scale) - lse[rows, None].double())
        grad_scores = probs * (grad_s @ v_s.T - (grad_s * out_s).sum(-1, keepdim=True))
        grads[0][rows, 0] = grad_scores @ k_s * scale
        grads[1][rows, 0] = grad_scores.T @ q_s * scale
        grads[2][rows, 0] = probs.T @ grad_s
    return tuple(g.to(q.dtype) for g in grads)


@pytest.mark.parametrize("layout", ["bhld", "blhd"])
@pytest.mark.parametrize("max_elements", [1 << 27, 64], ids=["one-call", "windows"])
@pytest.mark.parametrize("is_causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize(
    "case",
    [
        "ragged-length",
        "segment-longer-than-sequence",
        "w-not-multiple-of-r",
        "r-greater-than-heads",
        "gqa",
        "mqa",
        "single-uncovering-branch",
    ],
)
def test_packed_path_matches_reference(monkeypatch, case, is_causal, max_elements, layout):
    """On CUDA, half-precision inputs go through one variable-length flash call over every branch's
    packed sequences. Here that call is a per-sequence float64 stand-in, so the packing, the merge by
    log-sum-exp and the gradient scatter are checked on any machine (windows: several calls; blhd:
    the model's (B, L, H, D) storage read in place)."""
    module = importlib.import_module("longnet.dilated_attention")
    monkeypatch.setattr(module, "_use_packed", lambda query, backend: True)
    monkeypatch.setattr(module, "_flash_varlen_forward", reference_varlen_forward)
    monkeypatch.setattr(module, "_flash_varlen_backward", reference_varlen_backward)
    monkeypatch.setattr(module, "MAX_PACKED_ELEMENTS", max_elements)
    batch, heads, kv_heads, length, _, branches = CASES[case]
    inputs = make_inputs(batch, heads, kv_heads, length, length, 8, torch.float64)
    if layout == "blhd":
        inputs = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in inputs]
    inputs = [x.requires_grad_() for x in inputs]
    out, lse = module._DilatedAttentionFunction.apply(*inputs, branches, is_causal, 8**-0.5, "cuda")
    ref_out, ref_lse = reference_attention(*inputs, branches, is_causal)
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=0)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=1e-10, rtol=0)
    grad_out = torch.randn(batch, length, heads, 8, dtype=torch.float64).transpose(1, 2)
    grads = torch.autograd.grad(out, inputs, grad_out)
    ref_grads = torch.autograd.grad(ref_out, inputs, grad_out)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref_grad, atol=1e-10, rtol=0)


@pytest.mark.parametrize("is_causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize(
    "case",
    ["kv-cache-one-query", "kv-cache-one-query-mha", "kv-cache-several-queries", "kv-cache-query-spans-segments"],
)
@pytest.mark.parametrize("gather_max_queries", [0, 64], ids=["segments", "gathered"])
def test_both_kv_cache_paths_match_reference(monkeypatch, gather_max_queries, case, is_causal):
    """A few queries against a cache go through the gathered (decoding) path, more through the segment
    path; both must equal the reference, outputs and gradients."""
    module = importlib.import_module("longnet.dilated_attention")
    monkeypatch.setattr(module, "GATHER_MAX_QUERIES", gather_max_queries)
    batch, heads, kv_heads, q_len, k_len, branches = CASES[case]
    inputs = [x.requires_grad_() for x in make_inputs(batch, heads, kv_heads, q_len, k_len, 8, torch.float64)]
    segments, rates = zip(*branches, strict=True)
    out, lse = dilated_attention(*inputs, segments, rates, is_causal=is_causal, backend="cpu", return_lse=True)
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


def test_auto_backend_on_cpu_is_fused(monkeypatch):
    module = importlib.import_module("longnet.dilated_attention")

    q, k, v = make_inputs(1, 2, 2, 16, 16, 8, torch.float32)
    calls = []
    forward, backward = module._KERNELS["cpu"]
    monkeypatch.setitem(module._KERNELS, "cpu", (lambda *a: calls.append(1) or forward(*a), backward))
    dilated_attention(q, k, v, [8], [2])
    assert calls


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
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="backend 'cuda' needs cuda tensors"):
            dilated_attention(q, k, v, [4], [1], backend="cuda")
