"""Dilated attention's paths against dense causal SDPA: time, pair rate, GFLOP/s and peak memory by length.

Every method runs in this process on the same inputs, alternating, in the same dtype; the dilated
methods are the paths of ``dilated_attention`` (``backend=``). Timed runs are steady state: on CUDA
one untimed run at the same shape comes first (its time, with compilation and index building, is
reported apart as ``first_call_s``). Writes ``{out}.json``, ``{out}.md`` and ``{out}.png``.

    python scripts/benchmark_attention.py                      # the full run (about an hour on 2 cores)
    python scripts/benchmark_attention.py --lengths 1024 2048 --repeats 1 --out /tmp/smoke
    python scripts/benchmark_attention.py --device cuda        # GPU: bf16, triton and sdpa vs dense flash
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from longnet import dilated_attention
from longnet.evaluation import report_files
from longnet.machine import describe, native_bf16

CUDA_DEFAULTS = {
    "lengths": [1 << p for p in range(13, 23)],
    "dtypes": ["bfloat16"],
    "dense_max_length": 131072,
    "methods": ["triton", "sdpa", "dense"],
}
CPU_METHODS = ["sdpa", "dense"]
METHODS = ("triton", "sdpa", "eager", "dense")  # dilated_attention backends, and dense SDPA
DTYPES = ("float32", "bfloat16", "float16")

PAPER_SEGMENTS = [2048, 4096, 8192, 16384, 32768]
PAPER_RATES = [1, 2, 4, 6, 12]


def dilated_pairs(length: int, heads: int, segments: list[int], rates: list[int]) -> int:
    """(query, key) pairs that causal dilated attention scores, summed over heads and branches."""
    pairs = 0
    for w, r in zip(segments, rates, strict=True):
        for start in range(0, length, w):
            segment = min(w, length - start)
            for head in range(heads):
                kept = max(0, -(-(segment - head % r) // r))
                pairs += kept * (kept + 1) // 2
    return pairs


def flops(pairs: int, head_dim: int, backward: bool) -> int:
    """4*D per pair forward (QK^T and PV); backward does twice that (dQ, dK, dV, dP)."""
    return pairs * 4 * head_dim * (3 if backward else 1)


class PeakMemory:
    """Peak resident memory above the level at entry, sampled from /proc every few milliseconds."""

    def __enter__(self):
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    def _watch(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    @property
    def used(self) -> int:
        return self.peak - self.base


class CudaPeakMemory:
    """Peak allocated GPU memory above the level at entry."""

    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize()
        self.used = torch.cuda.max_memory_allocated() - self.base


def dense_attention(q, k, v):
    """Causal SDPA; on a GPU forced to the flash kernel, the baseline a GPU user would pick."""
    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def run_once(method: str, q, k, v, backward: bool) -> tuple[float, int]:
    """One call of ``method`` ("dense", or a ``dilated_attention`` backend): seconds and peak memory."""
    inputs = [x.detach().requires_grad_(backward) for x in (q, k, v)]
    with CudaPeakMemory() if q.is_cuda else PeakMemory() as memory:
        start = time.perf_counter()
        with torch.set_grad_enabled(backward):
            if method == "dense":
                out = dense_attention(*inputs)
            else:
                out = dilated_attention(*inputs, PAPER_SEGMENTS, PAPER_RATES, is_causal=True, backend=method)
            if backward:
                out.backward(torch.ones_like(out))
        if q.is_cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        del out, inputs
    return elapsed, memory.used


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1 (0 repeats or tokens would fail deep inside a run)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def check_device(parser: argparse.ArgumentParser, device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this machine has no CUDA GPU")


def main(argv: list[str] | None = None) -> None:
    if argv is None and os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:  # a command line: re-run with it set
        # Large blocks through mmap go back to the OS when freed, so resident memory tracks what is
        # live and the peak of one run is not hidden by memory cached from the run before.
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        help="dilated_attention backends and/or dense (cpu: sdpa dense; cuda: triton sdpa dense)",
    )
    parser.add_argument("--lengths", type=positive_int, nargs="+", help="default 8K..1M on cpu, 8K..4M on cuda")
    parser.add_argument(
        "--dtypes", nargs="+", choices=DTYPES, help="cuda: bfloat16; cpu: float32 (+ bfloat16 in hardware)"
    )
    parser.add_argument("--heads", type=positive_int, default=12)
    parser.add_argument("--head_dim", type=positive_int, default=64)
    parser.add_argument("--dense_max_length", type=int, help="longest N for dense SDPA (32K cpu, 128K cuda)")
    parser.add_argument("--repeats", type=positive_int, help="timed runs per point, median reported (3 cpu, 10 cuda)")
    parser.add_argument("--long_repeats", type=positive_int, help="timed runs per point above 64K (1 cpu, 3 cuda)")
    parser.add_argument("--out", help="default docs/benchmarks/attention_{device}")
    parser.add_argument(
        "--no_memory_guard",
        action="store_true",
        help="run every point, even one projected (linearly, so pessimistically) not to fit",
    )
    args = parser.parse_args(argv)
    check_device(parser, args.device)
    on_cuda = args.device == "cuda"
    defaults = {
        "lengths": CUDA_DEFAULTS["lengths"] if on_cuda else [1 << p for p in range(13, 21)],
        "dtypes": CUDA_DEFAULTS["dtypes"] if on_cuda else ["float32"] + ["bfloat16"] * native_bf16("cpu"),
        "dense_max_length": CUDA_DEFAULTS["dense_max_length"] if on_cuda else 32768,
        "repeats": 10 if on_cuda else 3,
        "long_repeats": 3 if on_cuda else 1,
        "out": f"docs/benchmarks/attention_{args.device}",
        "methods": CUDA_DEFAULTS["methods"] if on_cuda else CPU_METHODS,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)

    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for length in args.lengths:
            methods = [m for m in args.methods if m != "dense" or length <= args.dense_max_length]
            generator = torch.Generator(args.device).manual_seed(0)
            q, k, v = (
                torch.randn(1, args.heads, length, args.head_dim, generator=generator, device=args.device).to(dtype)
                for _ in range(3)
            )
            dilated = dilated_pairs(length, args.heads, PAPER_SEGMENTS, PAPER_RATES)
            pairs = {m: args.heads * length * (length + 1) // 2 if m == "dense" else dilated for m in methods}
            repeats = args.repeats if length <= 65536 else args.long_repeats
            for backward in (False, True):
                pass_name = "forward+backward" if backward else "forward"
                fits = [
                    m
                    for m in methods
                    if args.no_memory_guard
                    or projected_memory(rows, dtype_name, m, pass_name, length) <= 0.85 * total_memory(args.device)
                ]
                for method in sorted(set(methods) - set(fits)):
                    print(f"{dtype_name} N={length} {method} {pass_name}: skipped, projected to exceed memory")
                memory = {m: 0 for m in fits}
                first_call = {}
                for method in list(fits):  # warm-up, not timed: on CUDA at the same shape (compilation, index lists)
                    warm = (q, k, v) if on_cuda else (q[:, :, :2048], k[:, :, :2048], v[:, :, :2048])
                    try:
                        first_call[method] = run_once(method, *warm, backward)[0]
                    except torch.OutOfMemoryError:  # a GPU says so (a CPU process would be killed: the guard)
                        print(f"{dtype_name} N={length} {method} {pass_name}: out of memory")
                        fits.remove(method)
                        torch.cuda.empty_cache()
                times = {m: [] for m in fits}
                for _ in range(repeats):
                    for method in fits:  # alternate the methods
                        elapsed, used = run_once(method, q, k, v, backward)
                        times[method].append(elapsed)
                        memory[method] = max(memory[method], used)
                for method in fits:
                    median = statistics.median(times[method])
                    row = {
                        "dtype": dtype_name,
                        "length": length,
                        "method": method,
                        "pass": "forward+backward" if backward else "forward",
                        "times_s": times[method],
                        "median_s": median,
                        "first_call_s": first_call[method],
                        "tokens_per_s": length / median,
                        "gpairs_per_s": pairs[method] / median / 1e9,
                        "gflops": flops(pairs[method], args.head_dim, backward) / 1e9,
                        "gflop_per_s": flops(pairs[method], args.head_dim, backward) / median / 1e9,
                        "peak_memory_gb": memory[method] / 1e9,
                        "input_gb": 3 * q.numel() * q.element_size() / 1e9,
                    }
                    rows.append(row)
                    print(
                        f"{dtype_name:9s} N={length:8d} {method:8s} {row['pass']:17s} "
                        f"{median:9.4f}s {row['tokens_per_s']:10.0f} tok/s {row['gpairs_per_s']:7.1f} Gpair/s "
                        f"{row['gflop_per_s']:9.1f} GFLOP/s "
                        f"{row['peak_memory_gb']:6.2f} GB",
                        flush=True,
                    )
                write_results(rows, args)  # after every point: a run cut short keeps what it measured
            del q, k, v
    print("wrote " + ", ".join(map(str, report_files(Path(args.out)).values())))


def write_results(rows: list[dict], args) -> None:
    files = report_files(Path(args.out))
    files["json"].parent.mkdir(parents=True, exist_ok=True)
    setup = {
        "machine": describe(args.device),
        "heads": args.heads,
        "head_dim": args.head_dim,
        "segment_lengths": PAPER_SEGMENTS,
        "dilation_rates": PAPER_RATES,
        "threads": torch.get_num_threads(),
        "device": args.device,
    }
    files["json"].write_text(json.dumps({"setup": setup, "rows": rows}, indent=1))
    files["md"].write_text(markdown(rows, setup))
    plot(rows, files["png"], setup)


def total_memory(device: str) -> int:
    if device == "cuda":
        return torch.cuda.get_device_properties(0).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def projected_memory(rows: list[dict], dtype: str, method: str, pass_: str, length: int) -> float:
    """Inputs plus the last measured peak of this dtype/method/pass scaled linearly to ``length``: a point
    that would not fit is skipped rather than killed by the kernel's out-of-memory killer."""
    done = [r for r in rows if (r["dtype"], r["method"], r["pass"]) == (dtype, method, pass_)]
    if not done:
        return 0.0
    last = max(done, key=lambda r: r["length"])
    inputs = last["input_gb"] * length / last["length"] if "input_gb" in last else 0.0
    return (last["peak_memory_gb"] * length / last["length"] + inputs) * 1e9


def summary(rows: list[dict]) -> list[str]:
    """The issues' targets, computed from the rows that exist: each dilated path's pair rate against
    dense attention's (same length, or dense's best where dense did not run), its speed against the
    other paths, and its time per token at 1M against 64K."""

    def find(dtype, length, method, pass_="forward+backward"):
        for row in rows:
            if (row["dtype"], row["length"], row["method"], row["pass"]) == (dtype, length, method, pass_):
                return row
        return None

    lines = []
    for dtype in sorted({row["dtype"] for row in rows}):
        dense_rows = [r for r in rows if (r["dtype"], r["method"], r["pass"]) == (dtype, "dense", "forward+backward")]
        dense_best = max((r["gpairs_per_s"] for r in dense_rows if "gpairs_per_s" in r), default=None)
        paths = sorted({r["method"] for r in rows if r["dtype"] == dtype and r["method"] != "dense"})
        for method in paths:
            for length in sorted({r["length"] for r in rows if r["dtype"] == dtype}):
                row, dense = find(dtype, length, method), find(dtype, length, "dense")
                if row is None or "gpairs_per_s" not in row:
                    continue
                parts = [f"{method}: {seconds(row['median_s'])}, {row['gpairs_per_s']:.1f} G pairs/s"]
                if dense is not None:
                    parts.append(
                        f"**{row['gpairs_per_s'] / dense['gpairs_per_s']:.0%}** of dense's pair rate "
                        f"({dense['gpairs_per_s']:.1f}), {dense['median_s'] / row['median_s']:.2f}x faster than dense"
                    )
                elif dense_best:
                    parts.append(
                        f"**{row['gpairs_per_s'] / dense_best:.0%}** of dense's best pair rate ({dense_best:.1f})"
                    )
                for other in paths:
                    other_row = find(dtype, length, other)
                    if other != method and other_row is not None:
                        parts.append(f"{other_row['median_s'] / row['median_s']:.2f}x faster than {other}")
                lines.append(f"- {dtype}, N = {length}, forward+backward: " + "; ".join(parts) + ".")
            small, large = find(dtype, 65536, method), find(dtype, 1 << 20, method)
            if small and large:
                ratio = (large["median_s"] / large["length"]) / (small["median_s"] / small["length"])
                lines.append(
                    f"- {dtype}, {method}, forward+backward time per token at 1M / at 64K: **{ratio:.2f}** "
                    f"(1M tokens in {seconds(large['median_s'])}, "
                    f"peak {large['peak_memory_gb']:.1f} GB above the inputs)."
                )
    return lines


def seconds(value: float) -> str:
    return f"{value:.2f} s" if value >= 1 else f"{value * 1000:.1f} ms"


def markdown(rows: list[dict], setup: dict) -> str:
    if setup.get("device") == "cuda":
        title, memory = "GPU; dense SDPA forced to the flash kernel", "peak allocated GPU memory above the inputs"
        machine = setup["machine"]
    else:
        title = "CPU"
        memory = (
            "peak resident memory above the inputs during the call (the run sets MALLOC_MMAP_THRESHOLD_=65536 "
            "so freed blocks leave)"
        )
        machine = f"{setup['machine']}, {setup['threads']} threads"
    lines = [
        f"# Dilated attention vs dense causal SDPA ({title})",
        "",
        f"Machine: {machine}. Batch 1, H = {setup['heads']}, "
        f"D = {setup['head_dim']}, branches w = {setup['segment_lengths']}, r = {setup['dilation_rates']}.",
        "Median of the timed runs (the first call apart: on CUDA at the same shape, with compilation and index "
        "building; on CPU a 2,048-token warm-up); pairs are the "
        "(query, key) pairs each method must score, causal on both sides; FLOPs count 4·D per pair forward, "
        f"12·D forward+backward; memory is the {memory}. Dilated methods are `dilated_attention` backends.",
        "",
        *summary(rows),
        "",
        "| dtype | N | pass | method | median s | first call s | tokens/s | G pairs/s | GFLOP/s | peak GB |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['dtype']} | {row['length']} | {row['pass']} | {row['method']} | {row['median_s']:.4f} | "
            f"{row.get('first_call_s', float('nan')):.4f} | {row['tokens_per_s']:.0f} | "
            f"{row.get('gpairs_per_s', float('nan')):.1f} | {row['gflop_per_s']:.1f} | {row['peak_memory_gb']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, setup: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({row["dtype"] for row in rows})
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4.5), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes, strict=True):
        colors = {"triton": "tab:green", "sdpa": "tab:blue", "dense": "tab:red", "eager": "tab:gray"}
        for method in sorted({r["method"] for r in rows}):
            color = colors.get(method, "tab:purple")
            for pass_, style in (("forward", "--"), ("forward+backward", "-")):
                points = [
                    (r["length"], r["median_s"])
                    for r in rows
                    if (r["dtype"], r["method"], r["pass"]) == (dtype, method, pass_)
                ]
                if points:
                    ax.plot(*zip(*points, strict=True), style, marker="o", color=color, label=f"{method} {pass_}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel("median time (s)")
        ax.set_title(f"{dtype}, H={setup['heads']}, D={setup['head_dim']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Dilated attention vs dense causal SDPA — {setup['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
