"""train-many: K subjects in one process, one batched denoiser call and one backward per step, each subject's
run as its solo run would have gone.

Tolerance (where it comes from). A stacked call computes the same sums as the solo kernels in another order
(batched matmuls and grouped convolutions instead of per-subject ones; float32 rounds each op at ~1.2e-7
relative). Through a tiny U-Net's forward and backward and a few AdamW steps, the logged losses then differ by
at most ~1e-6 relative (seen: 0 to 8e-7): LOSS_RTOL = 2e-5 leaves room for larger models and more steps. The
weights are compared in norm, against how far training moved them: AdamW divides each element's gradient by
that element's running RMS, so an element whose gradient is at rounding level (~1e-9 on these tiny models)
takes a step of up to the learning rate in either sign, in the solo and the batched run alike. Elementwise, a
few such elements differ by a fraction of lr per step (seen: <= 6e-4 at lr 1e-3 after 3 steps, full
fine-tuning); in norm the difference stays below ~1e-3 of the update (WEIGHT_RTOL = 2e-2). Mixing two subjects'
adapters (the mutation test below) misses both bounds by orders of magnitude.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import crashing, metric_series, recording_saved_tensors, resident_storages, saved_bytes
from safetensors.torch import load_file

from rewardbooth.methods import get_method, load_config
from rewardbooth.mini.world import make_subject
from rewardbooth.training import many
from rewardbooth.training.loop import train
from rewardbooth.training.many import ManyEngine, SubjectRun, train_many
from rewardbooth.training.run_dir import checkpoint_path, prepare_run_dir, seconds_at

LOSS_RTOL = 2e-5
WEIGHT_RTOL = 2e-2
STEPS = 3

# name -> (method, adapter kind, model, which subject folder, seed, extra settings)
CASES = {
    "db-lora-a": ("dreambooth", "lora", "tiny", 0, 10, {}),
    "db-lora-b": ("dreambooth", "lora", "tiny", 1, 11, {}),
    "dpg-lora": ("dpg", "lora", "tiny", 0, 12, {}),
    "rpo-lora": ("rpo", "lora", "tiny", 1, 13, {}),
    "rpo-lora-2": ("rpo", "lora", "tiny", 0, 19, {}),
    "db-full": ("dreambooth", "full", "tiny", 0, 14, {}),
    "dpg-full": ("dpg", "full", "tiny", 1, 15, {}),
    "rpo-full": ("rpo", "full", "tiny", 0, 16, {}),
    "flux-a": ("dreambooth", "lora", "tiny-flux", 0, 17, {"data.resolution": 64}),
    "flux-b": ("dreambooth", "lora", "tiny-flux", 1, 18, {"data.resolution": 64}),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("many-subjects")
    out = []
    for i in range(2):
        folder = root / f"subject{i}"
        make_subject(seed=3 + i, num_images=4, size=64).save(folder)
        out.append(folder)
    return out


def case_config(name: str, folders: list[Path], **changes):
    method, kind, model, folder, seed, extra = CASES[name]
    overrides = {
        "model.name": model, "train.method": method, "adapter.kind": kind, "adapter.train_text_encoder": False,
        "data.instance_dir": str(folders[folder]), "data.class_noun": "toy", "data.center_crop": True,
        "train.seed": seed, "train.steps": STEPS, "train.batch_size": 1, "train.learning_rate": 1e-3, "train.log_every": 1,
        "train.checkpoint_every": STEPS, "validation.every": 0, "validation.select": False,
        "prior.num_class_images": 2, "prior.generation_steps": 2,
        "rpo.negatives_per_prompt": 1, "rpo.negative_steps": 2,
        "rpo.prompts": ["a {identifier} {class_noun} on the moon", "a green {identifier} {class_noun}"],
        # DPG with the released critic, its actor on from the first step
        "dpg.reward": "recon", "dpg.critic_input": "latent", "dpg.critic_warmup_steps": 0,
        **extra, **changes,
    }
    return load_config(overrides=overrides)


class Recorded:
    """A method that keeps the trained tensors as they were before the first step (to measure the update)."""

    @staticmethod
    def make(method_name: str):
        cls = get_method(method_name)

        class Recording(cls):
            initial = None

            def loss(self, ctx, generator):
                if self.initial is None:
                    unet = ctx.accelerator.unwrap_model(ctx.unet)  # named as checkpoints name them
                    self.initial = {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}
                return super().loss(ctx, generator)

        return Recording()


def run_folder(root: Path, name: str) -> Path:
    prepare_run_dir(root / name, resume=False, overwrite=False)
    return root / name


@pytest.fixture(scope="module")
def solo(folders, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """Every case trained alone with `train`: its run folder and its trained tensors before the first step."""
    root = tmp_path_factory.mktemp("solo")
    out = {}
    for name in CASES:
        method = Recorded.make(CASES[name][0])
        train(case_config(name, folders), run_folder(root, name), progress=False, method=method)
        out[name] = (root / name, method.initial)
    return out


@pytest.fixture(scope="module")
def together(folders, tmp_path_factory):
    """Every case in one train_many call: the tiny subjects in one group (LoRA and full, three methods), the
    tiny-flux ones in another."""
    root = tmp_path_factory.mktemp("many")
    engine = ManyEngine(progress=False)
    runs = [SubjectRun(name, case_config(name, folders), run_folder(root, name)) for name in CASES]
    outcomes = train_many(runs, progress=False, engine=engine)
    return {o.name: o for o in outcomes}, engine


def final_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    """The trained tensors after the last step, by parameter name (the last step's checkpoint)."""
    return load_file(checkpoint_path(run_dir, STEPS) / "trainable_0.safetensors")


def assert_matches_solo(run_dir: Path, solo_dir: Path, initial: dict[str, torch.Tensor]) -> None:
    """Losses per step within LOSS_RTOL; the final weights within WEIGHT_RTOL of the solo run's update, in norm."""
    a, b = metric_series(solo_dir, "loss"), metric_series(run_dir, "loss")
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=LOSS_RTOL), (step, a[step], b[step])
    wa, wb = final_tensors(solo_dir), final_tensors(run_dir)
    assert wa.keys() == wb.keys() == initial.keys()

    def norm(tensors) -> float:
        return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))

    difference = norm(wb[k] - wa[k] for k in wa)
    update = norm(wa[k] - initial[k] for k in wa)
    assert difference <= WEIGHT_RTOL * update, (difference, update)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_each_subject_trains_as_it_would_alone(name, solo, together):
    outcome = together[0][name]
    assert outcome.ok, outcome.error
    assert_matches_solo(outcome.run_dir, *solo[name])


@pytest.mark.slow
def test_the_calls_were_batched(together):
    outcomes, engine = together
    assert all(o.ok for o in outcomes.values())
    # Per step: one stacked call for the five LoRA subjects' training calls (three methods), one for the three full
    # fine-tunes', one for the two RPO LoRA subjects' reference calls (adapters off), one for the tiny-flux group; RPO's
    # full fine-tune alone calls its frozen copy. One backward per step and group.
    assert engine.stats == {"stacked_calls": 4 * STEPS, "alone_calls": STEPS, "backwards": 2 * STEPS}
    assert not engine.unbatchable
    # The subjects share one process, whose CPU time is no one subject's: their runs log wall seconds only.
    assert all(seconds_at(o.run_dir, STEPS) > 0 and seconds_at(o.run_dir, STEPS, clock="cpu") is None for o in outcomes.values())


@pytest.mark.slow
def test_mixing_two_subjects_adapters_fails_the_comparison(folders, solo, tmp_path, monkeypatch):
    """The mutation the exactness test must catch: each subject's call computed with the other's adapter."""
    real = many.run_stacked
    monkeypatch.setattr(many, "run_stacked", lambda modules, calls: real(list(modules)[::-1], calls))
    names = ["db-lora-a", "db-lora-b"]
    runs = [SubjectRun(n, case_config(n, folders), run_folder(tmp_path, n)) for n in names]
    outcomes = train_many(runs, progress=False)
    assert all(o.ok for o in outcomes)
    for name in names:
        with pytest.raises(AssertionError):
            assert_matches_solo(tmp_path / name, *solo[name])


@pytest.mark.slow
def test_a_crashed_subject_resumes_exactly_and_a_bad_one_stops_no_one(folders, solo, tmp_path):
    names = ["db-lora-a", "db-lora-b"]
    cfgs = {n: case_config(n, folders, **{"train.checkpoint_every": 1}) for n in names}
    bad = case_config("db-lora-a", folders, **{"data.instance_dir": str(tmp_path / "missing")})
    runs = [SubjectRun("db-lora-a", cfgs["db-lora-a"], run_folder(tmp_path, "a"), method=crashing(get_method("dreambooth"), 3)),
            SubjectRun("db-lora-b", cfgs["db-lora-b"], run_folder(tmp_path, "b")),
            SubjectRun("broken", bad, run_folder(tmp_path, "broken"))]
    first = {o.name: o for o in train_many(runs, progress=False)}
    assert "missing" in first["broken"].error and first["broken"].result is None  # named before anything trained
    assert "KeyboardInterrupt" in first["db-lora-a"].error  # killed during its step 3 ...
    assert first["db-lora-b"].ok  # ... while the other subject trained on to the end
    again = train_many([SubjectRun(n, cfgs[n], tmp_path / d) for n, d in zip(names, "ab")], resume=True, progress=False)
    assert [o.ok for o in again] == [True, True]
    assert not again[0].result.already_finished and again[1].result.already_finished
    for name, d in zip(names, "ab"):
        assert_matches_solo(tmp_path / d, *solo[name])


def test_settings_that_cannot_be_shared_are_refused_by_name(folders, tmp_path):
    runs = [SubjectRun("accumulates", case_config("db-lora-a", folders, **{"train.gradient_accumulation_steps": 2}), tmp_path / "x"),
            SubjectRun("drops", case_config("db-lora-b", folders, **{"adapter.dropout": 0.1}), tmp_path / "y"),
            SubjectRun("drops", case_config("db-lora-b", folders), tmp_path / "z")]
    ready, failed = many.check_subjects(runs)
    assert ready == []
    assert ["gradient_accumulation_steps" in failed[0].error, "adapter.dropout" in failed[1].error, "twice" in failed[2].error] == [True] * 3


def _measuring(method_cls, saved: dict, weights: set):
    """The method, recording what autograd saves in its thread during its first loss, and its weights' storages."""
    class Measured(method_cls):
        measured = False

        def loss(self, ctx, generator):
            if self.measured:
                return super().loss(ctx, generator)
            self.measured = True
            weights.update(resident_storages(ctx, self))
            with recording_saved_tensors(saved):
                return super().loss(ctx, generator)

    return Measured()


def test_the_memory_estimate_of_k_subjects_matches_a_real_k_subject_step(folders, tmp_path, monkeypatch):
    """Three LoRA subjects at 32 px: the estimate for K subjects (training/memory.for_subjects) against the bytes autograd
    really saves in the K-subject step (in the subjects' threads and in the stacked call), weights excluded; and
    --subjects-per-batch auto picking the largest K that fits."""
    from rewardbooth.training import memory

    saved: dict[int, torch.Tensor] = {}
    weights: set[int] = set()
    real = many.run_stacked

    def measured(modules, calls):
        with recording_saved_tensors(saved):
            return real(modules, calls)

    monkeypatch.setattr(many, "run_stacked", measured)
    names = ["dpg-lora", "db-lora-a", "db-lora-b"]  # the largest first: "auto" extrapolates from the largest seen

    def runs(where: Path, measure: bool):
        return [SubjectRun(n, case_config(n, folders, **{"data.resolution": 32, "train.steps": 1, "train.checkpoint_every": 0}),
                           run_folder(where, n), method=_measuring(get_method(CASES[n][0]), saved, weights) if measure else None)
                for n in names]

    engine = ManyEngine(progress=False)
    assert all(o.ok for o in train_many(runs(tmp_path / "three", True), progress=False, engine=engine))
    estimate = engine.last_estimate
    activations = saved_bytes(saved, weights)
    assert estimate.activations == pytest.approx(activations, rel=0.05), (estimate, activations)
    assert estimate.workspace > 0 and estimate.gradients > 0 and estimate.optimizer == 2 * estimate.gradients  # AdamW, float32

    # --subjects-per-batch auto on a device one byte too small for the three: two train together, the third after them.
    monkeypatch.setattr(memory, "device_capacity", lambda device: int((estimate.total - 1) / many.AUTO_FILL))
    engine = ManyEngine(progress=False)
    outcomes = train_many(runs(tmp_path / "auto", False), progress=False, subjects_per_batch="auto", engine=engine)
    assert all(o.ok for o in outcomes) and not any(o.deferred for o in outcomes)
    assert engine.stats["backwards"] == 2  # two batches of one step


@pytest.mark.slow
def test_train_many_cli_spreads_subjects_over_two_processes(folders, tmp_path, capfd):
    """`rewardbooth train-many SUBJECTS.yaml --num-processes 2`: each CPU process trains its share of the subjects
    alone (no DDP between different subjects); a bad subject is named before training, the others train, exit 1."""
    import yaml

    from rewardbooth.cli import main

    subjects = tmp_path / "subjects.yaml"
    subjects.write_text(yaml.safe_dump({
        "output": "runs",
        "settings": {"model.name": "tiny", "train": {"steps": 2, "checkpoint_every": 0}, "data.resolution": 32,
                     "prior.num_class_images": 1, "prior.generation_steps": 2, "validation.every": 0, "train.log_every": 1},
        "subjects": [{"name": "first", "instance_dir": str(folders[0]), "class_noun": "toy"},
                     {"name": "second", "instance_dir": str(folders[1]), "class_noun": "toy", "settings": {"train.seed": 7}},
                     {"name": "third", "instance_dir": str(folders[0]), "class_noun": "toy", "settings": {"train.seed": 8}},
                     {"name": "broken", "instance_dir": "no-such-folder", "class_noun": "toy"}]}))
    code = main(["train-many", str(subjects), "--num-processes", "2", "--quiet"])
    out, err = capfd.readouterr()
    assert code != 0  # one subject could not train
    assert "subject broken:" in err and "no-such-folder" in err
    for name in ("first", "second", "third"):
        assert (tmp_path / "runs" / name / "result.json").is_file(), (out, err)
    assert not (tmp_path / "runs" / "broken").exists()
    print(out)
    assert "(process 1 of 2): 2 of 2 subjects trained" in out  # first and third
    assert "(process 2 of 2): 1 of 2 subjects trained; failed: broken" in out  # second and broken


def test_judges_stay_on_the_device_while_a_group_trains_and_park_after(folders, tmp_path, monkeypatch):
    """A subject's validation must not park the shared judges (park_encoders) while another subject's DPG critic or
    validation may be encoding with them in its thread; the engine parks them once the group is done."""
    from rewardbooth.rewards import encoders

    class Judge:  # stands in for a loaded judge: records each park and whether a group was running
        def __init__(self):
            self.parks = []

        def park(self):
            self.parks.append("during the group" if many._ACTIVE is not None else "after")

    judge = Judge()
    monkeypatch.setattr(encoders, "_LOADED", [judge])
    settings = {"train.steps": 2, "train.checkpoint_every": 0, "data.resolution": 32, "validation.every": 1,
                "validation.num_images": 1, "validation.steps": 2, "validation.batch_size": 1}
    names = ["db-lora-a", "db-lora-b"]
    runs = [SubjectRun(n, case_config(n, folders, **settings), run_folder(tmp_path, n)) for n in names]
    assert all(o.ok for o in train_many(runs, progress=False))
    assert all(len(list((tmp_path / n / "samples").iterdir())) == 2 for n in names)  # each validated at steps 1 and 2
    assert judge.parks == ["after"]  # none of the four validations parked; the engine did, once, after the group
    encoders.park_encoders()  # and parking works again outside a group
    assert judge.parks == ["after", "after"]
