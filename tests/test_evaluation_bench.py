"""evaluate and the DreamBench harness on the tiny presets (real DreamBench images)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from rewardbooth.cli import main

TINY_JUDGES = ["--dino-model", "tiny", "--clip-model", "tiny", "--device", "cpu"]


def test_evaluate_identical_images_score_one(tmp_path, capsys, dreambench_root):
    refs, images = tmp_path / "refs", tmp_path / "images"
    refs.mkdir(), images.mkdir()
    shutil.copy(dreambench_root / "dog" / "00.jpg", refs / "00.jpg")
    shutil.copy(dreambench_root / "dog" / "00.jpg", images / "a.jpg")
    out = tmp_path / "scores.json"
    assert main(["evaluate", "--images", str(images), "--references", str(refs), "--prompt", "a sks dog",
                 "--output", str(out), *TINY_JUDGES]) == 0
    printed = capsys.readouterr().out
    assert "1 images" in printed and "dino=tiny" in printed
    overall = json.loads(out.read_text())["overall"]
    assert overall["dino"] == pytest.approx(1.0, abs=1e-5) and overall["clip_i"] == pytest.approx(1.0, abs=1e-5)
    assert -1.0 <= overall["clip_t"] <= 1.0


def test_evaluate_needs_prompts(tmp_path, capsys, dreambench_root):
    code = main(["evaluate", "--images", str(dreambench_root / "dog"), "--references", str(dreambench_root / "dog"), *TINY_JUDGES])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--prompt" in err and len(err.splitlines()) == 1


PLUGIN = """
import numpy as np


def brightness(images, prompts, subject):
    # numpy: not differentiable, which a metric does not need
    return [float(np.asarray(im.convert("L")).mean() / 255.0) for im in images]
"""


@pytest.mark.slow
def test_bench_shards_merge_and_skip_finished(tmp_path, capsys, dreambench_root, monkeypatch):
    plugin_dir = tmp_path / "plugins"
    plugin_dir.mkdir()
    (plugin_dir / "my_rewards.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(plugin_dir))
    config = tmp_path / "bench.yaml"
    config.write_text("evaluation:\n  extra_rewards: ['my_rewards:brightness']\n")
    out = tmp_path / "bench"
    common = ["bench", "--config", str(config), "--dreambench", str(dreambench_root), "--subjects", "backpack,dog", "-k", "1", "--sample-steps", "2",
              "--model", "tiny", "--steps", "2", "--set", "prior.num_class_images=2", "--set", "prior.generation_steps=2",
              "--output", str(out), "--quiet", *TINY_JUDGES]
    assert main(common + ["--shard", "0/2"]) == 0
    assert "1 subject(s) computed" in capsys.readouterr().out
    assert main(common + ["--shard", "1/2"]) == 0
    assert main(["bench", "--merge", str(out)]) == 0
    finished = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("subjects/*/scores.json")}
    assert set(finished) == {"backpack", "dog"}

    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 25
    assert {r["subject"] for r in rows} == {"backpack", "dog"}
    brightness = [float(r["brightness"]) for r in rows]  # the config's custom reward is a column
    assert all(0.0 <= b <= 1.0 for b in brightness) and len(set(brightness)) > 1
    assert not any("sks" in r["prompt"] and r["prompt"].startswith("{") for r in rows)
    results = json.loads((out / "results.json").read_text())
    assert results["subjects"] == 2 and results["overall"]["images"] == 50
    assert {row["subject"] for row in results["per_subject"]} == {"backpack", "dog"}
    html = (out / "report.html").read_text()
    assert "report_assets/dino.png" in html and "report_assets/dreambooth/dog.png" in html
    assert (out / "report_assets" / "dreambooth" / "dog.png").is_file()

    capsys.readouterr()
    assert main(common) == 0  # unsharded rerun: both subjects are finished
    assert "0 subject(s) computed, 2 already finished" in capsys.readouterr().out
    assert {p.parent.name: p.stat().st_mtime_ns for p in out.glob("subjects/*/scores.json")} == finished

    # bench.json names the code that started the folder; carried on by other code, the bench says so
    from rewardbooth.provenance import code_version

    info = json.loads((out / "bench.json").read_text())
    assert info["code"] == code_version()
    (out / "bench.json").write_text(json.dumps({**info, "code": {"version": "0.0.9", "commit": "0123456789abcdef"}}))
    with pytest.warns(UserWarning, match="was started by rewardbooth 0.0.9 .*mix the two"):
        assert main(common) == 0


def test_bench_refuses_other_settings_in_same_folder(tmp_path, capsys, dreambench_root):
    out = tmp_path / "bench"
    out.mkdir()
    (out / "bench.json").write_text(json.dumps({"method": "rpo"}))
    code = main(["bench", "--dreambench", str(dreambench_root), "--subjects", "dog", "--model", "tiny", "--output", str(out),
                 "--quiet", *TINY_JUDGES])
    err = capsys.readouterr().err.strip()
    assert code == 2 and str(out) in err and len(err.splitlines()) == 1


def test_bench_bad_shard_and_subject(tmp_path, capsys, dreambench_root):
    base = ["bench", "--dreambench", str(dreambench_root), "--output", str(tmp_path / "b"), *TINY_JUDGES]
    assert main(base + ["--shard", "3/2"]) == 2
    assert "--shard" in capsys.readouterr().err
    assert main(base + ["--subjects", "dogg"]) == 2
    assert "dogg" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_runs_on_a_flow_model_at_its_familys_guidance(tmp_path, capsys, dreambench_root):
    """The DreamBench harness on tiny-flux: trains, samples (at FLUX.1-dev's guidance 3.5 unless told), scores."""
    out = tmp_path / "bench"
    assert main(["bench", "--dreambench", str(dreambench_root), "--subjects", "dog", "-k", "1", "--sample-steps", "2",
                 "--model", "tiny-flux", "--steps", "2", "--set", "prior.num_class_images=1", "--set", "prior.generation_steps=2",
                 "--output", str(out), "--quiet", *TINY_JUDGES]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["subjects"] == 1 and results["overall"]["images"] == 25
    assert json.loads((out / "bench.json").read_text())["guidance_scale"] == 3.5


def write_bench_folder(folder, method: str, identity: dict[str, float]) -> None:
    """A finished MiniBench-like folder: one image per subject scoring `identity[subject]` on identity_kept."""
    from PIL import Image

    from rewardbooth.sampling import save_generated

    image = Image.new("RGB", (8, 8), "red")
    references = folder.parent / "references"
    (folder / "subjects").mkdir(parents=True)
    (folder / "bench.json").write_text(json.dumps({"method": method, "model": "mini", "judges": {"attributes": "mini"},
                                                   "references": str(references), "images_per_prompt": 1}))
    for subject, value in identity.items():
        (references / subject).mkdir(parents=True, exist_ok=True)
        image.save(references / subject / "0.png")
        save_generated(folder / "subjects" / subject / "images", ["p"], [[image]], 0)
        (folder / "subjects" / subject / "scores.json").write_text(json.dumps([{
            "subject": subject, "prompt": "p", "file": "0.png", "dino": 0.5, "clip_i": 0.5, "clip_t": 0.5,
            "extra": {"identity_kept": value, "prompt_ok": 1.0}}]))


def test_merged_folders_are_paired_at_equal_seconds_with_another_runs_curve(tmp_path, capsys):
    """DreamBooth at its best, benched apart at several budgets: each merged folder is paired with it at its own
    seconds, interpolated between the curve's budgets; a subject past the curve's seconds is left out, not extrapolated."""
    subjects = ["a", "b", "c"]

    def bench(folder, method, identity, seconds):
        write_bench_folder(folder, method, dict.fromkeys(subjects, identity))
        for subject in subjects:
            (folder / "subjects" / subject / "seconds.json").write_text(json.dumps({"seconds": seconds[subject], "clock": "cpu"}))

    bench(tmp_path / "best" / "dreambooth@400", "dreambooth", 0.2, dict.fromkeys(subjects, 40.0))
    bench(tmp_path / "best" / "dreambooth@1600", "dreambooth", 0.6, dict.fromkeys(subjects, 160.0))
    bench(tmp_path / "set" / "dpg@400", "dpg", 0.7, {"a": 70.0, "b": 100.0, "c": 200.0})  # c: past the curve
    curve = [str(tmp_path / "best" / f"dreambooth@{b}") for b in (400, 1600)]
    assert main(["bench", "--merge", str(tmp_path / "set" / "dpg@400"), "--curve", *curve, "--output", str(tmp_path / "m")]) == 0
    table = json.loads((tmp_path / "m" / "paired.json").read_text())["equal_seconds"]["dpg"]
    # a: 70 s -> 0.2 + 0.4 * 30 / 120 = 0.3; b: 100 s -> 0.4; c left out
    assert table["differences"]["dpg"]["identity_kept"]["mean"] == pytest.approx(0.7 - 0.35)
    assert (table["outside"], table["clock"], table["baseline"]) == (1, "cpu", "best/dreambooth")
    printed = capsys.readouterr().out
    assert "dpg against best/dreambooth at the same CPU seconds" in printed
    assert "dpg against best/dreambooth" in (tmp_path / "m" / "report.html").read_text()
    for subject in subjects:  # the merged folder on the wall clock, the curve on the CPU's: not equal compute
        (tmp_path / "set" / "dpg@400" / "subjects" / subject / "seconds.json").write_text(json.dumps({"seconds": 70.0}))
    with pytest.warns(UserWarning, match="mix seconds on the cpu and wall clocks"):
        main(["bench", "--merge", str(tmp_path / "set" / "dpg@400"), "--curve", *curve, "--output", str(tmp_path / "m2")])
    assert main(["bench", "--merge", str(tmp_path / "set" / "dpg@400"), "--curve", curve[0]]) == 2  # one budget: no curve
    assert "--curve takes one method's bench folders at two budgets or more" in capsys.readouterr().err
    assert main(["bench", "--curve", *curve]) == 2  # nothing to pair
    assert "give --merge" in capsys.readouterr().err


def test_merged_folders_are_paired_with_the_first_even_when_two_have_the_same_name(tmp_path, capsys):
    """A variant benched in its own folder is compared with the baseline's, subject by subject; two runs of one method
    (same folder name, different parents) keep apart."""
    subjects = ["a", "b", "c", "d"]
    write_bench_folder(tmp_path / "base" / "dreambooth@400", "dreambooth", dict.fromkeys(subjects, 0.25))
    write_bench_folder(tmp_path / "one" / "rpo@400", "rpo", dict.fromkeys(subjects, 0.75))
    write_bench_folder(tmp_path / "two" / "rpo@400", "rpo", {"a": 0.0, "b": 0.0, "c": 0.5})  # d unfinished
    folders = [str(tmp_path / name) for name in ("base/dreambooth@400", "one/rpo@400", "two/rpo@400")]
    assert main(["bench", "--merge", *folders, "--output", str(tmp_path / "merged")]) == 0
    printed = capsys.readouterr().out
    paired = json.loads((tmp_path / "merged" / "paired.json").read_text())
    assert paired["baseline"] == "dreambooth"
    better, worse = paired["differences"]["one/rpo@400"]["identity_kept"], paired["differences"]["two/rpo@400"]["identity_kept"]
    assert better["mean"] == pytest.approx(0.5) and better["won"] == 4 and better["verdict"] == "better"
    assert worse["mean"] == pytest.approx(-1 / 12) and (worse["won"], worse["lost"], worse["subjects"]) == (1, 2, 3)
    assert "one/rpo@400 - dreambooth" in printed and "two/rpo@400 - dreambooth" in printed


def test_a_merge_with_a_curve_draws_the_budget_and_compute_frontiers_with_that_curve(tmp_path):
    """`--merge` of a method at several budgets with `--curve` (DreamBooth at its best, benched apart): the report's
    frontiers hold one line per method across its budgets, the curve's method among them under its pairing name."""
    from rewardbooth.evaluation.bench import folder_budget, merged_curves, summarize_folders

    subjects = ["a", "b"]

    def bench(folder, method, identity, seconds):
        write_bench_folder(folder, method, dict.fromkeys(subjects, identity))
        for subject in subjects:
            (folder / "subjects" / subject / "seconds.json").write_text(json.dumps({"seconds": seconds, "clock": "cpu"}))
        return str(folder)

    curve = [bench(tmp_path / "best" / f"dreambooth@{b}", "dreambooth", 0.1 * k, 40.0 * k) for k, b in ((1, 400), (4, 1600))]
    merged = [bench(tmp_path / "set" / f"dpg@{b}", "dpg", 0.3 * k, 50.0 * k) for k, b in ((1, 200), (2, 400))]
    # a variant's bench.json names its base method: its folder's name keeps its line apart
    merged += [bench(tmp_path / "set" / f"dpg-select@{b}", "dpg", 0.35 * k, 60.0 * k) for k, b in ((1, 200), (2, 400))]
    curves = merged_curves(summarize_folders([Path(d) for d in merged]), summarize_folders([Path(d) for d in curve]))
    assert {m: sorted(budgets) for m, budgets in curves.items()} == {
        "dpg": [200, 400], "dpg-select": [200, 400], "best/dreambooth": [400, 1600]}
    assert curves["dpg"][400]["identity_kept"] == pytest.approx(0.6) and curves["dpg"][400]["seconds"] == pytest.approx(100.0)
    assert main(["bench", "--merge", *merged, "--curve", *curve, "--output", str(tmp_path / "m")]) == 0
    report = (tmp_path / "m" / "report.html").read_text()
    assert "Budget frontier" in report and "Compute frontier" in report
    assert all((tmp_path / "m" / "report_assets" / name).is_file()
               for name in ("frontier.png", "seconds_identity_kept.png", "seconds_prompt_ok.png"))
    # one folder at one budget: no line to draw
    assert main(["bench", "--merge", merged[0], "--output", str(tmp_path / "one")]) == 0
    assert "frontier" not in (tmp_path / "one" / "report.html").read_text()
    assert folder_budget(Path("runs/x/rpo@800"), {}) == 800 and folder_budget(Path("runs/x"), {"budget": 200}) == 200
    assert folder_budget(Path("runs/dpg"), {}) is None
    # the same method and budget from two runs: each line under its run's folder
    twice = summarize_folders([Path(merged[1]), Path(curve[0])])
    assert sorted(merged_curves(twice, [])) == ["dpg", "dreambooth"]
    rerun = tmp_path / "again" / "dpg@400"
    shutil.copytree(merged[1], rerun)
    assert sorted(merged_curves(summarize_folders([Path(merged[1]), rerun]), [])) == ["again/dpg", "set/dpg"]
    # a variant as the curve: named by its folders in the plots and the pairing alike; mixed with its base, refused
    variant = [bench(tmp_path / "sel" / f"dreambooth-select@{b}", "dreambooth", 0.15 * k, 45.0 * k) for k, b in ((1, 400), (4, 1600))]
    assert "sel/dreambooth-select" in merged_curves(summarize_folders([Path(merged[1])]), summarize_folders([Path(d) for d in variant]))
    assert main(["bench", "--merge", merged[1], "--curve", *variant, "--output", str(tmp_path / "v")]) == 0
    assert json.loads((tmp_path / "v" / "paired.json").read_text())["equal_seconds"]["dpg"]["baseline"] == "sel/dreambooth-select"
    assert main(["bench", "--merge", merged[1], "--curve", curve[0], variant[1], "--output", str(tmp_path / "mixed")]) == 2
