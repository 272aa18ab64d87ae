"""benchmarks/bench_steps.py end to end: floor and DreamBooth each in a subprocess, then the table."""

from __future__ import annotations

import pytest
from conftest import load_script


def load_bench():
    return load_script("benchmarks/bench_steps.py")


@pytest.mark.slow
def test_bench_steps_prints_floor_and_method_rows(capsys):
    bench = load_bench()
    assert bench.main(["--methods", "dreambooth", "--steps", "4", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] in (["floor"], ["dreambooth"])}
    assert set(rows) == {"floor", "dreambooth"}
    # columns: method, s/step, min, iqr, x floor, x dreambooth, peak MB, x floor, x dreambooth
    assert rows["floor"][4] == "1.00" and rows["dreambooth"][5] == "1.00"
    assert float(rows["dreambooth"][1]) > 0 and float(rows["dreambooth"][6]) > 0
    assert "32 px" in out and "peak RSS" in out


def test_unknown_method_is_refused(capsys):
    assert load_bench().main(["--methods", "nope"]) == 2
    assert "unknown method" in capsys.readouterr().err
