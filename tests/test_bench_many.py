"""`rewardbooth bench --subjects-per-batch K`: the bench's subjects trained K at a time (training/many.py), then
evaluated as one by one.

Tolerance of the scores (where it comes from). A subject trained in a batch ends with its solo run's weights up to
float32 rounding (tests/test_training_many.py: losses within 2e-5 relative, weights within 2 % of the update in
norm, seen <= 1e-3). Sampling from weights that differ at rounding level can move a few 8-bit pixel levels of the
generated images, which moves the judges' embedding similarities (dino, clip_i, clip_t, in [-1, 1]) by ~1e-5 (seen:
<= 1.6e-5 here): SCORE_ATOL = 1e-3. The attribute judge's answers (shape_kept ... prompt_ok) are discrete: one flips
only if a logit sits within rounding of a tie, which none did; they are compared exactly. Training each subject on
the other's photos (the mutation check of this file) moves the similarities by far more than SCORE_ATOL.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rewardbooth.cli import main
from rewardbooth.evaluation.bench import BATCH_HOW, merge, summarize_folders
from rewardbooth.mini.assets import ASSETS_DIR
from rewardbooth.mini.bench import subject_shares
from rewardbooth.training.run_dir import read_metrics, seconds_at

SCORE_ATOL = 1e-3
SIMILARITIES = ("dino", "clip_i", "clip_t")
TINY_JUDGES = ["--dino-model", "tiny", "--clip-model", "tiny", "--device", "cpu"]
MINI = ["bench", "--suite", "mini", "--quick", "--num-subjects", "2", "--steps", "3", "-k", "1", "--sample-steps", "4",
        "--methods", "dreambooth", "--jobs", "1", "--set", "prior.num_class_images=4", "--quiet"]

needs_mini = pytest.mark.skipif(not (ASSETS_DIR / "base" / "model_index.json").is_file(), reason="mini assets not built")


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def scores(folder: Path) -> list[dict]:
    return json.loads((folder / "dreambooth" / "results.json").read_text())["per_subject"]


@pytest.fixture(scope="module")
def mini_benches(tmp_path_factory) -> tuple[Path, Path]:
    """The same MiniBench (2 subjects, dreambooth, 3 steps) one subject at a time and two at a time."""
    root = tmp_path_factory.mktemp("bench-many")
    assert main([*MINI, "--output", str(root / "one")]) == 0
    assert main([*MINI, "--output", str(root / "two"), "--subjects-per-batch", "2"]) == 0
    return root / "one", root / "two"


@needs_mini
@pytest.mark.slow
def test_mini_bench_in_batches_gives_the_scores_and_files_of_one_by_one(mini_benches):
    one, two = mini_benches
    # The same files (bench.json, subjects/*/scores.json and seconds.json, results, paired.json, report, runs), and
    # beside each batched run the record of its batch.
    batch_records = {f"dreambooth/subjects/{row['subject']}/run.batch.json" for row in scores(two)}
    assert len(batch_records) == 2 and files(two) == files(one) | batch_records
    def info(folder):  # the settings, not where the folder lies
        return {k: v for k, v in json.loads((folder / "dreambooth" / "bench.json").read_text()).items() if k != "references"}

    assert info(one) == info(two)
    a, b = scores(one), scores(two)
    assert [r["subject"] for r in a] == [r["subject"] for r in b] and len(a) == 2
    for solo, batched in zip(a, b):
        for key, value in solo.items():
            if key in SIMILARITIES:
                assert batched[key] == pytest.approx(value, abs=SCORE_ATOL), (solo["subject"], key)
            elif key not in ("seconds", "seconds_clock"):  # images and the attribute judge's answers: equal
                assert batched[key] == value, (solo["subject"], key)


@needs_mini
@pytest.mark.slow
def test_batched_seconds_are_the_batchs_wall_seconds_divided_by_its_subjects(mini_benches):
    one, two = mini_benches
    subjects = sorted((two / "dreambooth" / "subjects").iterdir())
    # The batch's clock: its first subject's own clock, which runs through both set-ups and the lockstep steps.
    batch_clock = max(seconds_at(s / "run", 3) for s in subjects)
    for subject in subjects:
        seconds = json.loads((subject / "seconds.json").read_text())
        assert seconds == {"seconds": round(batch_clock / 2, 3), "clock": "wall", "subjects_per_batch": 2, "how": BATCH_HOW}
        # Its subjects share the process, so its CPU time is no one subject's: train-many logs none.
        assert not any("cpu_seconds" in r for r in read_metrics(subject / "run" / "metrics.jsonl"))
    # One by one on the CPU: the run's CPU seconds at the evaluated step (a pause or other jobs are no compute).
    for subject in sorted((one / "dreambooth" / "subjects").iterdir()):
        run = subject / "run"
        assert json.loads((subject / "seconds.json").read_text()) == {"seconds": seconds_at(run, 3, clock="cpu"), "clock": "cpu",
                                                                      "wall_seconds": seconds_at(run, 3)}
    clocks = [json.loads((d / "dreambooth" / "results.json").read_text())["overall"]["seconds_clock"] for d in (one, two)]
    assert clocks == ["cpu", "wall"]
    # Comparing folders trained one by one and in batches warns: their seconds are measured differently (batching, clock).
    with pytest.warns(UserWarning, match="subjects_per_batch"), pytest.warns(UserWarning, match="seconds.json's clock"):
        summarize_folders([one / "dreambooth", two / "dreambooth"])


@needs_mini
@pytest.mark.slow
def test_a_batched_mini_bench_reruns_without_training_again(mini_benches):
    _, two = mini_benches
    kept = [*two.glob("dreambooth/subjects/*/*.json"), *two.glob("dreambooth/subjects/*/run/result.json")]
    before = {p: p.stat().st_mtime_ns for p in kept}
    results = scores(two)
    assert main([*MINI, "--output", str(two), "--subjects-per-batch", "2"]) == 0
    assert scores(two) == results and len(before) == 8
    assert {p: p.stat().st_mtime_ns for p in kept} == before  # nothing trained, scored or timed again


def test_workers_take_whole_batches():
    subjects = list("abcde")
    assert subject_shares(subjects, 2, None) == [["a", "c", "e"], ["b", "d"]]  # one by one: every other subject
    assert subject_shares(subjects, 2, 1) == [["a", "c", "e"], ["b", "d"]]
    assert subject_shares(subjects, 2, 2) == [["a", "b", "e"], ["c", "d"]]  # batches ab, cd, e: every other batch
    assert subject_shares(subjects, 4, 2) == [["a", "b"], ["c", "d"], ["e"]]  # no more workers than batches
    assert subject_shares(subjects, 2, "auto") == [["a", "c", "e"], ["b", "d"]]  # auto: sized inside each worker


@pytest.mark.parametrize("flags, named", [(["--subjects-per-batch", "0"], "--subjects-per-batch"),
                                          (["--subjects-per-batch", "many"], "--subjects-per-batch"),
                                          (["--subjects-per-batch", "2", "--set", "train.gradient_accumulation_steps=2"],
                                           "gradient_accumulation_steps"),
                                          (["--subjects-per-batch", "auto", "--set", "adapter.kind=lora", "--set",
                                            "adapter.dropout=0.1"], "adapter.dropout")])
@pytest.mark.parametrize("suite", ["mini", "dreambench"])
def test_bad_subjects_per_batch_is_one_line_before_any_work(suite, flags, named, tmp_path, capsys, request):
    where = ["--suite", "mini"] if suite == "mini" else ["--dreambench", str(request.getfixturevalue("dreambench_root")),
                                                         "--subjects", "dog", "--model", "tiny"]
    code = main(["bench", *where, "--output", str(tmp_path / "b"), *flags, *TINY_JUDGES[4:]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and named in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_a_failed_subject_in_a_batch_is_named_and_the_others_are_evaluated(tmp_path, capsys, dreambench_root, monkeypatch):
    """DreamBench, three subjects in one batch: `can` crashes in its first step, `cat` diverges (failed.json, as alone),
    `backpack` trains and is scored. The bench exits 1 naming `can`; run again, it trains `can` only."""
    from rewardbooth.methods.dreambooth import DreamBooth

    real = DreamBooth.loss

    def loss(self, ctx, generator):
        name = Path(ctx.cfg.data.instance_dir).name
        if name == "can":
            raise RuntimeError("boom")
        value, logs = real(self, ctx, generator)
        return (value * float("nan"), logs) if name == "cat" else (value, logs)

    monkeypatch.setattr(DreamBooth, "loss", loss)
    out = tmp_path / "bench"
    args = ["bench", "--dreambench", str(dreambench_root), "--subjects", "backpack,can,cat", "-k", "1", "--sample-steps", "2",
            "--model", "tiny", "--steps", "2", "--set", "prior.num_class_images=1", "--set", "prior.generation_steps=2",
            "--subjects-per-batch", "3", "--output", str(out), "--quiet", *TINY_JUDGES]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "can: RuntimeError: boom" in err[0] and "backpack" not in err[0], err
    subjects = out / "subjects"
    assert (subjects / "backpack" / "scores.json").is_file()
    assert json.loads((subjects / "backpack" / "seconds.json").read_text())["subjects_per_batch"] == 3
    assert "training diverged" in json.loads((subjects / "cat" / "failed.json").read_text())["error"]
    assert not (subjects / "can" / "scores.json").exists() and not (subjects / "can" / "failed.json").exists()

    monkeypatch.setattr(DreamBooth, "loss", real)
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "1 subject(s) computed, 2 already finished" in printed and "training diverged: cat" in printed
    assert (subjects / "can" / "scores.json").is_file()
    assert json.loads((subjects / "can" / "seconds.json").read_text())["subjects_per_batch"] == 1  # it trained alone
    assert json.loads((out / "results.json").read_text())["subjects"] == 2
    with pytest.warns(UserWarning, match="subjects_per_batch"):  # can alone, backpack in a batch of three
        merge([out])
    # Both trained by train-many (can in a batch of one): wall seconds, as their process's CPU time is not theirs alone
    assert json.loads((out / "results.json").read_text())["overall"]["seconds_clock"] == "wall"


@pytest.mark.parametrize("value, passed", [("auto", "auto"), ("3", 3)])
@pytest.mark.parametrize("suite", ["mini", "dreambench"])
def test_subjects_per_batch_reaches_train_many(suite, value, passed, tmp_path, request, monkeypatch):
    """--subjects-per-batch K or auto is handed to train_many as given (auto: its memory estimate sizes the batches)."""
    from rewardbooth.evaluation import bench

    seen = {}

    def fake_train_many(runs, **kwargs):
        seen.update(kwargs, names=[r.name for r in runs])
        raise RuntimeError("stop here")

    monkeypatch.setattr(bench, "train_many", fake_train_many)
    if suite == "mini":
        if not (ASSETS_DIR / "base" / "model_index.json").is_file():
            pytest.skip("mini assets not built")
        where = ["--suite", "mini", "--quick", "--methods", "dreambooth", "--jobs", "1", "--set", "prior.num_class_images=1",
                 "--set", "prior.generation_steps=2"]
    else:
        where = ["--dreambench", str(request.getfixturevalue("dreambench_root")), "--subjects", "dog,cat", "--model", "tiny",
                 *TINY_JUDGES[:4]]
    with pytest.raises(RuntimeError, match="stop here"):
        main(["bench", *where, "--output", str(tmp_path / "b"), "--subjects-per-batch", value, "--quiet", "--device", "cpu"])
    assert seen["subjects_per_batch"] == passed and len(seen["names"]) == 2
