"""The attention benchmark script runs end to end (tiny sizes) and writes its three files."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_attention_smoke(tmp_path, cpu_bf16_in_hardware):
    out = tmp_path / "attention"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "benchmark_attention.py"),
            "--lengths",
            "256",
            "512",
            "--dtypes",
            "float32",
            "--heads",
            "2",
            "--head_dim",
            "8",
            "--repeats",
            "1",
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    result = json.loads(out.with_suffix(".json").read_text())
    methods = {(row["length"], row["method"], row["pass"]) for row in result["rows"]}
    assert methods == {
        (n, m, p) for n in (256, 512) for m in ("sdpa", "dense") for p in ("forward", "forward+backward")
    }
    assert out.with_suffix(".png").stat().st_size > 0
    assert "| float32 | 512 |" in out.with_suffix(".md").read_text()
    # the report says whether this CPU's bf16 timings would be hardware or emulation
    if cpu_bf16_in_hardware is not None:
        assert ("bf16 in hardware" in result["setup"]["machine"]) == cpu_bf16_in_hardware


BAD_FLAGS = [
    ("benchmark_attention", ["--dtypes", "bf16"], "argument --dtypes: invalid choice: 'bf16'"),
    ("benchmark_attention", ["--methods", "flash"], "argument --methods: invalid choice: 'flash'"),
    ("benchmark_attention", ["--repeats", "0"], "argument --repeats: must be at least 1, got 0"),
    ("benchmark_model", ["--dtypes", "bf16"], "argument --dtypes: invalid choice: 'bf16'"),
    ("benchmark_model", ["--generation_steps", "0"], "argument --generation_steps: must be at least 1, got 0"),
    ("benchmark_model", ["--train_lengths", "-64"], "argument --train_lengths: must be at least 1, got -64"),
]
if not torch.cuda.is_available():
    BAD_FLAGS += [
        (script, ["--device", "cuda"], "--device cuda: this machine has no CUDA GPU")
        for script in ("benchmark_attention", "benchmark_model")
    ]


@pytest.mark.parametrize("script, flags, message", BAD_FLAGS)
def test_a_bad_benchmark_flag_is_one_error_line(script, flags, message, capsys):
    # Each failed deep inside a run (getattr(torch, "bf16"), statistics of no timings, a backend checked after
    # allocation, a CUDA call on a machine without one).
    sys.path.insert(0, str(ROOT / "scripts"))
    with pytest.raises(SystemExit) as stopped:
        importlib.import_module(script).main(flags)
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert stopped.value.code == 2 and message in error and ": error: " in error


def test_dilated_pair_count_matches_brute_force():
    sys.path.insert(0, str(ROOT / "scripts"))
    from benchmark_attention import dilated_pairs

    length, heads, segments, rates = 50, 3, [8, 16, 64], [1, 2, 6]
    brute = 0
    for h in range(heads):
        for w, r in zip(segments, rates, strict=True):
            for t in range(length):
                if (t % w) % r != h % r:
                    continue
                brute += sum(1 for s in range(t + 1) if s // w == t // w and (s % w) % r == h % r)
    assert dilated_pairs(length, heads, segments, rates) == brute


def test_benchmark_model_smoke(tmp_path):
    out = tmp_path / "model.v2"  # a prefix: the dot is part of the name
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "benchmark_model.py"),
            "--smoke",
            "--dtypes",
            "float32",
            "--train_lengths",
            "96",
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    rows = json.loads((tmp_path / "model.v2.json").read_text())["rows"]
    assert {(r["model"], r["test"]) for r in rows} == {
        (m, t) for m in ("longnet", "llama") for t in ("train", "generate")
    }
    assert {r["length"] for r in rows if r["test"] == "train"} == {96}  # a flag given wins over --smoke's
    generate = {r["model"]: r for r in rows if r["test"] == "generate" and r["length"] == 200}
    # The LongNet cache holds at most lcm(16, 32, 64) = 64 positions; Llama's holds all 200.
    assert generate["longnet"]["cache_gb"] < generate["llama"]["cache_gb"] / 2
    assert "| float32 | 96 |" in (tmp_path / "model.v2.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.v2.json", "model.v2.md", "model.v2.png"]


def test_benchmark_model_takes_a_config(tmp_path):
    """--config compares a given LongNet (a trained folder's size and branches) with the Llama of its size."""
    from longnet import LongNetConfig

    config = LongNetConfig(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        segment_lengths=[24, 64],
        dilation_rates=[1, 2],
    )
    config.save_pretrained(tmp_path / "folder")
    out = tmp_path / "model"
    script = str(ROOT / "scripts" / "benchmark_model.py")
    lengths = ["--train_lengths", "64", "--generation_contexts", "320", "--dtypes", "float32"]
    subprocess.run(
        [sys.executable, script, "--config", str(tmp_path / "folder"), *lengths, "--out", str(out)], check=True
    )
    report = json.loads(out.with_suffix(".json").read_text())
    setup = report["setup"]
    assert setup["branches"] == {"segment_lengths": [24, 64], "dilation_rates": [1, 2]}
    assert setup["size"]["hidden_size"] == 32 and setup["size"]["vocab_size"] == 512
    # The model keeps the current period of lcm(24, 64) = 192 positions: 128 of the 320, in a buffer with
    # room for twice that (0.8 of Llama's 320); a period of max(24, 64) would keep 64 (0.4).
    cache = {r["model"]: r["cache_gb"] for r in report["rows"] if r["test"] == "generate"}
    assert 0.6 < cache["longnet"] / cache["llama"] < 1, cache


def test_benchmark_model_refuses_a_config_that_is_not_longnet(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, num_attention_heads=2).save_pretrained(tmp_path / "llama")
    script = str(ROOT / "scripts" / "benchmark_model.py")
    result = subprocess.run(
        [sys.executable, script, "--config", str(tmp_path / "llama"), "--out", str(tmp_path / "model")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith("holds a llama config, not a LongNet one")
    assert not list(tmp_path.glob("model*"))


@pytest.mark.slow  # 21-31 s of process start-up on two cores; the kernel it times is tested in the default run
def test_benchmark_sequence_parallel_smoke(tmp_path):
    out = tmp_path / "sp"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "benchmark_sequence_parallel.py"),
            "--lengths",
            "4096",
            "8192",
            "--world_sizes",
            "1",
            "2",
            "--heads",
            "2",
            "--head_dim",
            "8",
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    by_world = {(r["world"], r["length"]): r for r in rows}
    assert by_world[(1, 4096)]["bytes_forward"] == 0
    assert by_world[(2, 8192)]["bytes_forward"] > 0 and by_world[(2, 8192)]["bytes_backward"] > 0
