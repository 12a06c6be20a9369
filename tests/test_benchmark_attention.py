"""The attention benchmark script runs end to end (tiny sizes) and writes its three files."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_attention_smoke(tmp_path):
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
        (n, m, p) for n in (256, 512) for m in ("dilated", "dense") for p in ("forward", "forward+backward")
    }
    assert out.with_suffix(".png").stat().st_size > 0
    assert "| float32 | 512 |" in out.with_suffix(".md").read_text()


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
