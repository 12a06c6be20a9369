"""Sequence-parallel dilated attention on CPU processes (gloo): bytes each rank sends, and time.

For every world size P and global length N, P processes each hold N/P positions (H = 12, D = 64, the
paper's branches) and run one causal attention layer forward and backward. Bytes are counted where
the tensors are handed to torch.distributed (``longnet.sequence_parallel.BYTES_SENT``), the largest
over the ranks. Writes ``{out}.json``, ``{out}.md`` and ``{out}.png``.

    python scripts/benchmark_sequence_parallel.py
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from longnet import dilated_attention
from longnet import sequence_parallel as sp
from longnet.evaluation import report_files
from longnet.machine import describe

SEGMENTS, RATES = [2048, 4096, 8192, 16384, 32768], [1, 2, 4, 6, 12]


def worker(rank, world, port, lengths, heads, head_dim, repeats, threads, result_file):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = []
    for length in lengths:
        local = length // world
        q, k, v = (torch.randn(1, heads, local, head_dim, requires_grad=True) for _ in range(3))
        times, sent = [], {}
        for _ in range(repeats):
            sp.BYTES_SENT.update(forward=0, backward=0)
            dist.barrier()
            start = time.perf_counter()
            out = dilated_attention(q, k, v, SEGMENTS, RATES, group=dist.group.WORLD)
            out.backward(torch.ones_like(out))
            dist.barrier()
            times.append(time.perf_counter() - start)
            sent = dict(sp.BYTES_SENT)
        counts = torch.tensor([sent["forward"], sent["backward"]], dtype=torch.float64)
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)
        results.append(
            {
                "world": world,
                "length": length,
                "local_length": local,
                "median_s": statistics.median(times),
                "times_s": times,
                "bytes_forward": int(counts[0]),
                "bytes_backward": int(counts[1]),
            }
        )
    if rank == 0:
        Path(result_file).write_text(json.dumps(results))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768, 65536, 131072])
    parser.add_argument("--world_sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default="docs/benchmarks/sequence_parallel_cpu")
    args = parser.parse_args()

    rows = []
    for world in args.world_sizes:
        threads = max(1, (os.cpu_count() or 1) // world)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with tempfile.NamedTemporaryFile(suffix=".json") as result:
            mp.spawn(
                worker,
                args=(world, port, args.lengths, args.heads, args.head_dim, args.repeats, threads, result.name),
                nprocs=world,
                join=True,
            )
            for row in json.loads(Path(result.name).read_text()):
                row["threads_per_process"] = threads
                rows.append(row)
                print(
                    f"P={world} N={row['length']}: {row['median_s']:.2f} s, sent per rank "
                    f"{row['bytes_forward'] / 1e6:.2f} MB forward, {row['bytes_backward'] / 1e6:.2f} MB backward",
                    flush=True,
                )

    files = report_files(Path(args.out))
    files["json"].parent.mkdir(parents=True, exist_ok=True)
    setup = {
        "machine": describe("cpu"),
        "heads": args.heads,
        "head_dim": args.head_dim,
        "segment_lengths": SEGMENTS,
        "dilation_rates": RATES,
    }
    files["json"].write_text(json.dumps({"setup": setup, "rows": rows}, indent=1))
    lines = [
        "# Sequence-parallel dilated attention: bytes sent per rank and time (CPU, gloo)",
        "",
        f"Machine: {setup['machine']}. One causal dilated attention layer, forward + backward, float32, batch 1, "
        f"H = {args.heads}, D = {args.head_dim}, w = {SEGMENTS}, r = {RATES}. Bytes: the most any rank sent.",
        "",
        "| processes | N | positions per rank | MB sent forward | MB sent backward | time s |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['world']} | {row['length']} | {row['local_length']} | {row['bytes_forward'] / 1e6:.2f} | "
            f"{row['bytes_backward'] / 1e6:.2f} | {row['median_s']:.2f} |"
        )
    files["md"].write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bytes_ax, time_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for world in args.world_sizes:
        points = [r for r in rows if r["world"] == world]
        lengths = [r["length"] for r in points]
        bytes_ax.plot(
            lengths,
            [(r["bytes_forward"] + r["bytes_backward"]) / 1e6 for r in points],
            marker="o",
            label=f"{world} processes",
        )
        time_ax.plot(lengths, [r["median_s"] for r in points], marker="o", label=f"{world} processes")
    for ax, label in ((bytes_ax, "MB sent per rank (forward + backward)"), (time_ax, "seconds (forward + backward)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("global sequence length N")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(files["png"], dpi=110)
    print("wrote " + ", ".join(map(str, files.values())))


if __name__ == "__main__":
    main()
