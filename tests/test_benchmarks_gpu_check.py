"""benchmarks/gpu_check.sh --dry-run: every path the GPU check takes, on the CPU with tiny models."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_dry_run_trains_every_method_on_both_shapes_and_samples(tmp_path, capsys):
    check = load_check()
    assert check.main(["--dry-run", "--json", str(tmp_path / "rows.json")]) == 0
    result = json.loads((tmp_path / "rows.json").read_text())
    rows = {(r["model"], r["method"]): r for r in result["training"]}
    assert set(rows) == {(m, k) for m in ("tiny", "tiny-sdxl") for k in ("dreambooth", "rpo", "dpg")}
    for row in rows.values():
        assert row["s_per_step"] > 0 and row["peak_gib"] > 0 and row["tflop_per_step"] > 0 and row["estimate_gib"] > 0
    # RPO's step: the same U-Net batch as DreamBooth's (reference + negative) plus the frozen reference's forward.
    for model in ("tiny", "tiny-sdxl"):
        assert rows[(model, "rpo")]["tflop_per_step"] == pytest.approx(1.5 * rows[(model, "dreambooth")]["tflop_per_step"], rel=0.02)
    assert {s["model"] for s in result["sampling"]} == {"tiny", "tiny-sdxl"} and all(s["images_per_s"] > 0 for s in result["sampling"])
    out = capsys.readouterr().out
    assert "% of card peak" in out and "sampling images/s" in out


def test_the_real_check_refuses_to_run_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--dry-run" in out.stderr
