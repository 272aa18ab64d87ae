"""The redesign's guarantees: one place knows a method, one typed run folder, plug-in methods,
method-owned optimizers stepped once per optimizer step."""

from __future__ import annotations

import ast
import dataclasses
import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from conftest import metric_series
from safetensors.torch import load_file

from rewardbooth.methods import ENTRY_POINT_GROUP, get_method, load_config, method_registry
from rewardbooth.training.loop import Trainer, train
from rewardbooth.training.run_dir import RunFolder, RunResult, prepare_run_dir

PACKAGE = Path(__file__).resolve().parents[1] / "rewardbooth"


def test_no_method_name_outside_the_methods_package():
    """Method lists, help, checks, curves and variants derive from the registry: no string literal
    outside rewardbooth/methods/ names a method or a named variant."""
    names = {name for name, cls in method_registry().items()} | {v for cls in method_registry().values() for v in cls.variants}
    found = []
    for path in PACKAGE.rglob("*.py"):
        if "methods" in path.relative_to(PACKAGE).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.value!r}")
    assert found == []


def _finished_run(root: Path, tiny_overrides: dict, result: RunResult) -> RunFolder:
    folder = RunFolder(root)
    prepare_run_dir(root, resume=False, overwrite=False)
    cfg = load_config(overrides=tiny_overrides)
    folder.config.write_text(cfg.to_yaml())
    folder.metrics.write_text("".join(json.dumps(r) + "\n" for r in (
        {"step": 3, "loss": 0.5, "seconds_per_step": 0.1}, {"step": 5, "validation": True, "val_reward": 0.3})))
    (root / "pytorch_lora_weights.safetensors").write_bytes(b"")
    folder.write_result(result)
    return folder


@pytest.mark.slow
def test_result_json_round_trips_from_the_writer_to_every_reader(tmp_path, tiny_overrides):
    from rewardbooth.evaluation.run_report import write_run_report
    from rewardbooth.ui.jobs import Workspace

    written = RunResult(method="dreambooth", last_step=7, steps=6, selected_step=5, weights="pytorch_lora_weights.safetensors",
                        base_model="tiny", resolution=32, num_processes=1, cpu_threads=1, flow_matching=False)
    workspace = Workspace(tmp_path / "runs")
    folder = _finished_run(workspace.root / "run", dict(tiny_overrides, **{"train.steps": 6}), written)
    assert RunResult.from_json(folder.result.read_text()) == written == folder.read_result()
    # the loop: a finished run is not trained again
    cfg = load_config(folder.config)
    done = Trainer(cfg, folder.root, progress=False).finished_result()
    assert (done.final_step, done.selected_step, done.weights, done.already_finished) == (7, 5, folder.root / written.weights, True)
    # the web app: the step it shows is the result's last step (metrics stop at 3)
    status = workspace.status("run")
    assert (status["status"], status["step"]) == ("finished", 7)
    # the report: the method and the selected step
    report = write_run_report(folder.root).read_text()
    assert "rewardbooth dreambooth run" in report and "Selected weights: step 5" in report
    # its settings: the U-Net's, without the flow models' flow.* (shown where the base is a flow model)
    assert "train.learning_rate" in report and "flow.weighting" not in report
    folder.write_result(dataclasses.replace(written, flow_matching=True))
    assert "flow.weighting" in write_run_report(folder.root).read_text()


class Toy(get_method("dreambooth")):
    """A plug-in method: DreamBooth plus a learned scalar (an extra module with its own optimizer)
    fitted to the batch's instance loss through the loop's owned-optimizer hook."""

    name = "toy"
    summary = "a test plug-in"

    def prepare(self, ctx):
        super().prepare(ctx)
        self.scale = torch.nn.Linear(1, 1).to(ctx.device)
        self.scale_optimizer = torch.optim.Adam(self.scale.parameters(), lr=0.05)
        self.steps_seen = 0

    def extra_modules(self):
        return [self.scale]

    def extra_optimizers(self):
        return [self.scale_optimizer]

    def use_prepared(self, modules, optimizers):
        self.scale, self.scale_optimizer = modules[0], optimizers[0]

    def state_tensors(self):
        return {"steps_seen": torch.tensor(self.steps_seen)}

    def load_state_tensors(self, state):
        self.steps_seen = int(state["steps_seen"])

    def loss(self, ctx, generator):
        loss, logs = super().loss(ctx, generator)
        fit = (self.scale(torch.ones(1, 1, device=ctx.device)).squeeze() - logs["loss_instance"]) ** 2
        if ctx.owned_backward(fit, self.scale_optimizer, self.scale.parameters()):
            self.steps_seen += 1
        return loss, {**logs, "toy_fit": fit.detach(), "toy_steps": torch.tensor(float(self.steps_seen))}


@pytest.fixture
def toy_plugin(tmp_path, monkeypatch):
    """Install the toy method as a package would: a module and an entry point in a dist-info folder."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "rb_toy_method.py").write_text(textwrap.dedent("""
        from test_architecture import Toy
    """))
    dist = site / "rb_toy-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: rb-toy\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\ntoy = rb_toy_method:Toy\n")
    monkeypatch.syspath_prepend(str(site))
    yield
    sys.modules.pop("rb_toy_method", None)


@pytest.mark.slow
def test_a_plugin_method_trains_checkpoints_and_resumes_exactly(tmp_path, tiny_overrides, toy_plugin, straight_and_resumed):
    assert "toy" in method_registry()
    cfg = load_config(overrides=dict(tiny_overrides, **{"train.method": "toy", "train.steps": 4, "train.checkpoint_every": 1}))
    straight, broken, _ = straight_and_resumed(cfg, tmp_path, get_method("toy"), 3)
    assert metric_series(broken, "toy_fit") == pytest.approx(metric_series(straight, "toy_fit"), rel=1e-6)
    assert metric_series(broken, "loss") == pytest.approx(metric_series(straight, "loss"), rel=1e-6)
    assert metric_series(straight, "toy_steps")[4] == 4.0 == metric_series(broken, "toy_steps")[4]  # restored, not restarted
    for name in ("pytorch_lora_weights.safetensors",):
        a, b = load_file(straight / name), load_file(broken / name)
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert yaml.safe_load((straight / "config.yaml").read_text())["train"]["method"] == "toy"


@pytest.mark.slow
def test_dpg_critic_steps_once_per_optimizer_step_under_gradient_accumulation(tmp_path, tiny_overrides):
    cfg = load_config(overrides=dict(tiny_overrides, **{
        "train.method": "dpg", "adapter.kind": "lora", "adapter.train_text_encoder": False, "data.resolution": 32,
        "data.center_crop": True, "train.steps": 3, "train.gradient_accumulation_steps": 2,
        "dpg.critic_optimizer": "adam", "dpg.critic_lr": 1e-3,
        "evaluation.dino_model": "tiny", "evaluation.clip_model": "tiny", "evaluation.align_model": "tiny"}))
    run = tmp_path / "run"
    prepare_run_dir(run, resume=False, overwrite=False)
    method = get_method("dpg")()
    train(cfg, run, progress=False, method=method)
    optimizer = method.actor.optimizer
    adam_steps = {int(state["step"]) for state in optimizer.state.values()}
    assert method.actor.critic_steps == 3 and adam_steps == {3}


def test_a_hub_model_imports_nothing_from_the_benchmark_world():
    import subprocess

    code = ("import sys\n"
            "from rewardbooth.methods import load_config\n"
            "from rewardbooth.models.loading import resolve_model_path\n"
            "cfg = load_config(overrides={'model.name': 'owner/some-model', 'train.method': 'dpg'})\n"
            "assert resolve_model_path(cfg.model.name) == 'owner/some-model'\n"
            "print(sorted(m for m in sys.modules if m.startswith('rewardbooth.mini')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
    # and the mini preset still registers itself when asked for by name
    assert load_config(overrides={"model.name": "mini"}).evaluation.dino_model == "mini"


def test_the_web_app_offers_every_registered_method_with_one_baseline():
    from rewardbooth.methods import baseline_method
    from rewardbooth.ui.jobs import Workspace

    offered = Workspace.methods()
    assert [m["name"] for m in offered] == list(method_registry())
    assert [m["name"] for m in offered if m["baseline"]] == [baseline_method().name]  # DPG subclasses DreamBooth: not a baseline
