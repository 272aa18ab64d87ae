"""benchmarks/gpu_check.sh --dry-run: every path the GPU check takes, on the CPU with tiny models."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


def load_check():
    return load_script("benchmarks/gpu_check.py")


@pytest.mark.slow
def test_dry_run_trains_every_method_on_every_shape_and_base_and_samples(tmp_path, capsys):
    check = load_check()
    assert check.main(["--dry-run", "--json", str(tmp_path / "rows.json")]) == 0
    result = json.loads((tmp_path / "rows.json").read_text())
    rows = {(r["model"], r["base"], r["method"]): r for r in result["training"]}
    methods = ("dreambooth", "rpo", "dpg")
    unets = {(m, "fp32", k) for m in ("tiny", "tiny-sdxl") for k in methods}
    flows = {(m, base, k) for m in ("tiny-flux", "tiny-sd3") for base in ("fp32", "int8") for k in methods}
    klein = {("tiny-flux2", "fp32", k) for k in methods}  # FLUX.2 [klein] 4B: bf16 only (8.9 GiB estimated with checkpointing)
    zimage = {("tiny-zimage", "fp32", k) for k in methods}  # Z-Image 6B: bf16 only too
    qwenimage = {("tiny-qwenimage", "fp32", k) for k in methods}  # Qwen-Image 20B: bf16 only too
    assert set(rows) == unets | flows | klein | zimage | qwenimage
    for row in rows.values():
        assert row["s_per_step"] > 0 and row["peak_gib"] > 0 and row["tflop_per_step"] > 0 and row["estimate_gib"] > 0
    # RPO's step: the same denoiser batch as DreamBooth's (reference + negative) plus the frozen reference's forward.
    for model, base, _ in rows:
        assert rows[(model, base, "rpo")]["tflop_per_step"] == pytest.approx(1.5 * rows[(model, base, "dreambooth")]["tflop_per_step"], rel=0.02)
    for model in ("tiny-flux", "tiny-sd3"):  # flow models train at their check size, the int8 base really quantized
        assert {(rows[(model, base, k)]["resolution"], rows[(model, base, k)]["checkpointing"])
                for base in ("fp32", "int8") for k in methods} == {(check.DRY_FLOW_PX, True)}
        assert rows[(model, "int8", "dreambooth")]["estimate_gib"] < rows[(model, "fp32", "dreambooth")]["estimate_gib"]
    assert {s["model"] for s in result["sampling"]} == {"tiny", "tiny-sdxl"} and all(s["images_per_s"] > 0 for s in result["sampling"])
    out = capsys.readouterr().out
    assert "% of card peak" in out and "sampling images/s" in out


def test_every_default_model_has_a_real_size_and_a_dry_run_preset():
    from rewardbooth.models.tiny_flow import FLOW_PRESETS

    check = load_check()
    keys = [key.removesuffix(check.INT8) for key in check.MODELS.split(",")]
    assert {"flux", "sd35"} <= set(keys) and set(keys) <= set(check.FULL) & set(check.DRY)
    assert {"flux-int8", "sd35-int8"} <= set(check.MODELS.split(","))
    assert all(not FLOW_PRESETS[check.FULL[key]].tiny and FLOW_PRESETS[check.DRY[key]].tiny for key in check.FLOW)


def test_the_real_check_refuses_to_run_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--dry-run" in out.stderr
