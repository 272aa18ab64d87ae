"""The peak-memory estimate printed before training, checked against what a real step holds."""

from __future__ import annotations

import pytest
import torch
from conftest import load_script, recording_saved_tensors, resident_storages, saved_bytes

from rewardbooth.methods import get_method, load_config
from rewardbooth.training import memory
from rewardbooth.training.loop import Trainer
from rewardbooth.training.run_dir import prepare_run_dir

TINY_JUDGES = {"evaluation.dino_model": "tiny", "evaluation.clip_model": "tiny", "evaluation.align_model": "tiny"}
SETUPS = {
    "dreambooth-lora": {"train.method": "dreambooth"},
    "dreambooth-full-checkpointed": {"train.method": "dreambooth", "adapter.kind": "full", "train.gradient_checkpointing": True},
    "dreambooth-bf16-no-prior": {"train.method": "dreambooth", "train.mixed_precision": "bf16", "prior.enabled": False},
    "rpo-lora": {"train.method": "rpo", "rpo.negatives_per_prompt": 1, "rpo.negative_steps": 2},
    "dpg-feature-critic": {"train.method": "dpg", "dpg.reward": "dino", "dpg.critic_input": "features"},
    "dpg-direct-text-encoder": {"train.method": "dpg", "dpg.reward": "dino", "dpg.actor": "direct",
                                "adapter.train_text_encoder": True},
    # Z-Image's step sees its prompts' own tokens: both default prompts with the chat template, padded to 64 inside the
    # transformer (tiny-zimage's tokens are bytes), the estimate's prompt length.
    "zimage-dreambooth-lora": {"model.name": "tiny-zimage", "data.resolution": 64, "train.method": "dreambooth"},
    # Qwen-Image's step sees the batch's longest prompt and masks the shorter one's padding: an instance prompt of 64
    # tokens with the template's tail (tiny-qwenimage's tokens are about bytes), the estimate's probe_tokens, and the
    # default class prompt, padded and masked as the estimate's second row is.
    "qwenimage-dreambooth-lora": {"model.name": "tiny-qwenimage", "data.resolution": 64, "train.method": "dreambooth",
                                  "data.instance_prompt": "a photo of {identifier} {class_noun} on a wooden table in morning light"},
}


def _measuring(method_cls):
    """The method, recording the bytes autograd saves during its first real loss (weights excluded)."""

    class Measured(method_cls):
        measured: int | None = None

        def loss(self, ctx, generator):
            if self.measured is not None:
                return super().loss(ctx, generator)
            weights, saved = resident_storages(ctx, self), {}
            with recording_saved_tensors(saved):
                result = super().loss(ctx, generator)
            self.measured = saved_bytes(saved, weights)
            return result

    return Measured


def _trained(tmp_path, tiny_overrides, setup: dict, steps: int = 1, progress: bool = False) -> Trainer:
    cfg = load_config(overrides={**tiny_overrides, **TINY_JUDGES, "data.resolution": 32, "train.steps": steps, **setup})
    run_dir = tmp_path / "run"
    prepare_run_dir(run_dir, resume=False, overwrite=False)
    trainer = Trainer(cfg, run_dir, method=_measuring(get_method(cfg.train.method))(), progress=progress)
    trainer.run()
    return trainer


@pytest.mark.parametrize("setup", SETUPS.values(), ids=SETUPS.keys())
def test_activation_estimate_matches_what_a_real_step_saves(tmp_path, tiny_overrides, setup, capsys):
    trainer = _trained(tmp_path, tiny_overrides, setup, progress=True)
    estimate, measured = trainer.memory_estimate, trainer.method.measured
    assert estimate is not None and measured > 0
    assert estimate.activations == pytest.approx(measured, rel=0.05), (estimate, measured)
    assert "estimated peak memory" in capsys.readouterr().out


def test_a_dropped_branch_and_what_follows_it_are_each_counted():
    """Qwen-Image's transformer computes its last block's text stream and drops it: autograd frees what that branch
    saved before the forward ends, and the allocator hands the freed addresses to the tensors after it. Each saved
    storage counts once, whatever address comes next (the count moved by up to 64 KiB from run to run before)."""
    layer, blocks = torch.nn.Linear(64, 64), 8

    def probe():
        out = 0
        for _ in range(blocks):
            dropped = torch.nn.functional.gelu(layer(torch.ones(8, 64)))  # saves its input and the linear's output
            del dropped  # freed, with what it saved
            out = out + torch.nn.functional.gelu(layer(torch.ones(8, 64))).sum()  # may get the freed addresses
        return out

    total, largest = memory.saved_activation_bytes([probe], [layer])
    assert (total, largest) == (blocks * 4 * 8 * 64 * 4, 8 * 64 * 4)  # per block 2 inputs, 2 gelu inputs; weights resident


@pytest.mark.slow
def test_checkpointing_and_half_precision_lower_the_estimate(tmp_path, tiny_overrides):
    plain = _trained(tmp_path / "plain", tiny_overrides, {"adapter.kind": "full"}).memory_estimate
    checkpointed = _trained(tmp_path / "ckpt", tiny_overrides, {"adapter.kind": "full", "train.gradient_checkpointing": True}).memory_estimate
    half = _trained(tmp_path / "half", tiny_overrides, {"adapter.kind": "full", "train.mixed_precision": "bf16"}).memory_estimate
    assert checkpointed.activations < 0.5 * plain.activations
    assert half.activations < 0.75 * plain.activations
    # Full fine-tuning trains every U-Net weight in float32: gradients as large as the U-Net, AdamW twice that.
    assert plain.optimizer == 2 * plain.gradients


@pytest.mark.slow
def test_resident_weights_include_what_the_method_keeps(tmp_path, tiny_overrides):
    """RPO's full fine-tuning keeps a frozen copy of the U-Net; DPG's feature critic a judge encoder."""
    setups = {"db": {"adapter.kind": "full"}, "rpo": {**SETUPS["rpo-lora"], "adapter.kind": "full"},
              "dpg": {**SETUPS["dpg-feature-critic"], "adapter.kind": "full"}}
    estimates = {name: _trained(tmp_path / name, tiny_overrides, setup) for name, setup in setups.items()}
    from rewardbooth.models.loading import load_components

    unet_bytes = sum(p.numel() * p.element_size() for p in load_components("tiny").unet.parameters())
    db, rpo, dpg = (estimates[n].memory_estimate.weights for n in ("db", "rpo", "dpg"))
    assert rpo - db == pytest.approx(unet_bytes, rel=0.02)
    assert dpg > db


@pytest.mark.parametrize("optimizer", ["adamw", "prodigy"])
def test_optimizer_term_matches_the_state_a_real_optimizer_allocates(optimizer):
    from rewardbooth.config import TrainConfig
    from rewardbooth.training.options import make_optimizer

    params = [torch.nn.Parameter(torch.randn(64, 80)), torch.nn.Parameter(torch.randn(7))]
    opt = make_optimizer([{"params": params, "lr": 1e-3}], TrainConfig(optimizer=optimizer))
    sum(p.sum() for p in params).backward()
    opt.step()
    allocated = sum(v.numel() * v.element_size() for state in opt.state.values() for v in state.values()
                    if isinstance(v, torch.Tensor) and v.numel() == state_size(v, params))
    assert memory.optimizer_bytes(params, optimizer) == allocated


def state_size(value: torch.Tensor, params) -> int:
    """Per-parameter state tensors (moments, s, p0) have the parameter's size; counters are scalars."""
    return value.numel() if value.numel() in {p.numel() for p in params} else -1


def test_a_set_up_too_large_for_the_device_warns_with_what_to_change(tmp_path, tiny_overrides, monkeypatch):
    monkeypatch.setattr(memory, "device_capacity", lambda device: 1024**2)  # a 1 MiB device
    with pytest.warns(UserWarning, match="exceeds.*gradient_checkpointing.*model.quantize=int8"):
        trainer = _trained(tmp_path, tiny_overrides, {"adapter.kind": "full"})
    assert trainer.memory_estimate.total > 1024**2
    monkeypatch.setattr(memory, "device_capacity", lambda device: 1024**4)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _trained(tmp_path / "big", tiny_overrides, {"adapter.kind": "full"})


def load_bench():
    return load_script("benchmarks/bench_memory.py")


@pytest.mark.slow
def test_the_memory_table_gives_the_trainers_estimate(tmp_path, tiny_overrides):
    """benchmarks/bench_memory.py builds models on the meta device; on tiny its estimate must be
    the one the trainer prints for the same set-up on real weights."""
    bench = load_bench()
    setup = {"adapter.kind": "full", "train.mixed_precision": "bf16", "train.gradient_checkpointing": True, "prior.enabled": True}
    from rewardbooth.models.loading import load_components

    native = load_components("tiny").native_resolution
    real = _trained(tmp_path, tiny_overrides, {**setup, "data.resolution": native}).memory_estimate
    table = bench.table_estimate("tiny", "dreambooth", setup)
    assert table.weights == real.weights
    assert (table.gradients, table.optimizer) == (real.gradients, real.optimizer)
    assert table.activations == pytest.approx(real.activations, rel=0.02)


def test_an_int8_base_and_an_offloaded_t5_are_counted_as_they_sit_on_real_and_meta_weights(tmp_path, tiny_overrides, monkeypatch):
    """torchao's int8 weight reports its dense bf16 size; the estimate counts its int8 data, a float32 scale
    and an int8 zero point per row. T5 kept in CPU memory (as on a GPU) leaves meta placeholders that are
    not on the device. The table (meta weights) must agree with the trainer, and a flow model's
    over-capacity warning must name the int8 base."""
    pytest.importorskip("torchao")
    monkeypatch.setattr(memory, "device_capacity", lambda device: 1024**2)
    setup = {"train.mixed_precision": "bf16", "prior.enabled": False, "model.offload_text_encoders": True}
    with pytest.warns(UserWarning, match="model.quantize=int8"):
        trainer = _trained(tmp_path, tiny_overrides, {**setup, "model.name": "tiny-flux", "data.resolution": 64,
                                                      "model.quantize": "int8"})
    real = trainer.memory_estimate
    bench = load_bench()
    table = {q: bench.table_estimate("tiny-flux", "dreambooth", {**setup, "model.quantize": q}, 64) for q in (None, "int8")}
    assert table["int8"] == real
    from rewardbooth.models.loading import load_components

    components = load_components("tiny-flux")
    linear = [m.weight for m in components.unet.modules() if isinstance(m, torch.nn.Linear)]
    saved = sum(w.numel() for w in linear) - 5 * sum(w.shape[0] for w in linear)  # 2 -> 1 byte, + 5 bytes per row
    assert table[None].weights - real.weights == saved > 0
    resident_t5 = bench.table_estimate("tiny-flux", "dreambooth", {**setup, "model.offload_text_encoders": False}, 64)
    assert resident_t5.weights - table[None].weights == 2 * sum(p.numel() for p in components.text_encoder_2.parameters())


def test_rpos_frozen_copy_in_the_table_is_the_base_in_its_frozen_dtype():
    """RPO copies the U-Net in prepare(), before the trained weights turn float32: a bf16 copy."""
    bench = load_bench()
    setup = {"adapter.kind": "full", "train.mixed_precision": "bf16", "prior.enabled": True}
    rpo, db = (bench.table_estimate("tiny", method, setup).weights for method in ("rpo", "dreambooth"))
    unet = bench.components_on_meta("tiny").unet
    assert rpo - db == 2 * sum(p.numel() for p in unet.parameters())


def test_the_flow_table_takes_every_real_size_flow_preset_the_trainer_knows(monkeypatch):
    from rewardbooth.models import tiny_flow

    bench = load_bench()
    presets = dict(tiny_flow.FLOW_PRESETS, **{"new-random": tiny_flow.FlowPreset("new-random", "sd3", "sd35-large")})
    monkeypatch.setattr(tiny_flow, "FLOW_PRESETS", presets)
    names = bench.flow_models()
    assert {"flux-random", "sd35-random", "new-random", "sd35-medium-random"} <= set(names)
    assert not {"tiny-flux", "tiny-sd3"} & set(names)
    monkeypatch.setitem(tiny_flow.FAMILIES, "sd3", {**tiny_flow.FAMILIES["sd3"], "pipeline": "UnknownPipeline"})
    assert "new-random" not in bench.flow_models()  # a family the trainer cannot train yet is left out
    assert bench.fits(15.0, (16, 24, 48)) == "fits 16" and bench.fits(15.5, (16, 24, 48)) == "fits 24"
    assert bench.fits(47.5, (16, 24, 48)) == "over 48"
