"""benchmarks/bench_official.py's measuring parts: phases from a run's own progress output (on a
terminal), NaN and crash detection, per-child peak RSS, the hub cache of tiny judges and the
native-size model copy (the research code is not here)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_official.py"

FAKE = r'''
import sys, time
time.sleep(0.4)                      # set-up
if not sys.stdout.isatty():          # RPO's train.py hides its progress bar off a terminal
    sys.exit(3)
from tqdm import tqdm                # which draws nothing on a terminal without a size
bar = tqdm(range(1, 4), desc="Steps")
for step in bar:
    time.sleep(0.3)
    bar.set_postfix(loss="nan" if "--nan" in sys.argv and step == 3 else "0.5")
time.sleep(0.4)                      # saving
if "--crash" in sys.argv:
    print("\nRuntimeError: Function 'PowBackward0' returned nan values in its 0th output.")
    sys.exit(1)
'''


def load():
    return load_script("benchmarks/bench_official.py")


@pytest.mark.slow
def test_a_run_is_split_into_setup_training_and_after(tmp_path):
    bench = load()
    (tmp_path / "fake.py").write_text(FAKE)
    pattern = re.compile(r"Steps:\s+\d+%\|.*?\|\s*(\d+)/\d+")
    run = bench.execute(bench.Run("fake", [sys.executable, str(tmp_path / "fake.py")], pattern), {})
    assert run.returncode == 0 and run.steps_seen == 3 and not run.nan
    assert 0.6 <= run.setup < 1.5 and 0.45 <= run.training < 1.2 and 0.3 <= run.after < 1.2
    assert abs(run.setup + run.training + run.after - run.total) < 0.05 and run.peak_mb > 1
    crashed = bench.execute(bench.Run("fake", [sys.executable, str(tmp_path / "fake.py"), "--nan", "--crash"], pattern), {})
    assert crashed.returncode == 1 and crashed.nan and "returned nan" in crashed.last_line


@pytest.mark.slow
def test_the_filled_hub_cache_serves_the_tiny_judges_under_the_research_codes_hub_ids(tmp_path):
    cache = load().filled_hub_cache(tmp_path)
    probe = ("import transformers; m = transformers.AlignModel.from_pretrained('kakaobrain/align-base'); "
             "p = transformers.AutoProcessor.from_pretrained('kakaobrain/align-base'); "
             "print(m.config.projection_dim, type(p).__name__)")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["32", "AlignProcessor"]  # the tiny ALIGN, not a download


def test_the_model_copy_has_the_bench_resolution_as_its_native_size(tmp_path):
    from rewardbooth.models.loading import load_components
    from rewardbooth.models.tiny import tiny_model_path

    copy = load().native_size_copy(tiny_model_path("tiny"), 128, tmp_path)
    assert load_components(str(copy)).native_resolution == 128
    assert json.loads((copy / "unet" / "config.json").read_text())["sample_size"] == 64


@pytest.mark.slow
def test_the_shim_can_switch_off_a_scripts_anomaly_detection_and_leaves_it_alone_otherwise(tmp_path):
    """DPG's script turns anomaly detection on and stops at its first NaN; `--no-anomaly-detection`
    lets it run to the end. The script itself is run unchanged (and sees its own argv)."""
    script = tmp_path / "script.py"
    script.write_text("import sys, torch\ntorch.autograd.set_detect_anomaly(True)\n"
                      "print(torch.is_anomaly_enabled(), sys.argv[1:])\n")
    shim = SCRIPT.parent / "official_shims" / "run_official.py"
    for options, enabled in (([], "True"), (["--no-anomaly-detection"], "False")):
        out = subprocess.run([sys.executable, str(shim), *options, str(script), "--x", "1"], capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.split("\n")[-2] == f"{enabled} ['--x', '1']"


SAVED_OUTPUT = """  rpo vs official / official #0: 218.4 s, rc 0, steps 4

2026-12-04, tiny SD-shaped model at 32 px, 4 steps, 8 class images, 1 alternating repeats; seconds, median (range)
| pair | side | total | set-up | training | after | peak RSS MB | finished / NaN | ours / theirs (total) |
| --- | --- | --- | --- | --- | --- | --- | --- | --- |
| rpo vs official | official | 218.4 (210.0-220.0) | 145.2 | 35.7 | 37.5 | 427.3 | 1/1 finished, NaN in 0 |  |
| rpo vs official | rewardbooth | 64.4 | 34.0 | 28.1 | 2.2 | 481.8 | 1/1 finished, NaN in 0 | 0.29 |
| dpg vs official | official | 325.4 | 323.6 | - | 1.9 | 780.0 | 0/2 finished, NaN in 2 |  |
| dpg vs official | rewardbooth | 185.8 | 165.4 | 18.9 | 1.5 | 704.6 | 2/2 finished, NaN in 0 | theirs never finished |
| flux vs diffusers | rewardbooth | 10.6 (9.3-14.1) | 7.4 | 0.6 | 2.6 | 456.9 | 3/3 finished, NaN in 0 | 0.61 | 29.3 (23.9-60.5) | 0.19 |
"""


def test_a_saved_output_is_read_back_and_drawn_as_phases(tmp_path):
    bench = load()
    rows = bench.table_rows(SAVED_OUTPUT)
    assert [(r["pair"], r["side"]) for r in rows] == [("rpo vs official", "official"), ("rpo vs official", "rewardbooth"),
                                                      ("dpg vs official", "official"), ("dpg vs official", "rewardbooth"),
                                                      ("flux vs diffusers", "rewardbooth")]  # with ms / step columns
    assert rows[0]["total"] == 218.4 and rows[0]["setup"] == 145.2 and rows[1]["ratio"] == "0.29" and rows[2]["training"] == 0.0
    assert rows[4]["total"] == 10.6 and rows[4]["ratio"] == "0.61"
    (tmp_path / "out.log").write_text(SAVED_OUTPUT)
    assert bench.main(["--replot", str(tmp_path / "out.log"), "--plot", str(tmp_path / "phases.png")]) == 0
    from PIL import Image

    assert Image.open(tmp_path / "phases.png").size[1] > 200
