"""Smoke runs of `rewardbooth bench --suite mini` (all three methods) and `rewardbooth demo`
on the shipped mini model and judges: one subject, a few steps."""

from __future__ import annotations

import csv
import json

import pytest

from rewardbooth.cli import main
from rewardbooth.mini.assets import ASSETS_DIR
from rewardbooth.mini.scoring import ATTRIBUTE_METRICS
from rewardbooth.mini.world import make_subjects

pytestmark = pytest.mark.skipif(not (ASSETS_DIR / "base" / "model_index.json").is_file(), reason="mini assets not built")


@pytest.mark.slow
def test_mini_bench_smoke_all_methods(tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["bench", "--suite", "mini", "--quick", "--num-subjects", "1", "--steps", "3", "-k", "1", "--sample-steps", "4",
            "--methods", "dreambooth,dpg,rpo", "--output", str(out), "--quiet",
            "--set", "prior.num_class_images=4", "--set", "rpo.negatives_per_prompt=1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "results.json").read_text())
    assert set(summary) == {"dreambooth", "dpg", "rpo"}
    for method, overall in summary.items():
        assert method in printed
        assert 0 < overall["images"] and -1 <= overall["dino"] <= 1 and -1 <= overall["clip_t"] <= 1
        for metric in ATTRIBUTE_METRICS:
            assert 0 <= overall[metric] <= 1, (method, metric, overall[metric])
        rows = list(csv.DictReader((out / method / "results.csv").open()))
        assert rows and {"dino", "clip_i", "clip_t", "identity_kept", "context_ok"} <= set(rows[0])
    table = {row["method"]: row for row in csv.DictReader((out / "results.csv").open())}
    assert set(table) == set(summary) and float(table["rpo"]["identity_kept"]) == pytest.approx(summary["rpo"]["identity_kept"])
    paired = json.loads((out / "paired.json").read_text())
    table = paired["budgets"]["final"]
    assert paired["baseline"] == "dreambooth" and set(table["differences"]) == {"dpg", "rpo"}
    assert table["differences"]["rpo"]["identity_kept"]["subjects"] == 1 and "dpg - dreambooth" in printed
    assert table["differences"]["rpo"]["identity_kept"]["verdict"] == "too few subjects"
    # The same subjects for every method, drawn from the seed, with their references on disk.
    references = sorted(p.name for p in (out / "references").iterdir())
    assert len(references) == 1 and len(list((out / "references" / references[0]).glob("*.png"))) >= 4
    html = (out / "report.html").read_text()
    assert all(m in html for m in ("dreambooth", "dpg", "rpo")) and "<img" in html

    # Finished methods are skipped on a rerun: the numbers stay as they were.
    assert main(args) == 0
    assert json.loads((out / "results.json").read_text()) == summary


def test_mini_bench_refuses_unknown_method(tmp_path, capsys):
    assert main(["bench", "--suite", "mini", "--methods", "dreambooth,ppo", "--output", str(tmp_path / "b")]) != 0
    err = capsys.readouterr().err
    assert "ppo" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_demo_learns_a_mini_subject(tmp_path, capsys):
    from PIL import Image

    from rewardbooth.demo import run_demo

    report = run_demo(tmp_path / "demo", steps=3, progress=False, images_per_prompt=1)
    html = report.read_text()
    assert "Did it learn the subject?" in html and "before training" in html
    # The terminal gets three lines: what is kept, whether prompts are followed, where the report is.
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 3 and "kept in the images" in printed[0] and "still draws what the prompt asks" in printed[1]
    assert printed[2] == f"report: {report}"
    # Before and after side by side: one labelled row per prompt, before | after.
    side = Image.open(tmp_path / "demo" / "report_assets" / "before_after.png")
    assert side.height >= 13 * 3 * 32 // 1.1 and side.width > 2 * 3 * 32
    # Only the settings of the method that ran.
    assert "rpo.beta" not in html and "dpg.gamma" not in html and "train.method" in html
    assert len(list((tmp_path / "demo" / "reference").glob("*.png"))) >= 4
    # Running it again says it is done and touches nothing (README's one-liner works twice).
    stamp = report.stat().st_mtime_ns
    assert run_demo(tmp_path / "demo", steps=3, progress=False) == report
    assert report.read_text() == html and report.stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_an_interrupted_demo_starts_again(tmp_path, monkeypatch):
    import rewardbooth.demo as demo

    real_train = demo.train

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "train", killed)
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(tmp_path / "demo", steps=2, progress=False, images_per_prompt=1)
    assert not (tmp_path / "demo" / "report.html").exists()
    monkeypatch.setattr(demo, "train", real_train)
    report = demo.run_demo(tmp_path / "demo", steps=2, progress=False, images_per_prompt=1)
    assert report.is_file() and (tmp_path / "demo" / "result.json").is_file()


def test_demo_refuses_a_folder_that_is_not_its_own(tmp_path):
    from rewardbooth.demo import run_demo

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(Exception, match="not empty"):
        run_demo(tmp_path / "mine", steps=2, progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


@pytest.mark.slow
def test_mini_bench_parallel_jobs_match_one_process(tmp_path):
    """Subjects split over two worker processes give exactly the numbers of one process."""
    from rewardbooth.mini.bench import run_mini_bench

    common = dict(quick=True, num_subjects=2, images_per_prompt=1, sample_steps=4, progress=False,
                  overrides={"train.steps": 3, "prior.num_class_images": 4})
    run_mini_bench(tmp_path / "one", ["dreambooth"], jobs=1, **common)
    run_mini_bench(tmp_path / "two", ["dreambooth"], jobs=2, **common)
    one = json.loads((tmp_path / "one" / "dreambooth" / "results.json").read_text())["per_subject"]
    two = json.loads((tmp_path / "two" / "dreambooth" / "results.json").read_text())["per_subject"]
    assert len(one) == 2 and one == two
    # The prior's class images were made once per class noun and shared: no run made its own.
    nouns = {s.class_noun for s in make_subjects(2, seed=0)}
    shared = tmp_path / "two" / "class_images"
    assert {p.name for p in shared.iterdir()} == nouns and all(len(list((shared / n).glob("*.png"))) == 4 for n in nouns)
    assert not list((tmp_path / "two" / "dreambooth").glob("subjects/*/run/class_images/*.png"))


@pytest.mark.slow
def test_mini_bench_budgets_train_once_and_plot_the_frontier(tmp_path):
    from rewardbooth.mini.bench import run_mini_bench

    out = tmp_path / "bench"
    report = run_mini_bench(out, ["dreambooth", "dpg-recon"], quick=True, num_subjects=1, images_per_prompt=1, sample_steps=2,
                            progress=False, jobs=1, budgets=[2, 3], overrides={"prior.num_class_images": 2})
    # one run per method and subject, trained to the largest budget, its smaller budget kept inside
    runs = sorted((out / "runs").glob("*/*/result.json"))
    assert len(runs) == 2 and all(json.loads(r.read_text())["last_step"] == 3 for r in runs)
    assert all((r.parent / "budgets" / "step-000002" / "budget.json").is_file() for r in runs)
    assert {p.name for p in out.iterdir() if "@" in p.name} == {"dreambooth@2", "dreambooth@3", "dpg-recon@2", "dpg-recon@3"}
    paired = json.loads((out / "paired.json").read_text())
    assert set(paired["budgets"]) == {"2", "3"} and set(paired["budgets"]["2"]["differences"]) == {"dpg-recon"}
    html = report.read_text()
    assert (out / "report_assets" / "frontier.png").is_file() and "Budget frontier" in html and "at 3 steps" in html
