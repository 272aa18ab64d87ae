"""Smoke runs of `rewardbooth bench --suite mini` (all three methods) and `rewardbooth demo`
on the shipped mini model and judges: one subject, a few steps."""

from __future__ import annotations

import csv
import json
import os

import pytest
import yaml

from rewardbooth.cli import main
from rewardbooth.errors import ConfigError
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


def test_a_bench_holds_its_folder_while_it_works(tmp_path, monkeypatch):
    """A second bench on the same folder is refused (it would train the same subjects), and the web app's queue, which
    reads the folder's lock, waits for a bench started from the command line."""
    from rewardbooth.errors import OutputExistsError
    from rewardbooth.mini import bench as mini_bench
    from rewardbooth.training.run_dir import lock_holder

    out, seen = tmp_path / "b", []

    def work(folder, *args, **kwargs):
        seen.append(lock_holder(folder))
        with pytest.raises(OutputExistsError, match="in use"):
            mini_bench.run_mini_bench(folder, ["dreambooth"], quick=True)
        return folder / "report.html"

    monkeypatch.setattr(mini_bench, "_run_locked", work)
    mini_bench.run_mini_bench(out, ["dreambooth"], quick=True)
    assert seen == [str(os.getpid())] and lock_holder(out) is None


def test_mini_bench_refuses_unknown_method(tmp_path, capsys):
    assert main(["bench", "--suite", "mini", "--methods", "dreambooth,ppo", "--output", str(tmp_path / "b")]) != 0
    err = capsys.readouterr().err
    assert "ppo" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_demo_shows_dreambooth_and_the_reward_method_side_by_side(tmp_path, capsys):
    from PIL import Image

    from rewardbooth.demo import run_demo
    from rewardbooth.methods import baseline_method, showcase_method

    report = run_demo(tmp_path / "demo", steps=3, progress=False, images_per_prompt=1)
    html = report.read_text()
    baseline, shown = baseline_method().name, showcase_method().name
    assert "Did it learn the subject?" in html and "before training" in html
    assert f"after 3 {baseline} steps" in html and f"after 3 {shown} steps" in html
    assert "One subject proves nothing" in html and "bench --suite mini" in html
    # The terminal: the subject, what is kept and whether prompts are followed per column, the caveat, the report.
    printed = capsys.readouterr().out.strip().splitlines()
    assert "kept whole" in printed[1] and printed[1].count("->") == 2 and "still draws" in printed[2]
    assert printed[-1] == f"report: {report}"
    # One labelled row per prompt, three groups: before | DreamBooth | the reward method.
    side = Image.open(tmp_path / "demo" / "report_assets" / "compare.png")
    assert side.width > 3 * 3 * 32 and side.height >= 13 * 3 * 32 // 1.1
    for name in (baseline, shown):  # each method an ordinary run folder with its own report
        run = tmp_path / "demo" / "runs" / name
        assert (run / "result.json").is_file() and (run / "report.html").is_file()
        assert yaml.safe_load((run / "config.yaml").read_text())["train"]["method"] == name
    assert len(list((tmp_path / "demo" / "reference").glob("*.png"))) >= 4
    # Running it again says it is done and touches nothing (README's one-liner works twice).
    stamp = report.stat().st_mtime_ns
    assert run_demo(tmp_path / "demo", steps=3, progress=False) == report
    assert report.read_text() == html and report.stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_an_interrupted_demo_keeps_finished_runs_and_finishes(tmp_path, monkeypatch):
    import rewardbooth.demo as demo

    real_train, calls = demo.train, []

    def second_one_killed(cfg, run_dir, **kwargs):
        calls.append(cfg.train.method)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_train(cfg, run_dir, **kwargs)

    monkeypatch.setattr(demo, "train", second_one_killed)
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(tmp_path / "demo", steps=2, progress=False, images_per_prompt=1)
    assert not (tmp_path / "demo" / "report.html").exists()
    monkeypatch.setattr(demo, "train", lambda cfg, run_dir, **kw: calls.append(cfg.train.method) or real_train(cfg, run_dir, **kw))
    report = demo.run_demo(tmp_path / "demo", steps=2, progress=False, images_per_prompt=1)
    assert report.is_file() and calls[2:] == calls[1:2]  # only the interrupted method trained again


@pytest.mark.slow
def test_mini_bench_parallel_jobs_match_one_process(tmp_path):
    """Subjects split over two worker processes give exactly the numbers of one process."""
    from rewardbooth.mini.bench import run_mini_bench

    common = dict(quick=True, num_subjects=2, images_per_prompt=1, sample_steps=4, progress=False,
                  overrides={"train.steps": 3, "prior.num_class_images": 4})
    run_mini_bench(tmp_path / "one", ["dreambooth"], jobs=1, **common)
    run_mini_bench(tmp_path / "two", ["dreambooth"], jobs=2, **common)
    def scores(folder):  # the numbers, not the seconds each run took
        rows = json.loads((folder / "dreambooth" / "results.json").read_text())["per_subject"]
        return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]

    one, two = scores(tmp_path / "one"), scores(tmp_path / "two")
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
                            progress=False, jobs=1, budgets=[2, 3], baseline_budgets=[4], overrides={"prior.num_class_images": 2})
    # one run per method and subject, trained to its largest budget (the baseline's --baseline-budgets on top), its
    # smaller budgets kept inside
    steps = {r.parent.parent.name: json.loads(r.read_text())["last_step"] for r in (out / "runs").glob("*/*/result.json")}
    assert steps == {"dreambooth": 4, "dpg-recon": 3}
    assert all((r / "budgets" / "step-000002" / "budget.json").is_file() for r in (out / "runs").glob("*/*"))
    assert (next((out / "runs" / "dreambooth").iterdir()) / "budgets" / "step-000003" / "budget.json").is_file()
    assert {p.name for p in out.iterdir() if "@" in p.name} == {"dreambooth@2", "dreambooth@3", "dreambooth@4", "dpg-recon@2",
                                                                "dpg-recon@3"}
    assert "dreambooth@4" in json.loads((out / "results.json").read_text())
    paired = json.loads((out / "paired.json").read_text())
    assert set(paired["budgets"]) == {"2", "3"} and set(paired["budgets"]["2"]["differences"]) == {"dpg-recon"}
    html = report.read_text()
    assert (out / "report_assets" / "frontier.png").is_file() and "Budget frontier" in html and "at 3 steps" in html
    # equal compute: every subject's seconds recorded, the compute frontier drawn, the pairing at equal seconds
    results = json.loads((out / "dreambooth@3" / "results.json").read_text())
    assert all(row["seconds"] > 0 for row in results["per_subject"]) and results["overall"]["seconds"] > 0
    at2 = json.loads((out / "dreambooth@2" / "results.json").read_text())["overall"]["seconds"]
    assert at2 < results["overall"]["seconds"]  # a smaller budget of the same run: fewer seconds
    assert set(paired["equal_seconds"]["budgets"]) == {"2", "3"}
    assert "outside" in paired["equal_seconds"]["budgets"]["3"]["dpg-recon"]
    assert (out / "report_assets" / "seconds_identity_kept.png").is_file() and "Compute frontier" in html


def test_the_equal_seconds_pairing_reads_the_baselines_extra_budgets():
    """DreamBooth run to more budgets than the others: its longer curve matches a slower method's seconds that its
    common budgets never reach (and nothing is extrapolated without it)."""
    from rewardbooth.mini.bench import budgets_per_method, paired_by_seconds

    def rows(seconds, identity):  # two subjects, the second 10 % slower
        return {"per_subject": [{"subject": s, "seconds": seconds * f, "identity_kept": identity + d, "prompt_ok": 0.9}
                                for s, f, d in (("a", 1.0, 0.0), ("b", 1.1, 0.1))], "overall": {"identity_kept": 0, "prompt_ok": 0}}

    results = {"dreambooth@200": rows(20, 0.2), "dreambooth@400": rows(40, 0.3), "dreambooth@800": rows(80, 0.5),
               "dpg@200": rows(35, 0.4), "dpg@400": rows(60, 0.6)}
    short = paired_by_seconds(results, ["dreambooth", "dpg"], [200, 400])
    assert short["budgets"]["400"]["dpg"]["outside"] == 2  # 60 s: past DreamBooth's 400 steps (40 s)
    longer = paired_by_seconds(results, ["dreambooth", "dpg"], [200, 400], [200, 400, 800])
    at400 = longer["budgets"]["400"]["dpg"]
    assert at400["outside"] == 0 and at400["differences"]["dpg"]["identity_kept"]["mean"] == pytest.approx(0.6 - 0.4)
    assert longer["budgets"]["200"]["dpg"]["differences"]["dpg"]["identity_kept"]["mean"] == pytest.approx(0.4 - 0.275)
    assert budgets_per_method(["dreambooth", "dpg"], [200, 400], [1600]) == {"dreambooth": [200, 400, 1600], "dpg": [200, 400]}
    assert budgets_per_method(["dpg", "rpo"], [200], [400])["dpg"] == [200, 400]  # no dreambooth: the first is the baseline
    with pytest.raises(ConfigError, match="--baseline-budgets"):
        budgets_per_method(["dreambooth"], None, [800])


def test_budgets_are_refused_where_the_suite_has_none(tmp_path, capsys):
    assert main(["bench", "--dreambench", str(tmp_path), "--budgets", "200,400", "--output", str(tmp_path / "out")]) != 0
    assert "--budgets apply to --suite mini only" in capsys.readouterr().err


# The LoRA bracket's choices (docs/minibench.md, "The LoRA suite": 8 tuning subjects of set 102, highest mean H at 400 steps).
LORA_BRACKET_RATES = {"dreambooth": 2e-3, "dreambooth-select": 4e-3, "dpg": 1e-3, "rpo": 2e-3}


@pytest.mark.parametrize("method, rate", LORA_BRACKET_RATES.items())
def test_each_methods_lora_rate_is_its_brackets_choice(method, rate):
    from rewardbooth.mini.bench import method_config

    assert method_config(method, None, {}, "lora").train.learning_rate == rate


def test_the_lora_suite_keeps_each_methods_settings_with_its_lora():
    from rewardbooth.errors import ConfigError
    from rewardbooth.methods import resolve_variant
    from rewardbooth.mini.bench import MINI_LORA, method_config

    for method in ("dreambooth", "dpg", "rpo", "dreambooth-select", "dpg-select"):
        full, lora = method_config(method, None, {}), method_config(method, None, {}, "lora")
        cls, _ = resolve_variant(method)
        assert full.adapter.kind == "full" and lora.adapter.kind == "lora", method
        assert (lora.adapter.rank, lora.adapter.targets) == (MINI_LORA["adapter.rank"], MINI_LORA["adapter.targets"])
        rate = {**MINI_LORA, **cls.minibench_lora, **cls.variant_minibench_lora.get(method, {})}["train.learning_rate"]
        assert lora.train.learning_rate == rate and full.train.learning_rate == cls.minibench["train.learning_rate"], method
        # everything but the adapter and its rate stays the method's (and the variant's) MiniBench setting
        differ = {k for k, v in lora.to_flat_dict().items() if full.to_flat_dict()[k] != v}
        assert differ <= {"adapter.kind", "adapter.rank", "adapter.targets", "train.learning_rate"}, (method, differ)
    assert method_config("rpo", None, {}, "lora").validation.every == 40
    assert method_config("dpg", None, {}, "lora").dpg.critic_input == "features"
    assert method_config("dpg", None, {"train.learning_rate": 5e-4}, "lora").train.learning_rate == 5e-4  # --set wins
    with pytest.raises(ConfigError, match="adapter"):
        method_config("dpg", None, {}, "loha")


@pytest.mark.slow
def test_bench_suite_mini_lora_trains_loras(tmp_path, capsys):
    from rewardbooth.models.lora import LORA_WEIGHTS_NAME

    out = tmp_path / "bench"
    assert main(["bench", "--suite", "mini-lora", "--quick", "--num-subjects", "1", "--steps", "2", "-k", "1", "--sample-steps", "2",
                 "--methods", "dreambooth,rpo", "--output", str(out), "--quiet", "--set", "prior.num_class_images=2",
                 "--set", "rpo.negatives_per_prompt=1"]) == 0
    for method in ("dreambooth", "rpo"):
        run = next((out / method / "subjects").glob("*/run"))
        assert (run / LORA_WEIGHTS_NAME).is_file() and not (run / "unet").exists(), method
        assert yaml.safe_load((run / "config.yaml").read_text())["adapter"]["kind"] == "lora"
    assert set(json.loads((out / "results.json").read_text())) == {"dreambooth", "rpo"}
