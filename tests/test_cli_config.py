"""Config parsing/validation and the CLI's one-line errors."""

from __future__ import annotations

import pytest
import yaml

from rewardbooth.cli import main
from rewardbooth.config import RunConfig
from rewardbooth.errors import ConfigError
from rewardbooth.methods import load_config


def test_yaml_then_overrides_and_roundtrip(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"train": {"steps": 50, "learning_rate": "2e-4"}, "adapter": {"rank": 8}}))
    cfg = load_config(path, {"train.steps": 70, "data.class_noun": "dog", "validation.prompts": "a {identifier} {class_noun}, a b"})
    assert (cfg.train.steps, cfg.train.learning_rate, cfg.adapter.rank) == (70, 2e-4, 8)
    assert cfg.validation.prompts == ["a {identifier} {class_noun}", "a b"]
    assert cfg.instance_prompt == "a photo of sks dog"
    saved = tmp_path / "saved.yaml"
    saved.write_text(cfg.to_yaml())
    assert load_config(saved) == cfg


@pytest.mark.parametrize("key,value", [("train.learning_rate", "1e39"), ("train.learning_rate", "nan"),
                                       ("train.text_encoder_learning_rate", "inf"), ("train.learning_rate", "0")])
def test_learning_rates_beyond_float32_are_refused_by_name(key, value):
    # 1e39 used to reach Adam and overflow mid-step with a traceback.
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(overrides={key: value})


def test_default_learning_rate_depends_on_adapter():
    assert RunConfig().learning_rate == 1e-4
    assert load_config(overrides={"adapter.kind": "full"}).learning_rate == 5e-6


@pytest.mark.parametrize("overrides, culprit", [
    ({"train.steps": 0}, "train.steps"),
    ({"train.mixed_precision": "fp8"}, "train.mixed_precision"),
    ({"adapter.kind": "dora"}, "adapter.kind"),
    ({"train.stepz": 3}, "train.stepz"),
    ({"train.batch_size": "two"}, "train.batch_size"),
    ({"data.resolution": 100}, "data.resolution"),
    ({"train.method": "ppo"}, "train.method"),
    ({"data.instance_prompt": "a {who}"}, "a {who}"),
])
def test_bad_settings_name_the_setting(overrides, culprit):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    assert culprit in str(info.value) and "\n" not in str(info.value)


def run_cli(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("rewardbooth: error: ")
    return lines[0]


def test_cli_missing_instance_dir(tmp_path, capsys):
    missing = tmp_path / "no-such-folder"
    code, err = run_cli(capsys, "train", "--model", "tiny", "--instance-dir", str(missing), "--class-noun", "dog",
                        "--output", str(tmp_path / "out"), "--quiet")
    assert code == 2
    assert str(missing) in one_error_line(err)


def test_cli_missing_class_noun(tmp_path, capsys, subject_dir):
    code, err = run_cli(capsys, "train", "--model", "tiny", "--instance-dir", str(subject_dir), "--output", str(tmp_path / "o"))
    assert code == 2 and "--class-noun" in one_error_line(err)


def test_cli_bad_model_and_bad_config_file(tmp_path, capsys, subject_dir):
    code, err = run_cli(capsys, "train", "--model", "not a model", "--instance-dir", str(subject_dir), "--class-noun", "toy",
                        "--output", str(tmp_path / "o"), "--quiet")
    assert code == 2 and "not a model" in one_error_line(err)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    code, err = run_cli(capsys, "train", "--config", str(bad), "--output", str(tmp_path / "o2"))
    assert code == 2 and str(bad) in one_error_line(err)


def test_cli_refuses_non_empty_output_and_keeps_files(tmp_path, capsys, subject_dir):
    out = tmp_path / "photos"
    out.mkdir()
    keep = out / "holiday.jpg"
    keep.write_bytes(b"precious")
    for extra in ([], ["--overwrite"]):
        code, err = run_cli(capsys, "train", "--model", "tiny", "--instance-dir", str(subject_dir), "--class-noun", "toy",
                            "--output", str(out), "--quiet", *extra)
        assert code == 2 and str(out) in one_error_line(err)
        assert keep.read_bytes() == b"precious"


def test_cli_refuses_output_inside_instance_dir(tmp_path, capsys, subject_dir):
    code, err = run_cli(capsys, "train", "--model", "tiny", "--instance-dir", str(subject_dir), "--class-noun", "toy",
                        "--output", str(subject_dir / "run"), "--quiet")
    assert code == 2 and "overlaps" in one_error_line(err)


def test_cli_generate_on_non_run_folder(tmp_path, capsys):
    code, err = run_cli(capsys, "generate", "--run", str(tmp_path), "--prompt", "a sks dog")
    assert code == 2 and str(tmp_path) in one_error_line(err)


@pytest.mark.slow
def test_cli_train_then_generate(tmp_path, capsys, subject_dir):
    run = tmp_path / "run"
    code = main(["train", "--model", "tiny", "--instance-dir", str(subject_dir), "--class-noun", "toy", "--output", str(run),
                 "--steps", "4", "--num-class-images", "2", "--set", "prior.generation_steps=2", "--validation-every", "2",
                 "--set", "validation.steps=2", "--set", "validation.num_images=1", "--quiet"])
    assert code == 0
    for name in ("config.yaml", "metrics.jsonl", "report.html", "pytorch_lora_weights.safetensors", "samples/step-000004/grid.png"):
        assert (run / name).exists(), name
    assert load_config(run / "config.yaml").train.steps == 4
    code = main(["generate", "--run", str(run), "--prompt", "a sks toy", "-n", "2", "--steps", "2"])
    assert code == 0
    assert len(list((run / "generated").glob("0*.png"))) == 2
    # A second call adds files instead of replacing the first ones.
    main(["generate", "--run", str(run), "--prompt", "a sks toy", "-n", "2", "--steps", "2"])
    assert len(list((run / "generated").glob("0*.png"))) == 4


@pytest.mark.slow
def test_library_warnings_stay_off_the_terminal_unless_verbose(tmp_path, subject_dir):
    import os
    import subprocess
    import sys

    def argv(out):
        return [sys.executable, "-m", "rewardbooth.cli", "train", "--model", "mini", "--instance-dir", str(subject_dir),
                "--class-noun", "ball", "--output", str(tmp_path / out), "--steps", "1", "--num-class-images", "1", "--quiet"]

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    quiet = subprocess.run(argv("quiet"), capture_output=True, text=True, env=env, timeout=300)
    loud = subprocess.run([*argv("loud"), "--verbose"], capture_output=True, text=True, env=env, timeout=300)
    assert quiet.returncode == 0 and loud.returncode == 0, quiet.stderr[-500:]
    assert "torchvision" in loud.stderr  # the warning exists, so its absence below means something
    assert "torchvision" not in quiet.stderr and "float32" not in quiet.stderr and "Loading weights" not in quiet.stderr


def test_presets_bring_their_own_world(tmp_path, monkeypatch):
    from rewardbooth.cli import main
    from rewardbooth.recipes.mini_model import world_words

    # tiny: random-weight judges and reward encoders, never the hub's
    tiny = load_config(overrides={"train.method": "rpo", "model.name": "tiny"})
    assert (tiny.evaluation.align_model, tiny.evaluation.dino_model, tiny.evaluation.clip_model) == ("tiny", "tiny", "tiny")
    # mini: its judges, its guidance and prompts made of its own words (not "Van Gogh rendition")
    mini = load_config(overrides={"train.method": "rpo", "model.name": "mini", "data.class_noun": "ball"})
    assert mini.evaluation.align_model == "mini" and mini.validation.guidance_scale == 4.0
    words = set(world_words()) | {"a", "sks", "ball"}
    for template in mini.rpo.prompts + [mini.data.instance_prompt, mini.data.class_prompt]:
        assert set(mini.format_prompt(template).split()) <= words, template
    # ... and every one of them stays overridable
    assert load_config(overrides={"model.name": "mini", "evaluation.dino_model": "facebook/dino-vits16"}).evaluation.dino_model \
        == "facebook/dino-vits16"
    # generate on a mini run samples with the run's guidance, not SD's 7.5
    import rewardbooth.sampling as sampling
    import rewardbooth.training.finished_run as loading

    seen = {}
    monkeypatch.setattr(loading, "load_run_pipeline", lambda run, device=None, dtype=None: (mini, object()))
    monkeypatch.setattr(sampling, "generate", lambda pipe, prompts, n, settings, progress=False: seen.setdefault("s", settings) and [])
    monkeypatch.setattr(sampling, "save_generated", lambda *a: (_ for _ in ()).throw(SystemExit(0)))
    try:
        main(["generate", "--run", str(tmp_path), "--prompt", "a sks ball"])
    except SystemExit:
        pass
    assert seen["s"].guidance_scale == 4.0 and seen["s"].steps == mini.validation.steps


def test_evaluate_inside_a_run_uses_the_runs_judges(tmp_path):
    from rewardbooth.cli import _run_evaluation_settings

    run = tmp_path / "run"
    (run / "generated").mkdir(parents=True)
    (run / "config.yaml").write_text(load_config(overrides={"model.name": "mini"}).to_yaml())
    assert _run_evaluation_settings(run / "generated").dino_model == "mini"
    assert _run_evaluation_settings(tmp_path) is None


@pytest.mark.parametrize("problem", ["bad model", "unreachable hub id", "too small image", "missing class folder"])
def test_bad_input_is_reported_before_anything_loads_or_is_written(tmp_path, subject_dir, capsys, monkeypatch, problem):
    import time

    from PIL import Image

    import rewardbooth.training.finished_run as loading
    from rewardbooth.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, src in enumerate(sorted(subject_dir.glob("*.png"))):
        Image.open(src).save(photos / f"{i}.png")
    model, extra = "tiny", []
    if problem == "bad model":
        model = "no-such-model"
    elif problem == "unreachable hub id":
        model = "someone/not-in-any-cache"
    elif problem == "too small image":
        Image.new("RGB", (4, 4)).save(photos / "tiny.png")
        model = "mini"
    else:
        extra = ["--class-dir", str(tmp_path / "nowhere")]
    loaded = []
    monkeypatch.setattr(loading, "load_components", lambda *a, **k: loaded.append(a))
    out = tmp_path / "run"
    start = time.perf_counter()
    code = main(["train", "--model", model, "--instance-dir", str(photos), "--class-noun", "toy", "--output", str(out), *extra])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1, err
    assert not loaded and not out.exists()  # nothing loaded, nothing written: the corrected rerun just works
    assert time.perf_counter() - start < 10
    culprit = {"bad model": "no-such-model", "unreachable hub id": "someone/not-in-any-cache", "too small image": "tiny.png",
               "missing class folder": "class-image folder"}[problem]
    assert culprit in err


def test_dpg_cache_latents_needs_center_crops_and_center_crop_gives_them():
    """DPG's defaults crop at random (its released script), which class latents on disk cannot follow: the error
    names the flag that fixes it, and the flag does."""
    from rewardbooth.cli import build_parser, train_overrides

    def config(*flags):
        args = build_parser().parse_args(["train", "--output", "o", "--method", "dpg", "--cache-latents", *flags])
        return load_config(overrides=train_overrides(args))

    with pytest.raises(ConfigError, match="--center-crop"):
        config()
    cfg = config("--center-crop")
    assert cfg.data.center_crop and cfg.data.cache_latents
    with pytest.raises(ConfigError, match="not both"):
        config("--center-crop", "--random-crop")
