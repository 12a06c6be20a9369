#!/usr/bin/env bash
# The checks that need a GPU, as one run on a lent machine (see docs/benchmarks/attention_cuda.md):
# the kernel tests (their CUDA cases run only there), the CUDA attention benchmark, and a profile of
# dilated attention at 32K. Writes everything under $OUT (default outputs/cuda).
#   bash scripts/run_cuda_checks.sh
# A newer transformers than the machine has can travel as a wheel in .whl/ (installed to /tmp/site).
set -uo pipefail
OUT=${OUT:-outputs/cuda}
mkdir -p "$OUT"
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/machine.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_dilated_attention.py 2>&1 | tee "$OUT/tests.log"
timeout 240 python3 scripts/benchmark_attention.py --device cuda --out "$OUT/attention_cuda" 2>&1 | tee "$OUT/benchmark.log"
timeout 150 python3 - <<'PY' 2>&1 | tee "$OUT/profile.txt"
# Packed variable-length flash call (the default for bf16) against the strided path (one flash call per
# branch and head residue, the method before it), same process; then a profile of the packed one at 32K.
import importlib
import statistics

import torch
from torch.profiler import ProfilerActivity, profile

from longnet import dilated_attention

module = importlib.import_module("longnet.dilated_attention")
segments, rates = [2048, 4096, 8192, 16384, 32768], [1, 2, 4, 6, 12]


def step(q, k, v):
    out = dilated_attention(q, k, v, segments, rates, is_causal=True)
    out.backward(torch.ones_like(out))


def median_ms(length, runs=15):
    q, k, v = (
        torch.randn(1, 12, length, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)
    )
    for _ in range(3):
        step(q, k, v)
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(q, k, v)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


lengths = [32768, 131072, 1048576]
packed = {n: median_ms(n) for n in lengths}
use_packed = module._use_packed
module._use_packed = lambda query, backend: False
strided = {n: median_ms(n) for n in lengths}
module._use_packed = use_packed
print("bf16, H=12, D=64, forward+backward, median ms of 15")
print("| N | packed ms | strided ms | strided / packed |")
for n in lengths:
    print(f"| {n} | {packed[n]:.2f} | {strided[n]:.2f} | {strided[n] / packed[n]:.2f} |")

q, k, v = (torch.randn(1, 12, 32768, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(5):
        step(q, k, v)
    torch.cuda.synchronize()
print("dilated attention (packed), bf16, 32K, H=12, D=64, 5 x forward+backward")
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
PY
