"""The benchmarks run end to end (JAX side, small shapes) and print their tables."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT


def run_benchmark(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run benchmarks/<script> on CPU; fail with its output if it exits non-zero."""
    out = subprocess.run(
        [sys.executable, f"benchmarks/{script}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


@pytest.mark.slow
def test_train_throughput_prints_a_table_with_page_faults() -> None:
    small = ["--rounds", "2", "--steps", "1", "--warmup", "1", "--batch", "2", "--length", "8"]
    out = run_benchmark("train_throughput.py", "--no-torch", *small)
    rows = [line for line in out.stdout.splitlines() if line.startswith("| transformer-jax")]
    assert len(rows) == 1, out.stdout
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert len(cells) == 6, cells
    step_ms = float(cells[1].split()[0])
    tokens_per_s = float(cells[2].replace(",", ""))
    assert step_ms > 0 and tokens_per_s == pytest.approx(2 * 8 / (step_ms / 1e3), rel=0.01, abs=1)
    assert float(cells[5].replace(",", "")) >= 0  # page faults per step


@pytest.mark.slow
def test_memory_benchmark_measures_this_machines_devices() -> None:
    # --topology local is the GPU path of the memory table; on CPU it compiles for the host.
    args = ["--config", "configs/default.py", "--topology", "local", "--lengths", "32,128"]
    out = run_benchmark("memory_vs_length.py", *args, "--remat", "none")
    rows = [line for line in out.stdout.splitlines() if line.startswith("| 32 ")]
    rows += [line for line in out.stdout.splitlines() if line.startswith("| 128 ")]
    assert len(rows) == 2, out.stdout
    temps = []
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[2] == "none" and cells[5] == "yes", cells
        temps.append(float(cells[4]))
    # Same tokens per step in longer rows: attention scores grow with length, so temporaries do.
    assert 0 < temps[0] < temps[1], temps


@pytest.mark.slow
def test_serve_speed_compares_the_engines_on_one_table() -> None:
    pytest.importorskip("ctranslate2")
    out = run_benchmark("serve_speed.py", "--model", "tiny", "--lengths", "4", "8", "--rounds", "1")
    rows = [line for line in out.stdout.splitlines() if line.startswith(("| greedy", "| beam"))]
    assert len(rows) == 4, out.stdout
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        ours, ours_int8, fp32, int8 = (float(c.replace(",", "")) for c in cells[2:6])
        assert min(ours, ours_int8, fp32, int8) > 0
        assert float(cells[6]) == pytest.approx(ours / fp32, rel=0.02, abs=0.01), cells
        assert float(cells[7]) == pytest.approx(ours_int8 / int8, rel=0.02, abs=0.01), cells
        assert float(cells[8]) == pytest.approx(ours_int8 / ours, rel=0.02, abs=0.01), cells
    assert out.stdout.count("cost per token at L=8 vs L=4") == 2
