"""A mini bench runs subject by subject, and its record (benchmarks/bench_records.py) carries it to a fresh folder: the
finished subjects are not trained again and keep their numbers; the report says their images were not kept."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import load_script

from rewardbooth.mini.assets import ASSETS_DIR

pytestmark = pytest.mark.skipif(not (ASSETS_DIR / "base" / "model_index.json").is_file(), reason="mini assets not built")

FOLDERS = ("dreambooth@3", "dreambooth@2", "dreambooth-select@3", "dreambooth-select@2")


@pytest.mark.slow
def test_a_bench_goes_subject_by_subject_and_carries_on_from_its_record(tmp_path, monkeypatch):
    from rewardbooth.evaluation import bench as bench_module
    from rewardbooth.mini import bench as mini_bench

    records = load_script("benchmarks/bench_records.py")
    calls, trained = [], []
    real_run_subject, real_train = mini_bench.MiniBenchRunner.run_subject, bench_module.train
    monkeypatch.setattr(mini_bench.MiniBenchRunner, "run_subject",
                        lambda self, s: calls.append((self.out_dir.name, s.name)) or real_run_subject(self, s))
    monkeypatch.setattr(bench_module, "train", lambda cfg, run_dir, **kw: trained.append(run_dir.name) or real_train(cfg, run_dir, **kw))
    settings = dict(quick=True, num_subjects=2, images_per_prompt=1, sample_steps=2, progress=False, jobs=1, budgets=[2, 3],
                    overrides={"prior.num_class_images": 2})
    first = tmp_path / "first"
    mini_bench.run_mini_bench(first, ["dreambooth", "dreambooth-select"], **settings)
    # each subject finishes every method and budget before the next starts
    s0, s1 = calls[0][1], calls[-1][1]
    assert calls == [(folder, s0) for folder in FOLDERS] + [(folder, s1) for folder in FOLDERS]

    # subject 1 unfinished in one folder: the record keeps subject 0 alone, whole
    (first / "dreambooth-select@2" / "subjects" / s1 / "scores.json").unlink()
    record = tmp_path / "record"
    assert "1 subjects finished in all 4 bench folders" in records.save(first, record)
    kept = {p.parent.name for p in record.rglob("scores.json")}
    assert kept == {s0} and not list(record.rglob("*.png"))
    assert all((record / f / "subjects" / s0 / "seconds.json").is_file() for f in FOLDERS)

    second = tmp_path / "second"
    records.restore(record, second)
    calls.clear(), trained.clear()
    report = mini_bench.run_mini_bench(second, ["dreambooth", "dreambooth-select"], **settings)
    assert {s for _, s in calls} == {s1} and sorted(trained) == [s1, s1]  # one run per method, subject 1 only
    for folder in FOLDERS:
        rows = {r["subject"]: r for r in json.loads((second / folder / "results.json").read_text())["per_subject"]}
        before = {r["subject"]: r for r in json.loads((first / folder / "results.json").read_text())["per_subject"]}
        assert rows[s0] == before[s0]
    assert f"scored, images not kept: {s0}" in report.read_text()

    # restoring never overwrites what a bench folder holds
    mine = second / "dreambooth@3" / "subjects" / s0 / "scores.json"
    mine.write_text("[]")
    assert records.restore(record, second).startswith("0 of")
    assert mine.read_text() == "[]"
    shutil.rmtree(second / "dreambooth@3")
    with pytest.raises(SystemExit, match="no saved record"):
        records.restore(tmp_path / "nothing", second)
