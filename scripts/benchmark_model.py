"""LongNetForCausalLM against transformers' LlamaForCausalLM of identical size (SDPA), same process.

(a) Training step (forward + backward) tokens/s and peak memory by context length, each model until a
    step fails or outgrows --max_step_seconds. (b) Generation: time per new token and cache memory with
    a context of each length already in the cache (random keys/values: the cost of a step does not
    depend on their values). Writes ``{out}.json``, ``{out}.md`` and ``{out}.png``.

    python scripts/benchmark_model.py
    python scripts/benchmark_model.py --smoke --out /tmp/model_smoke     # seconds, for the tests
    python scripts/benchmark_model.py --device cuda                      # GPU: bf16, 4K .. 1M
    python scripts/benchmark_model.py --config MODEL_FOLDER              # a trained LongNet's size and branches
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_attention import DTYPES, CudaPeakMemory, PeakMemory, check_device, positive_int  # noqa: E402

from longnet import LongNetCache, LongNetConfig, LongNetForCausalLM  # noqa: E402
from longnet.configuration_longnet import load_longnet_config  # noqa: E402
from longnet.evaluation import report_files  # noqa: E402
from longnet.machine import describe, native_bf16  # noqa: E402

# The models compared: 2 layers of a 12-head, 768-wide decoder; LongNet with the paper's branches.
SIZE = dict(
    vocab_size=4096,
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=2,
    num_attention_heads=12,
    num_key_value_heads=12,
    max_position_embeddings=1 << 21,
)
BRANCHES = dict(segment_lengths=[2048, 4096, 8192, 16384, 32768], dilation_rates=[1, 2, 4, 6, 12])


def build(kind: str, size: dict, branches: dict, dtype: torch.dtype, device: str = "cpu"):
    torch.manual_seed(0)
    if kind == "longnet":
        model = LongNetForCausalLM(LongNetConfig(**size, **branches))
    else:
        model = LlamaForCausalLM(LlamaConfig(**size))
    return model.to(device=device, dtype=dtype)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_training_step(model, length: int, repeats: int) -> tuple[float, list[float], int]:
    """The first step's time (one-time work included: kernel compilation, index building), then the
    steady-state times of ``repeats`` more, and their peak memory."""
    model.train()
    device = model.device
    ids = torch.randint(3, model.config.vocab_size, (1, length), device=device)
    times, peak = [], 0
    for _ in range(repeats + 1):
        with CudaPeakMemory() if device.type == "cuda" else PeakMemory() as memory:
            start = time.perf_counter()
            model(ids, labels=ids, use_cache=False).loss.backward()
            synchronize(device)
            times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
        peak = max(peak, memory.used)
    return times[0], times[1:], peak


def filled_cache(kind: str, model, context: int):
    """A cache holding ``context`` tokens of random keys and values, as decoding would leave it."""
    config = model.config
    dtype = next(model.parameters()).dtype
    if kind == "longnet":
        cache = LongNetCache()
        period = math.lcm(*config.segment_lengths)  # what LongNetModel keeps (LongNetCache's period)
        stored = context % period or period
    else:
        cache = DynamicCache()
        stored = context
    shape = (1, config.num_key_value_heads, stored, config.head_dim)
    for layer in range(config.num_hidden_layers):
        keys, values = (torch.randn(shape, dtype=dtype, device=model.device) for _ in range(2))
        cache.update(keys, values, layer)
    if kind == "longnet":
        for layer in cache.layers:
            layer.dropped = context - stored
    return cache


@torch.no_grad()
def time_generation(kind: str, model, context: int, steps: int) -> tuple[float, int]:
    model.eval()
    cache = filled_cache(kind, model, context)
    token = torch.randint(3, model.config.vocab_size, (1, 1), device=model.device)
    times, held = [], cache_bytes(cache)
    for step in range(steps):
        position = torch.tensor([[context + step]], device=model.device)
        start = time.perf_counter()
        out = model(token, cache=cache, position_ids=position, use_cache=True)
        synchronize(model.device)
        times.append(time.perf_counter() - start)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        held = max(held, cache_bytes(cache))
    return statistics.median(times[1:] if len(times) > 1 else times), held


def cache_bytes(cache) -> int:
    """Memory the cache's tensors hold, buffers' spare room included (each storage counted once). The
    benchmark reports the most it held over the steps: at a context that is a multiple of LongNet's
    period the first step starts a new period and drops the whole cache, so the size after the
    steps alone would read almost 0."""
    storages = {}
    for layer in cache.layers:
        for tensor in (
            layer.keys,
            layer.values,
            getattr(layer, "key_buffer", None),
            getattr(layer, "value_buffer", None),
        ):
            if tensor is not None:
                storage = tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--smoke", action="store_true", help="tiny sizes, seconds")
    source.add_argument(
        "--config", help="a LongNet folder or config JSON: its size and branches instead of the default ones"
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--dtypes", nargs="+", choices=DTYPES, help="cuda: bfloat16; cpu: float32 (+ bfloat16 in hardware)"
    )
    parser.add_argument("--train_lengths", type=positive_int, nargs="+", help="default 2K..64K on cpu, 4K..1M on cuda")
    parser.add_argument("--generation_contexts", type=positive_int, nargs="+", help="default 1K..128K (cuda: ..1M)")
    parser.add_argument(
        "--max_step_seconds",
        type=float,
        default=90.0,
        help="stop a model's sweep before a step projected to take longer",
    )
    parser.add_argument("--repeats", type=positive_int, help="timed training steps per point (default 2)")
    parser.add_argument("--generation_steps", type=positive_int, help="timed one-token steps (default 8)")
    parser.add_argument("--out", help="default docs/benchmarks/model_{device}")
    args = parser.parse_args(argv)
    check_device(parser, args.device)
    if args.config:
        try:
            load_longnet_config(args.config)  # before the re-exec below: a bad path stops at once, in one line
        except (OSError, ValueError) as error:
            parser.error(f"--config: {error}")
    on_cuda = args.device == "cuda"
    contexts = [1000, 4000, 16000, 64000, 128000]
    defaults = {
        "dtypes": ["bfloat16"] if on_cuda else ["float32"] + ["bfloat16"] * native_bf16("cpu"),
        "train_lengths": [1 << p for p in range(12, 21)] if on_cuda else [1 << p for p in range(11, 17)],
        "generation_contexts": contexts + [1000000] if on_cuda else contexts,
        "repeats": 2,
        "generation_steps": 8,
        "out": f"docs/benchmarks/model_{args.device}",
    }
    if args.smoke:  # tiny sizes; flags given still win
        defaults.update(train_lengths=[64, 128], generation_contexts=[64, 200], repeats=1, generation_steps=3)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if argv is None and os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:  # a command line: re-run with it set
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # freed blocks leave: see benchmark_attention.py
        os.execv(sys.executable, [sys.executable, *sys.argv])

    size, branches = dict(SIZE), dict(BRANCHES)
    if args.config:
        config = load_longnet_config(args.config)
        size = {name: getattr(config, name) for name in SIZE}
        branches = {name: getattr(config, name) for name in BRANCHES}
    if args.smoke:
        size.update(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4)
        branches = dict(segment_lengths=[16, 32, 64], dilation_rates=[1, 2, 4])

    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for kind in ("longnet", "llama"):
            model = build(kind, size, branches, dtype, args.device)
            previous = None
            for length in args.train_lengths:
                try:
                    first, times, peak = time_training_step(model, length, args.repeats)
                except (RuntimeError, MemoryError) as error:
                    rows.append(
                        {
                            "dtype": dtype_name,
                            "model": kind,
                            "test": "train",
                            "length": length,
                            "error": str(error)[:200],
                        }
                    )
                    print(f"{dtype_name} {kind} train {length}: failed ({str(error)[:80]})", flush=True)
                    model.zero_grad(set_to_none=True)
                    if on_cuda:
                        torch.cuda.empty_cache()  # what the failed step held, before generation runs
                    break
                median = statistics.median(times)
                rows.append(
                    {
                        "dtype": dtype_name,
                        "model": kind,
                        "test": "train",
                        "length": length,
                        "first_step_s": first,
                        "times_s": times,
                        "median_s": median,
                        "tokens_per_s": length / median,
                        "peak_memory_gb": peak / 1e9,
                    }
                )
                print(
                    f"{dtype_name} {kind} train {length}: {median:.2f} s, {length / median:.0f} tok/s, "
                    f"{peak / 1e9:.2f} GB",
                    flush=True,
                )
                # Project the next (longer) step from the growth seen so far; stop before one too long.
                growth = median / previous if previous else 2.0
                if median * max(growth, 1.0) > args.max_step_seconds:
                    break
                previous = median
            for context in args.generation_contexts:
                seconds, cache_bytes = time_generation(kind, model, context, args.generation_steps)
                rows.append(
                    {
                        "dtype": dtype_name,
                        "model": kind,
                        "test": "generate",
                        "length": context,
                        "seconds_per_token": seconds,
                        "cache_gb": cache_bytes / 1e9,
                    }
                )
                print(
                    f"{dtype_name} {kind} generate at {context}: {seconds * 1000:.1f} ms/token, "
                    f"cache {cache_bytes / 1e9:.3f} GB",
                    flush=True,
                )
            del model

    setup = {
        "machine": describe(args.device),
        "device": args.device,
        "size": size,
        "branches": branches,
        "threads": torch.get_num_threads(),
    }
    files = report_files(Path(args.out))
    files["json"].parent.mkdir(parents=True, exist_ok=True)
    files["json"].write_text(json.dumps({"setup": setup, "rows": rows}, indent=1))
    files["md"].write_text(markdown(rows, setup))
    plot(rows, files["png"])
    print("wrote " + ", ".join(map(str, files.values())))


def markdown(rows: list[dict], setup: dict) -> str:
    lines = [
        f"# LongNetForCausalLM vs LlamaForCausalLM (SDPA), same size, {setup.get('device', 'cpu').upper()}",
        "",
        f"Machine: {setup['machine']}, {setup['threads']} threads. Model: {json.dumps(setup['size'])}; LongNet "
        f"branches {json.dumps(setup['branches'])}. Training: one forward+backward on one sequence, median of "
        "the steps after the first (the first step's time, with one-time work such as kernel compilation and "
        "index building, is reported apart); generation: median time of a one-token step with the context "
        "already cached (random keys/values), cache GB the most the cache held over the steps.",
        "",
        "## Training step",
        "",
        "| dtype | context | LongNet tok/s | Llama tok/s | speed-up | LongNet peak GB | Llama peak GB "
        "| LongNet / Llama first step s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def find(dtype, model, test, length):
        return next(
            (r for r in rows if (r["dtype"], r["model"], r["test"], r["length"]) == (dtype, model, test, length)), None
        )

    for dtype in sorted({r["dtype"] for r in rows}):
        for length in sorted({r["length"] for r in rows if r["test"] == "train"}):
            ln, ll = find(dtype, "longnet", "train", length), find(dtype, "llama", "train", length)

            def cell(row, key, fmt):
                if row is None:
                    return "not run"
                return "failed" if "error" in row else format(row[key], fmt)

            ratio = (
                f"{ln['tokens_per_s'] / ll['tokens_per_s']:.2f}x"
                if ln and ll and "error" not in ln and "error" not in ll
                else ""
            )
            lines.append(
                f"| {dtype} | {length} | {cell(ln, 'tokens_per_s', '.0f')} | {cell(ll, 'tokens_per_s', '.0f')} "
                f"| {ratio} | {cell(ln, 'peak_memory_gb', '.2f')} | {cell(ll, 'peak_memory_gb', '.2f')} "
                f"| {cell(ln, 'first_step_s', '.3f')} / {cell(ll, 'first_step_s', '.3f')} |"
            )
    lines += [
        "",
        "## Generation",
        "",
        "| dtype | context | LongNet ms/token | Llama ms/token | LongNet cache GB | Llama cache GB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for dtype in sorted({r["dtype"] for r in rows}):
        for length in sorted({r["length"] for r in rows if r["test"] == "generate"}):
            ln, ll = find(dtype, "longnet", "generate", length), find(dtype, "llama", "generate", length)
            lines.append(
                f"| {dtype} | {length} | {ln['seconds_per_token'] * 1000:.1f} | "
                f"{ll['seconds_per_token'] * 1000:.1f} | {ln['cache_gb']:.3f} | {ll['cache_gb']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (train_ax, gen_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for dtype, style in (("float32", "--"), ("bfloat16", "-")):
        for model, color in (("longnet", "tab:blue"), ("llama", "tab:red")):
            train = [
                (r["length"], r["tokens_per_s"])
                for r in rows
                if (r["dtype"], r["model"], r["test"]) == (dtype, model, "train") and "error" not in r
            ]
            gen = [
                (r["length"], r["seconds_per_token"] * 1000)
                for r in rows
                if (r["dtype"], r["model"], r["test"]) == (dtype, model, "generate")
            ]
            if train:
                train_ax.plot(*zip(*train, strict=True), style, marker="o", color=color, label=f"{model} {dtype}")
            if gen:
                gen_ax.plot(*zip(*gen, strict=True), style, marker="o", color=color, label=f"{model} {dtype}")
    for ax, title, ylabel in ((train_ax, "training step", "tokens/s"), (gen_ax, "generation", "ms per new token")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
