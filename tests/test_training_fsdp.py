"""Sharded full fine-tuning (train.fsdp, `--fsdp`): 2 CPU processes over gloo, each run against the same run unsharded.

Tolerance. Sharded and unsharded runs see the same batches, noise and timesteps (seeded per step and process), but
DDP averages gradients with an all-reduce and FSDP with a reduce-scatter over shards, and the gradient norm is summed
in another order: gradients differ in the last float32 bits. AdamW divides by sqrt(v): for the few weights whose
gradient is near zero (|g| ~ eps) that rounding moves their update by up to a whole step, so weights are compared
through the whole update, ||(w_sharded - w0) - (w_unsharded - w0)|| / ||w_unsharded - w0||: measured 7e-4 to 9e-4
in float32 (DreamBooth, DPG, RPO), allowed 1e-2; logged losses agree to 1e-7 relative, allowed 1e-5. Under bf16
the float32 masters' last-bit differences round some weights to another bf16 value (2^-8 relative) on the next
forward: measured 1.0e-2 and 2.2e-4 (FLUX.1 at 32 px), allowed 5e-2 and 1e-3. A gathering or sharding bug moves half
the weights by their own size (relative difference ~1). A killed sharded run resumed with --resume is the
uninterrupted one exactly (same process count, same reduction order).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import load_script
from safetensors import safe_open
from safetensors.torch import load_file

from rewardbooth.cli import launch_processes, main
from rewardbooth.errors import CheckpointError, ConfigError
from rewardbooth.methods import load_config

CHILD = Path(__file__).with_name("fsdp_child.py")
COMMON = ["--steps", "4", "--checkpoint-every", "2", "--set", "train.log_every=1", "--quiet", "--set", "validation.every=0",
          "--full", "--num-processes", "2"]
CASES = {  # name -> (model, denoiser folder, flags)
    # with a budget at step 2: that step's weights are gathered mid-run into budgets/
    "dreambooth": ("tiny", "unet", ["--method", "dreambooth", "--resolution", "32", "--num-class-images", "2",
                                    "--set", "prior.generation_steps=2", "--set", "train.save_steps=[2]"]),
    # the critic stays replicated (DDP), the U-Net and the trained text encoder are sharded; 2 micro-batches per step
    "dpg": ("tiny", "unet", ["--method", "dpg", "--resolution", "32", "--num-class-images", "2", "--set", "prior.generation_steps=2",
                             "--train-text-encoder", "--lr", "1e-4", "--gradient-accumulation", "2"]),
    # the frozen reference copy sharded too; validation every 2 steps with selection (RPO's default): the best is gathered
    "rpo": ("tiny", "unet", ["--method", "rpo", "--resolution", "32", "--lr", "1e-4", "--set", "rpo.negatives_per_prompt=1",
                             "--set", "rpo.negative_steps=2", "--set", "validation.every=2", "--set", "validation.steps=2", "--set", "validation.num_images=1"]),
    # a flow transformer, in bf16 with gradient checkpointing (at 32 px, 4 image tokens: 64 px cost 4x the time on a CPU,
    # where bf16 convolutions are slow, for nothing sharding does differently)
    "flux-bf16-checkpointing": ("tiny-flux", "transformer", ["--method", "dreambooth", "--resolution", "32", "--no-prior",
                                                             "--lr", "1e-4", "--mixed-precision", "bf16", "--gradient-checkpointing"]),
}
TOLERANCE = {"fp32": {"loss": 1e-5, "update": 1e-2}, "bf16": {"loss": 1e-3, "update": 5e-2}}
KILL_AT = 3  # the killed run dies in step 3's loss, after step 2's checkpoint
NEEDS = {  # test -> the launch's items it reads ({case}: its parameter); only the selected tests' items are run
    "test_sharded_full_fine_tuning_matches_the_unsharded_run": ["{case}-sharded", "{case}-unsharded"],
    "test_gathered_weights_load_with_diffusers_and_transformers": ["dreambooth-sharded", "dpg-sharded",
                                                                   "flux-bf16-checkpointing-sharded"],
    "test_a_killed_sharded_run_resumes_to_the_uninterrupted_one": ["dreambooth-sharded", "killed"],
    "test_per_process_memory_estimate_matches_a_real_sharded_step": ["measure"],
}


def precision(case: str) -> str:
    return "bf16" if "bf16" in case else "fp32"


class Launch:
    """Every run the slow tests read, made by one 2-process launch of fsdp_child.py: the sharded and unsharded runs,
    the measured step and, last, the killed run. A launch per run paid each time for the launcher, the processes'
    imports, their process group and the first use of FSDP's code paths: most of a tiny run's time. Each item runs as
    `rewardbooth train` runs it, in processes that ran the items before (fsdp_child.py says why that changes
    nothing); the resume alone needs a launch of its own (`rewardbooth train --num-processes 2 --resume`, through the
    CLI's own launch)."""

    def __init__(self, root: Path, subject: Path):
        self.root, self.subject = root, subject
        self.items: dict[str, dict] = {}
        self.rc: int | None = None

    def argv(self, case: str, sharded: bool, run: Path) -> list[str]:
        model, _, flags = CASES[case]
        return ["train", "--model", model, "--instance-dir", str(self.subject), "--class-noun", "toy", "--output", str(run),
                *COMMON, *flags, *(["--fsdp"] if sharded else [])]

    def plan(self, wanted: set[str]) -> list[dict]:
        items = [{"name": f"{case}-{kind}", "train": self.argv(case, kind == "sharded", self.root / f"{case}-{kind}")}
                 for case in CASES for kind in ("sharded", "unsharded")]
        items.append({"name": "measure", "measure": [str(self.root / "measured"), str(self.root / "measured-run"),
                                                     measure_overrides(self.subject)]})
        items.append({"name": "killed", "kill": [KILL_AT, self.argv("dreambooth", True, self.root / "killed")]})
        return [item for item in items if item["name"] in wanted]  # the kill stays last: it ends the launch

    def run(self, wanted: set[str]) -> None:
        items = self.plan(wanted)
        (self.root / "plan.json").write_text(json.dumps({"log": str(self.root / "log"), "items": items}))
        try:
            self.rc = launch_processes(2, [str(self.root / "plan.json")], program=(str(CHILD),)) if items else 0
        finally:  # written even if the launch raised: a worker waiting on the lock then fails instead of launching again
            (self.root / "launched.json").write_text(json.dumps({"rc": self.rc}))

    def load(self) -> Launch:
        self.items = {item["name"]: item for item in json.loads((self.root / "plan.json").read_text())["items"]}
        self.rc = json.loads((self.root / "launched.json").read_text())["rc"]
        return self

    def logged(self) -> list[dict[str, dict]]:
        """Per process: item name -> {rc, seconds}, for each item the process finished."""
        logs = [self.root / "log" / f"rank{r}.jsonl" for r in (0, 1)]
        return [{(r := json.loads(line))["name"]: r for line in log.read_text().splitlines()} if log.exists() else {}
                for log in logs]

    def finished(self, name: str) -> dict:
        assert name in self.items, f"{name} was not in the launch (NEEDS names what each test reads)"
        logged = [log.get(name) for log in self.logged()]
        assert all(r is not None and r["rc"] == 0 for r in logged), (name, logged, f"launch rc {self.rc}")
        return self.items[name]

    def get(self, case: str, sharded: bool) -> Path:
        name = f"{case}-{'sharded' if sharded else 'unsharded'}"
        self.finished(name)
        return self.root / name


@pytest.fixture(scope="module")
def built_presets():
    """The presets and judges the runs load, built here once: two processes building one at once can collide."""
    from rewardbooth.models.presets import find_preset
    from rewardbooth.rewards.encoders import tiny_encoder_path

    for name in ("tiny", "tiny-flux"):
        find_preset(name).path()
    for kind in ("dino", "clip", "align"):
        tiny_encoder_path(kind)


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory, subject_dir, built_presets) -> Launch:
    """The launch, once per session: under pytest-xdist the workers share it through the session's temp folder (the
    first to get here launches, under a lock; the others wait for it and read its runs)."""
    from filelock import FileLock

    wanted = {name.format(**(item.callspec.params if hasattr(item, "callspec") else {}))
              for item in request.session.items if getattr(item, "module", None) is request.module
              for name in NEEDS.get(getattr(item, "originalname", ""), [])}
    shared = os.environ.get("PYTEST_XDIST_WORKER") is not None
    root = tmp_path_factory.getbasetemp().parent / "fsdp-launch" if shared else tmp_path_factory.mktemp("fsdp-launch")
    with FileLock(f"{root}.lock"):
        if not (root / "launched.json").exists():
            root.mkdir(exist_ok=True)
            Launch(root, subject_dir).run(wanted)
    return Launch(root, subject_dir).load()


def losses(run: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def weights(run: Path, folder: str) -> dict[str, torch.Tensor]:
    (file,) = (run / folder).glob("*.safetensors")
    return load_file(str(file))


def base_weights(model: str, folder: str) -> dict[str, torch.Tensor]:
    from rewardbooth.models.loading import load_components

    components = load_components(model)
    module = components.unet if folder in ("unet", "transformer") else components.text_encoder
    return {n: p.detach().float() for n, p in module.state_dict().items()}


def update_difference(sharded: dict, unsharded: dict, base: dict) -> float:
    """||(sharded - base) - (unsharded - base)|| / ||unsharded - base|| over every trained tensor."""
    diff = torch.cat([(sharded[k].float() - unsharded[k].float()).flatten() for k in unsharded])
    update = torch.cat([(unsharded[k].float() - base[k]).flatten() for k in unsharded])
    return float(diff.norm() / update.norm())


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_sharded_full_fine_tuning_matches_the_unsharded_run(runs, case):
    sharded, unsharded = runs.get(case, True), runs.get(case, False)
    model, folder, _ = CASES[case]
    tol = TOLERANCE[precision(case)]
    got, want = losses(sharded), losses(unsharded)
    assert [s for s, _ in got] == [s for s, _ in want] == [1, 2, 3, 4]  # one line per step: the main process logs
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=tol["loss"])
    # DPG also trains the text encoder (sharded, gathered into text_encoder/ like the U-Net); DreamBooth keeps a budget
    folders = {"dpg": [folder, "text_encoder"], "dreambooth": [folder, f"budgets/step-000002/{folder}"]}.get(case, [folder])
    for name in folders:
        s, u = weights(sharded, name), weights(unsharded, name)
        assert {k: v.shape for k, v in s.items()} == {k: v.shape for k, v in u.items()}
        assert all(v.dtype == torch.float32 for v in s.values())  # the trained float32 masters, gathered whole
        assert update_difference(s, u, base_weights(model, name.split("/")[-1])) < tol["update"], name
    result = json.loads((sharded / "result.json").read_text())
    assert result == json.loads((unsharded / "result.json").read_text())  # the same selected step (RPO) and all

    # Checkpoints: each process its shards of the trained weights and of AdamW's state (safetensors with the layout in
    # the header), nothing written by torch.distributed.checkpoint (whose metadata is a pickle).
    checkpoint = sharded / "checkpoints" / "checkpoint-000004"
    names = {p.name for p in checkpoint.iterdir()}
    trained = 2 if case == "dpg" else 1
    shards = {f"trainable_{i}.rank{r}.safetensors" for i in range(trained) for r in (0, 1)}
    shards |= {f"optimizer_shards.rank{r}.safetensors" for r in (0, 1)}
    assert shards <= names
    assert not any(n.endswith((".distcp", ".metadata")) or n.startswith("pytorch_model_fsdp") for n in names)
    assert ("optimizer.bin" in names) == (case == "dpg")  # only DPG's replicated critic has an unsharded optimizer
    for name in shards:
        with safe_open(str(checkpoint / name), "pt") as f:
            assert f.metadata()["processes"] == "2"


@pytest.mark.slow
def test_gathered_weights_load_with_diffusers_and_transformers(runs):
    """The result is the usual folder: from_pretrained reads it without rewardbooth, into the weights the run trained."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextModel

    for case, cls, folder in (("dreambooth", UNet2DConditionModel, "unet"), ("dpg", CLIPTextModel, "text_encoder"),
                              ("flux-bf16-checkpointing", FluxTransformer2DModel, "transformer")):
        run = runs.get(case, True)
        loaded = cls.from_pretrained(run / folder)
        on_disk = weights(run, folder)
        state = loaded.state_dict()
        assert set(on_disk) <= set(state)
        assert all(torch.equal(state[k], v) for k, v in on_disk.items()), case
        assert json.loads((run / folder / "config.json").read_text()).get("_class_name", cls.__name__) == cls.__name__


@pytest.mark.slow
def test_a_killed_sharded_run_resumes_to_the_uninterrupted_one(runs):
    uninterrupted = runs.get("dreambooth", True)
    # Every process SIGKILLed in step 3's loss, after step 2's checkpoint: nothing is cleaned up, as in a killed job.
    # The launch's last item, so the launch failed; every item before it finished, and it never did.
    _, argv = runs.items["killed"]["kill"]
    assert list(runs.items)[-1] == "killed" and runs.rc not in (0, None)
    assert all("killed" not in log and len(log) == len(runs.items) - 1 for log in runs.logged())
    run = runs.root / "killed"
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-000002"] and not (run / "result.json").exists()

    assert main(argv + ["--resume"]) == 0
    assert losses(run) == losses(uninterrupted)  # exactly: the same shards, optimizer state, schedule and RNG
    for name, tensor in weights(uninterrupted, "unet").items():
        assert torch.equal(weights(run, "unet")[name], tensor), name


def measure_overrides(subject: Path) -> dict:
    return {"model.name": "tiny", "train.method": "rpo", "adapter.kind": "full", "train.fsdp": True,
            "train.mixed_precision": "bf16", "train.gradient_checkpointing": True, "data.instance_dir": str(subject),
            "data.class_noun": "toy", "data.resolution": 32, "rpo.negatives_per_prompt": 1, "rpo.negative_steps": 2,
            "evaluation.align_model": "tiny", "evaluation.clip_model": "tiny", "validation.every": 0,
            # one prompt, so one negative to generate (in bf16, two thirds of the set-up's time on a CPU): a step's batch
            # is one reference and one negative however many there are (eight prompts gave the same numbers, to the byte)
            "rpo.prompts": ["a {identifier} {class_noun} on the Moon"]}


@pytest.mark.slow
def test_per_process_memory_estimate_matches_a_real_sharded_step(runs):
    """RPO full fine-tuning in bf16 with gradient checkpointing, sharded over 2 processes: the estimate's weights
    (the U-Net's and its frozen copy's shards, the rest whole), gradients and AdamW state are what each process
    holds after a real step, byte for byte; its activations what autograd saved (5 %, as for one process); its
    `gathered` term bounds the whole weights a process held at once during the forward."""
    out, _, overrides = runs.finished("measure")["measure"]
    records = [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in (0, 1)]
    for record in records:
        assert record["sharded"] == ["UNet2DConditionModel", "UNet2DConditionModel"]  # the trained U-Net and RPO's copy
        estimate, measured = record["estimate"], record["measured"]
        for term in ("weights", "gradients", "optimizer"):
            assert measured[term] <= estimate[term], (term, record)
        assert measured["activations"] == pytest.approx(estimate["activations"], rel=0.05), record
        assert 0 < measured["gathered_in_forward"] <= estimate["gathered"], record
    rank0 = records[0]  # FSDP pads every shard to the first process's: its share is the estimate exactly
    assert {t: rank0["measured"][t] for t in ("weights", "gradients", "optimizer")} == \
        {t: rank0["estimate"][t] for t in ("weights", "gradients", "optimizer")}

    # The memory table (benchmarks/bench_memory.py table --sharded, meta weights, no process) gives the same estimate.
    bench = load_script("benchmarks/bench_memory.py")
    setup = {k: v for k, v in overrides.items() if k.startswith(("adapter.", "train.", "rpo."))}
    table = bench.table_estimate("tiny", "rpo", setup, 32, processes=2)
    assert {t: getattr(table, t) for t in rank0["estimate"]} == rank0["estimate"]


def test_the_estimate_divides_what_is_sharded_by_the_process_count():
    """The formula alone, on a small model (every weight trained): shards of N, everything else whole."""
    from rewardbooth.training import memory

    model = torch.nn.Sequential(torch.nn.Linear(10, 7), torch.nn.Linear(7, 3))
    trained = list(model.parameters())
    one = memory.estimate(resident=[model], trained=trained, probes=[])
    for n in (2, 4, 8):
        e = memory.estimate(resident=[model], trained=trained, probes=[], processes=n, sharded=[model])
        rows = sum(-(-p.shape[0] // n) * (p.numel() // p.shape[0]) for p in trained)  # each tensor's largest shard
        assert (e.weights, e.gradients, e.optimizer) == (4 * rows, 4 * rows, 8 * rows)
        assert e.weights < one.weights and e.gathered > 0
    ddp = memory.estimate(resident=[model], trained=trained, probes=[], processes=2)
    assert ddp.gradients == 2 * one.gradients and ddp.weights == one.weights  # replicated: DDP's buckets, whole weights


# --- what cannot work: one-line errors, before anything is written -----------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    ({"adapter.kind": "lora"}, "sharding buys nothing"),
    ({"train.mixed_precision": "fp16"}, "use --mixed-precision bf16"),
    ({"train.optimizer": "prodigy"}, "use adamw"),
    ({"train.ema_decay": 0.99}, "train.ema_decay is not supported with train.fsdp"),
])
def test_settings_sharding_cannot_take_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides={"train.method": "dreambooth", "adapter.kind": "full", "train.fsdp": True, **overrides})


def test_sharding_over_one_process_is_refused_before_the_folder_is_made(subject_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = ["train", "--model", "tiny", "--instance-dir", str(subject_dir), "--class-noun", "toy", "--output", str(tmp_path / "run"),
            "--full", "--fsdp"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--num-processes N" in err
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # accelerate launch --use_fsdp: not how rewardbooth shards
    assert main(argv[:-1]) == 2
    assert "pass --fsdp" in capsys.readouterr().err


def test_a_checkpoint_sharded_over_another_process_count_is_refused_by_name(tmp_path):
    """Shards are read back only by as many processes as wrote them (resume with that --num-processes)."""
    from rewardbooth.training import sharding

    module = torch.nn.Linear(4, 3)
    for rank in (0, 1):
        sharding.save_shards(module, tmp_path, "trainable_0", processes=2, rank=rank)
    sharding.load_shards(module, tmp_path, "trainable_0", processes=2, rank=1)
    for rank in (0, 2):  # rank 0 reads a header written by 2 processes; rank 2 finds no file of its own
        with pytest.raises(CheckpointError, match="written by 2 sharded processes.*--num-processes 2"):
            sharding.load_shards(module, tmp_path, "trainable_0", processes=3, rank=rank)


def test_optimizer_shards_round_trip_without_pickles(tmp_path):
    from rewardbooth.training import sharding

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))]
    opt = torch.optim.AdamW([{"params": params[:1], "lr": 1e-3}, {"params": params[1:], "lr": 2e-3}])
    for _ in range(2):
        sum((p ** 2).sum() for p in params).backward()
        opt.step()
    sharding.save_optimizer_shards(opt, tmp_path, processes=2, rank=1)
    fresh = torch.optim.AdamW([{"params": params[:1], "lr": 9.0}, {"params": params[1:], "lr": 9.0}])
    sharding.load_optimizer_shards(fresh, tmp_path, processes=2, rank=1)
    assert [g["lr"] for g in fresh.param_groups] == [1e-3, 2e-3]
    for p in params:
        for key, value in opt.state[p].items():
            assert torch.equal(fresh.state[p][key], value), key
    with open(tmp_path / "optimizer_shards.rank1.safetensors", "rb") as f:
        assert b"\x80\x04" not in f.read(16)  # a safetensors header, not a pickle
