#!/usr/bin/env bash
# The checks that need a GPU, as one run of about 6 minutes on a lent machine: the kernel tests
# (their CUDA and compiled-Triton cases run only there), then in one process a sweep of the Triton
# kernels' launch settings and, with the settings it chose, the attention benchmark (triton and sdpa
# paths against dense flash), the model benchmark, torch.compile against eager, and a profile at 32K.
# Writes everything under $OUT (default outputs/cuda): checks.log (machine, tests, sweep, benchmark lines, profile) and the benchmarks'
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
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_dilated_attention.py 2>&1 | tail -40 | tee -a "$OUT/checks.log"

timeout 400 python3 - "$OUT" <<'PY' 2>&1 | tee -a "$OUT/checks.log"
# One process, so that every benchmark runs with the launch settings the sweep chose: the sweep (bf16,
# H = 12, the paper's branches, 32K and 128K), the attention benchmark, the model benchmark, torch.compile
# against eager, a profile at 32K, and the head size 128 benchmark.
import json
import shutil
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, "scripts")
import benchmark_attention
import benchmark_model

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


def sweep(name, head_dim, options, apply, backward, rounds=2):
    """Times every option ``rounds`` times, options alternating (the spread between rounds is the noise),
    applies the one with the least mean and prints all."""
    results = {str(option): [] for option in options}
    for _ in range(rounds):
        for option in options:
            if time.time() > deadline and results[str(option)]:
                continue
            apply(option)
            try:
                results[str(option)].append(sum(median_ms(n, head_dim, backward) for n in (32768, 131072)))
            except Exception as error:  # a setting that does not compile (resources) is dropped
                print(f"D={head_dim} {name} {option} failed: {str(error)[:300]}", flush=True)
    mean = {key: statistics.mean(values) if values else float("inf") for key, values in results.items()}
    best = min(options, key=lambda option: mean[str(option)])
    apply(best)
    print(f"D={head_dim} {name}: {best} (ms, sum of 32K and 128K, per round)", json.dumps(results), flush=True)


# The candidates and what their fields are: FORWARD_CANDIDATES, MERGE_CANDIDATES, BACKWARD_CANDIDATES and
# BACKWARD_FLASH_RATE_CANDIDATES in longnet/dilated_attention_triton.py (the tests check each against the reference).
deadline = time.time() + 140  # the sweep's share of the run; options past it are not tried again
for head_dim in (64, 128):
    sweep("forward", head_dim, triton_path.FORWARD_CANDIDATES[head_dim],
          lambda o: triton_path.FORWARD_CONFIGS.update({head_dim: o}), False)
    if head_dim == 64:
        sweep("merge", head_dim, triton_path.MERGE_CANDIDATES, lambda o: setattr(triton_path, "MERGE_CONFIG", o), False)
    sweep("backward", head_dim, triton_path.BACKWARD_CANDIDATES[head_dim],
          lambda o: triton_path.BACKWARD_CONFIGS.update({head_dim: o}), True)
    sweep("backward flash rate", head_dim, triton_path.BACKWARD_FLASH_RATE_CANDIDATES,
          lambda o: triton_path.BACKWARD_FLASH_RATES.update({head_dim: o}), True)

# Fixed costs at a short length: CPU time to queue a call (no waiting) against the call's wall time.
q, k, v = (torch.randn(1, 12, 8192, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
for backward in (False, True):
    queued, wall = [], []
    for _ in range(21):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = dilated_attention(q, k, v, segments, rates)
        if backward:
            out.backward(torch.ones_like(out))
        queued.append(time.perf_counter() - start)
        torch.cuda.synchronize()
        wall.append(time.perf_counter() - start)
    print(f"8K {'forward+backward' if backward else 'forward'}: CPU to queue {statistics.median(queued) * 1e3:.2f} ms, "
          f"wall {statistics.median(wall) * 1e3:.2f} ms", flush=True)
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(5):
        out = dilated_attention(q, k, v, segments, rates)
        out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
print("8K, 5 x forward+backward, by CPU time")
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), flush=True)


def run_script(module, argv):
    sys.argv = [f"{module.__name__}.py", *argv]
    started = time.time()
    try:
        module.main()
    except Exception as error:  # one benchmark's failure must not hide the others' results
        print(f"{module.__name__} {argv[:4]} failed: {error!r}", flush=True)
    print(f"{module.__name__}: {time.time() - started:.0f} s", flush=True)


lengths = [1 << p for p in (13, 14, 15, 16, 17, 18, 20, 22)]
run_script(benchmark_attention, ["--device", "cuda", "--lengths", *map(str, lengths), "--no_memory_guard",
                                 "--out", f"{out_dir}/attention_cuda"])
run_script(benchmark_model, ["--device", "cuda", "--train_lengths", "32768", "131072", "--repeats", "5",
                             "--generation_contexts", "4096", "65536", "--max_step_seconds", "5",
                             "--out", f"{out_dir}/model_cuda"])

# torch.compile (inductor) against eager: LongNet's training step, bf16, 32K, the model benchmark's size.
for compiled in (False, True):
    try:
        model = benchmark_model.build("longnet", benchmark_model.SIZE, benchmark_model.BRANCHES, torch.bfloat16, "cuda")
        first, times, peak = benchmark_model.time_training_step(torch.compile(model) if compiled else model, 32768, 5)
    except Exception as error:
        print(f"compile check ({compiled=}) failed: {error!r}"[:600], flush=True)
        continue
    median = statistics.median(times)
    print(
        f"LongNet training step, 32K, {'torch.compile' if compiled else 'eager'}: first {first:.2f} s, "
        f"median of 5 {median * 1e3:.1f} ms ({32768 / median:,.0f} tokens/s), peak {peak / 2**30:.2f} GiB",
        flush=True,
    )
    del model
    torch.cuda.empty_cache()

q, k, v = (torch.randn(1, 12, 32768, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))


def step():
    out = dilated_attention(q, k, v, segments, rates)
    out.backward(torch.ones_like(out))


for _ in range(3):
    step()
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(5):
        step()
    torch.cuda.synchronize()
print("dilated attention (auto: triton), bf16, 32K, H=12, D=64, 5 x forward+backward")
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15), flush=True)

run_script(benchmark_attention, ["--device", "cuda", "--head_dim", "128", "--lengths", "32768", "131072",
                                 "--out", "/tmp/attention_cuda_d128"])
shutil.copy("/tmp/attention_cuda_d128.md", out_dir)
PY
