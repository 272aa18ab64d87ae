"""MiniBench on mini-flow (issue #31): the bench samples as its model does, methods' per-model settings apply to their model
only, a model the judges cannot judge is refused, and `bench --suite mini --model mini-flow` runs end to end."""

from __future__ import annotations

import json

import pytest
import yaml

from rewardbooth.cli import main
from rewardbooth.methods.dpg import DPG
from rewardbooth.methods.dreambooth import DreamBooth
from rewardbooth.mini import assets, bench
from rewardbooth.mini.bench import MINI_LORA, method_config
from rewardbooth.mini.preset import FLOW_SAMPLER_GUIDANCE, FLOW_SAMPLER_STEPS
from rewardbooth.recipes.mini_flow_pretrain import main as pretrain
from test_recipes_mini_flow import ARGS  # the tiny recipe run its tests train

pytestmark = pytest.mark.skipif(not (assets.BASE_DIR / "model_index.json").is_file(), reason="mini assets not built")
MINI_STEPS = 10  # mini's bench sampler (docs/minibench.md, "Where the time goes")


@pytest.fixture(scope="module")
def flow_dir(tmp_path_factory):
    """A tiny pretrained mini-flow pipeline folder, as tests/test_recipes_mini_flow.py trains it."""
    folder = tmp_path_factory.mktemp("mini-flow") / "flow"
    assert pretrain(["--out", str(folder), *ARGS]) == 0
    return folder


def _pipeline_folder(tmp_path, pipeline_class: str):
    """A folder that reads as a pipeline of `pipeline_class` (the bench reads only its model_index.json)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": pipeline_class}))
    return str(tmp_path)


def test_validation_follows_the_bench_model(tmp_path):
    for method in ("dreambooth", "dpg", "rpo", "dpg-recon"):
        assert method_config(method, None, {}).validation.steps == MINI_STEPS
        assert method_config(method, None, {"model.name": "mini"}, "lora").validation.steps == MINI_STEPS
        flow = method_config(method, None, {"model.name": "mini-flow"})
        assert (flow.model.name, flow.validation.steps) == ("mini-flow", FLOW_SAMPLER_STEPS), method
        assert method_config(method, None, {"model.name": "mini-flow"}, "lora").validation.steps == FLOW_SAMPLER_STEPS
    assert method_config("rpo", None, {"model.name": "mini-flow", "validation.steps": 3}).validation.steps == 3  # --set wins
    # a folder (a retrained model) is benchmarked as the model its pipeline is, in mini's world
    for pipeline, steps in (("StableDiffusion3Pipeline", FLOW_SAMPLER_STEPS), ("StableDiffusionPipeline", MINI_STEPS)):
        cfg = method_config("dreambooth", None, {"model.name": _pipeline_folder(tmp_path / pipeline, pipeline)})
        assert (cfg.validation.steps, cfg.evaluation.dino_model, cfg.data.instance_prompt) == (steps, "mini", "a {identifier} {class_noun}")


@pytest.mark.parametrize("model, steps, guidance", [("mini", MINI_STEPS, 4.0), ("mini-flow", FLOW_SAMPLER_STEPS, FLOW_SAMPLER_GUIDANCE)])
def test_the_judged_images_are_sampled_as_the_model_samples(tmp_path, monkeypatch, model, steps, guidance):
    """run_mini_bench's sampler: the model's steps and guidance unless --sample-steps says otherwise (no training here)."""
    seen = []

    class Stop(Exception):
        pass

    def record(**work):
        seen.append(work)
        raise Stop

    monkeypatch.setattr(bench, "prepare_class_images", lambda *args: None)
    monkeypatch.setattr(bench, "_run_methods", record)
    for sample_steps in (None, 3):
        with pytest.raises(Stop):
            bench.run_mini_bench(tmp_path / str(sample_steps), ["rpo"], quick=True, num_subjects=1, sample_steps=sample_steps,
                                 overrides={"model.name": model}, progress=False, jobs=1)
    assert [(w["sample_steps"], w["guidance"]) for w in seen] == [(steps, guidance), (3, guidance)]
    info = json.loads((tmp_path / "None" / "rpo" / "bench.json").read_text())
    assert (info["model"], info["sample_steps"], info["guidance_scale"]) == (model, steps, guidance)
    assert info["config"]["validation"]["steps"] == steps


def test_a_methods_settings_for_mini_flow_apply_to_mini_flow_only(tmp_path, monkeypatch):
    monkeypatch.setattr(DPG, "minibench_models", {"mini-flow": {"train.learning_rate": 1.5e-5, "dpg.critic_lr": 0.5}})
    flow_folder = _pipeline_folder(tmp_path, "StableDiffusion3Pipeline")
    for model in ("mini-flow", flow_folder):
        for method in ("dpg", "dpg-recon"):  # variants too: the variant changes the critic, not the rate
            cfg = method_config(method, None, {"model.name": model})
            assert cfg.train.learning_rate == 1.5e-5, (model, method)
        assert method_config("dpg", None, {"model.name": model}).dpg.critic_lr == 0.5
        assert method_config("dpg-recon", None, {"model.name": model}).dpg.critic_lr == 0.01  # the variant beats it
    mini = method_config("dpg", None, {"model.name": "mini"})
    assert (mini.train.learning_rate, mini.dpg.critic_lr) == (DPG.minibench["train.learning_rate"], DPG.minibench["dpg.critic_lr"])
    # the LoRA suite's layer and --set go on top
    assert method_config("dpg", None, {"model.name": "mini-flow"}, "lora").train.learning_rate == MINI_LORA["train.learning_rate"]
    assert method_config("dpg", None, {"model.name": "mini-flow", "train.learning_rate": 7e-4}).train.learning_rate == 7e-4
    flow_rate = DreamBooth.minibench_models["mini-flow"]["train.learning_rate"]
    assert method_config("dreambooth", None, {"model.name": "mini-flow"}).train.learning_rate == flow_rate  # its own


@pytest.mark.parametrize("suite, model", [("mini", "runwayml/stable-diffusion-v1-5"), ("mini-lora", "runwayml/stable-diffusion-v1-5"),
                                          ("mini", "tiny")])
def test_a_model_outside_minis_world_is_refused_before_any_work(tmp_path, monkeypatch, capsys, suite, model):
    monkeypatch.setattr(bench, "prepare_subjects", lambda *args: pytest.fail("the bench started work"))
    out = tmp_path / "bench"
    assert main(["bench", "--suite", suite, "--model", model, "--methods", "dreambooth", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--model {model}" in err[0] and "mini-flow" in err[0], err
    assert not out.exists()


@pytest.mark.slow
def test_bench_suite_mini_on_mini_flow_fine_tunes_the_transformer(flow_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(assets, "FLOW_DIR", flow_dir)  # as if shipped
    out = tmp_path / "bench"
    assert main(["bench", "--suite", "mini", "--model", "mini-flow", "--quick", "--num-subjects", "1", "--steps", "2", "-k", "1",
                 "--sample-steps", "2", "--methods", "dreambooth,dpg,rpo", "--output", str(out), "--quiet",
                 "--set", "prior.num_class_images=2", "--set", "rpo.negatives_per_prompt=1"]) == 0
    summary = json.loads((out / "results.json").read_text())
    assert set(summary) == {"dreambooth", "dpg", "rpo"} and all(row["failed"] == 0 and row["images"] > 0 for row in summary.values())
    for method in summary:
        [run] = (out / method / "subjects").glob("*/run")
        assert (run / "transformer" / "diffusion_pytorch_model.safetensors").is_file() and not (run / "unet").exists(), method
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert (cfg["model"]["name"], cfg["adapter"]["kind"], cfg["validation"]["steps"]) == ("mini-flow", "full", FLOW_SAMPLER_STEPS)
        assert json.loads((out / method / "bench.json").read_text())["sample_steps"] == 2


def test_rpo_draws_its_negatives_as_each_bench_model_samples():
    """RPO's negatives come from the bench's own sampler on either model (mini: 10 DPM-Solver steps; mini-flow: its Euler steps)."""
    for model, steps in (("mini", bench.SAMPLERS["mini"][0]), ("mini-flow", FLOW_SAMPLER_STEPS)):
        cfg = method_config("rpo", None, {"model.name": model})
        assert cfg.rpo.negative_steps == cfg.validation.steps == steps, model
