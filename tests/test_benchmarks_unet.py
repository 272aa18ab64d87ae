"""benchmarks/bench_unet.py on the tiny preset: every variant it can run here is timed, and its
distance from fp32 is measured (zero for fp32's own layout change, small but not zero for bf16)."""

from __future__ import annotations

import pytest
from conftest import load_script


@pytest.mark.slow
def test_bench_unet_times_each_variant_and_measures_how_far_it_moves_the_result(capsys):
    bench = load_script("benchmarks/bench_unet.py")
    assert bench.main(["--resolution", "32", "--repeats", "1", "--warmup", "1", "--variants", "fp32,bf16-autocast,channels-last"]) == 0
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line}
    assert set(rows) == {"variant", "fp32", "bf16-autocast", "channels-last"}
    assert rows["fp32"][1] == "1.00" and all(float(rows[v][0]) > 0 for v in ("fp32", "bf16-autocast", "channels-last"))
    assert float(rows["channels-last"][4]) < 1e-4  # a memory layout: the same numbers up to summation order
    assert 1e-5 < float(rows["bf16-autocast"][4]) < 0.2  # bf16 rounds: moved, but not far
