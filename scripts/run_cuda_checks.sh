#!/usr/bin/env bash
# The checks that need a GPU, as one run of at most about 6 minutes on a lent machine: the kernel tests
# (their CUDA and compiled-Triton cases run only there), a sweep of the Triton kernels' launch settings,
# the attention benchmark (triton and sdpa paths against dense flash, same process, with the settings
# the sweep chose), the model benchmark, and a profile at 32K. Writes everything under $OUT (default
# outputs/cuda): checks.log (machine, tests, sweep, benchmark lines, profile) and the benchmarks'
# attention_cuda.{json,md,png}, attention_cuda_d128.md and model_cuda.{json,md,png}, at most 8 files
# (what a lent machine sends back); docs/benchmarks/ holds the committed copies.
#   bash scripts/run_cuda_checks.sh
# A newer transformers than the machine has can travel as a wheel in .whl/ (installed to /tmp/site).
set -uo pipefail
OUT=${OUT:-outputs/cuda}
mkdir -p "$OUT"
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 MALLOC_MMAP_THRESHOLD_=65536
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/checks.log"
timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/test_dilated_attention.py 2>&1 | tail -40 | tee -a "$OUT/checks.log"

timeout 260 python3 - "$OUT" <<'PY' 2>&1 | tee -a "$OUT/checks.log"
# Sweep the Triton launch settings (bf16, H = 12, the paper's branches, 32K and 128K), keep the fastest,
# then run the attention benchmark in this process with them.
import json
import shutil
import statistics
import sys
import time

import torch

sys.path.insert(0, "scripts")
import benchmark_attention

from longnet import dilated_attention
from longnet import dilated_attention_triton as triton_path

out_dir = sys.argv[1]
segments, rates = benchmark_attention.PAPER_SEGMENTS, benchmark_attention.PAPER_RATES


def median_ms(length, head_dim, backward, runs=7):
    q, k, v = (
        torch.randn(1, 12, length, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
        for _ in range(3)
    )
    times = []
    for i in range(runs + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = dilated_attention(q, k, v, segments, rates, backend="triton")
        if backward:
            out.backward(torch.ones_like(out))
        end.record()
        torch.cuda.synchronize()
        if i:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


OPTIONS = {  # (key block, warps, stages); (query block, key block, warps, stages)
    64: (
        [(64, 4, 3), (64, 4, 2), (64, 8, 3), (128, 4, 3), (128, 8, 3), (128, 8, 2)],
        [(32, 32, 4, 3), (32, 32, 4, 2), (64, 64, 4, 2), (64, 64, 8, 2), (32, 64, 4, 3), (32, 32, 8, 3)],
    ),
    128: ([(64, 8, 3), (64, 8, 2), (128, 8, 2)], [(32, 32, 8, 3), (32, 32, 8, 2), (64, 64, 8, 2)]),
}
deadline = time.time() + 110  # the sweep's share of the run; options past it are not tried
sweep = {}
for head_dim, (forward_options, backward_options) in OPTIONS.items():
    results = {"forward": {}, "backward": {}}
    for option in forward_options:
        if time.time() > deadline and results["forward"]:
            break
        triton_path.FORWARD_CONFIGS[head_dim] = option
        try:
            results["forward"][str(option)] = sum(median_ms(n, head_dim, False) for n in (32768, 131072))
        except Exception as error:  # a setting that does not compile (resources) is dropped
            print(f"D={head_dim} forward {option} failed: {str(error)[:300]}", flush=True)
    best_forward = min(forward_options, key=lambda o: results["forward"].get(str(o), float("inf")))
    triton_path.FORWARD_CONFIGS[head_dim] = best_forward
    for option in backward_options:
        if time.time() > deadline and results["backward"]:
            break
        triton_path.BACKWARD_CONFIGS[head_dim] = option
        try:
            results["backward"][str(option)] = sum(median_ms(n, head_dim, True) for n in (32768, 131072))
        except Exception as error:
            print(f"D={head_dim} backward {option} failed: {str(error)[:300]}", flush=True)
    best_backward = min(backward_options, key=lambda o: results["backward"].get(str(o), float("inf")))
    triton_path.BACKWARD_CONFIGS[head_dim] = best_backward
    sweep[head_dim] = {"results": results, "forward": best_forward, "backward": best_backward}
    print(f"D={head_dim}: forward {best_forward}, backward {best_backward}", json.dumps(results, indent=1), flush=True)

lengths = [1 << p for p in (13, 14, 15, 16, 17, 18, 20, 22)]
sys.argv = ["benchmark_attention.py", "--device", "cuda", "--lengths", *map(str, lengths)]
sys.argv += ["--out", f"{out_dir}/attention_cuda"]
benchmark_attention.main()
sys.argv = ["benchmark_attention.py", "--device", "cuda", "--head_dim", "128", "--lengths", "32768", "131072",
            "--out", "/tmp/attention_cuda_d128"]
benchmark_attention.main()
shutil.copy("/tmp/attention_cuda_d128.md", out_dir)
PY

timeout 75 python3 scripts/benchmark_model.py --device cuda --train_lengths 32768 131072 --repeats 5 \
    --generation_contexts 4096 65536 --max_step_seconds 5 --out "$OUT/model_cuda" 2>&1 | tee -a "$OUT/checks.log"

timeout 150 python3 - <<'PY' 2>&1 | tee -a "$OUT/checks.log"
# torch.compile (inductor) against eager: LongNet's training step, bf16, 32K, the model benchmark's size.
import statistics
import sys

import torch

sys.path.insert(0, "scripts")
from benchmark_model import BRANCHES, SIZE, build, time_training_step

for compiled in (False, True):
    model = build("longnet", SIZE, BRANCHES, torch.bfloat16, "cuda")
    first, times, peak = time_training_step(torch.compile(model) if compiled else model, 32768, 5)
    median = statistics.median(times)
    print(
        f"LongNet training step, 32K, {'torch.compile' if compiled else 'eager'}: first {first:.2f} s, "
        f"median of 5 {median * 1e3:.1f} ms ({32768 / median:,.0f} tokens/s), peak {peak / 2**30:.2f} GiB",
        flush=True,
    )
PY

timeout 30 python3 - <<'PY' 2>&1 | tee -a "$OUT/checks.log"
import torch
from torch.profiler import ProfilerActivity, profile

from longnet import dilated_attention

q, k, v = (torch.randn(1, 12, 32768, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))


def step():
    out = dilated_attention(q, k, v, [2048, 4096, 8192, 16384, 32768], [1, 2, 4, 6, 12])
    out.backward(torch.ones_like(out))


for _ in range(3):
    step()
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(5):
        step()
    torch.cuda.synchronize()
print("dilated attention (auto: triton), bf16, 32K, H=12, D=64, 5 x forward+backward")
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20))
PY
